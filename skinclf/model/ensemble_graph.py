"""Ensembles as one Keras graph: members side by side, logits averaged, one head."""

from __future__ import annotations

from skinclf.backend import load_keras

keras = load_keras()


def members(model) -> list:
    """The nested member models of an ensemble (`skinclf ensemble`); empty for a chain."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def ensemble_of(chains: list, head, *, name: str, activation: str | None = None):
    """Input -> each chain (logits) -> mean of the logits -> a copy of `head` (the classifier).

    The head is a Dense layer named "predictions", so prior correction, decision weights and
    temperature fold into it exactly as into a single network's classifier; `activation`
    overrides its activation (linear: a logits model)."""
    inputs = keras.Input(tuple(chains[0].inputs[0].shape[1:]), name="image")
    outputs = []
    for i, chain_model in enumerate(chains):
        chain_model.name = f"member_{i}"  # nested models keep their layer names; theirs must be unique
        outputs.append(chain_model(inputs))
    mean = keras.layers.Average(name="mean_logits")(outputs)
    config = head.get_config()
    clone = head.__class__.from_config({**config, "activation": activation or config["activation"]})
    x = clone(mean)
    clone.set_weights(head.get_weights())
    return keras.Model(inputs, x, name=name)
