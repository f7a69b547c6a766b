"""`skinclf ensemble`: average trained bundles into one bundle.

Runs of `skinclf train` with other seeds or crops make different mistakes; the mean of their
probabilities is usually better than any one of them. The ensemble is one `.keras` whose
output is that mean (each member a nested model), so predict, evaluate, serve and explain run
it like any bundle. Bundle one only if it beats the best single network on validation by a
margin worth its cost: every member adds a full forward pass to predict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skinclf.backend import load_keras
from skinclf.errors import SkinclfError
from skinclf.files import check_output_file
from skinclf.model import load_bundle, save_bundle

keras = load_keras()

# Metadata every member must share: an ensemble of models that see images differently is not one.
SHARED = ("classes", "input_size")


def ensemble_model(models: list, *, name: str = "skinclf_ensemble"):
    """A model whose output is the mean of `models`' probabilities (same input size)."""
    inputs = keras.Input(tuple(models[0].inputs[0].shape[1:]), name="image")
    outputs = []
    for i, member in enumerate(models):
        # Nested models keep their own layer names; only the member's name must be unique.
        clone = keras.models.clone_model(member)
        clone.set_weights(member.get_weights())
        clone.name = f"member_{i}"
        out = clone(inputs)
        outputs.append(out[0] if isinstance(out, (list, tuple)) else out)  # a one-output model may give a list
    return keras.Model(inputs, keras.layers.Average(name="mean_probabilities")(outputs), name=name)


def ensemble_bundles(*, members: list[Path], out: Path) -> dict[str, Any]:
    """Average the bundles at `members` into one bundle at `out`; returns its metadata."""
    if len(members) < 2:
        raise SkinclfError(f"an ensemble needs at least 2 model bundles, got {len(members)}")
    out = Path(out)
    if out.suffix != ".keras":
        raise SkinclfError(f"--out {out}: the model file must end in .keras")
    check_output_file(out, example="models/ensemble.keras")
    bundles = [load_bundle(Path(m)) for m in members]
    first = bundles[0]
    for bundle in bundles[1:]:
        for key in SHARED:
            if bundle.meta[key] != first.meta[key]:
                raise SkinclfError(f"{bundle.path} has other {key} than {first.path} "
                                   f"({bundle.meta[key]} vs {first.meta[key]}): members must match")
    meta = {k: v for k, v in first.meta.items() if k not in ("created", "format", "history", "metrics", "ood",
                                                             "calibration", "post_hoc", "training")}
    meta.update({
        "name": out.stem,
        "architecture": {**first.meta.get("architecture", {}), "ensemble": len(bundles),
                         "head": "mean of the members' probabilities"},
        "members": [{"path": str(b.path), "sha256": b.sha256, "name": b.meta.get("name"),
                     "validation": b.meta.get("metrics", {}).get("validation", {}).get("balanced_accuracy"),
                     "training": b.meta.get("training")} for b in bundles],
        "metrics": {},
    })
    save_bundle(ensemble_model([b.model for b in bundles]), out, meta)
    return meta
