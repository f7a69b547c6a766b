"""Fitting the metadata head (`skinclf.model.metadata`) on the image model's cached outputs.

The head is fitted on the TRAINING split (the image model's logits, optionally its pooled
features, and the encoded age, sex and site), with each metadata field hidden at random in
extra copies of every image (so that partial metadata gets a sensible answer), class-weighted
cross-entropy (the image model's decision aims at balanced accuracy), L2, L-BFGS (scipy).
Variants (inputs, hidden layer, L2, how often a field is hidden) are compared on the
VALIDATION split, which also fits the head's temperature. The test split is never read here.

`forward` is the training-side forward pass (float64, the function the optimiser
differentiates); `skinclf.model.metadata.MetadataHead.apply` is the numpy one every engine uses,
from the JSON; a test checks they agree to 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skinclf.errors import SkinclfError
from skinclf.metrics import balanced_accuracy
from skinclf.model.metadata import ENCODING_WIDTH, FIELDS, HEAD_FORMAT, SEXES, SITE_GROUPS, SITES
from skinclf.model.posthoc import fit_temperature, softmax


@dataclass(frozen=True)
class Variant:
    """One candidate head: which inputs, a hidden layer or none, L2, how often a field is hidden."""

    name: str
    inputs: tuple[str, ...] = ("metadata", "logits")
    hidden: int = 0
    l2: float = 1e-3
    hide: float = 0.3
    copies: int = 4

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": list(self.inputs), "hidden": self.hidden, "l2": self.l2,
                "hide": self.hide, "copies": self.copies}


VARIANTS = (
    Variant("linear, l2 1e-2", l2=1e-2),
    Variant("linear, l2 1e-3", l2=1e-3),
    Variant("linear, l2 1e-4", l2=1e-4),
    Variant("mlp 16, l2 1e-3", hidden=16, l2=1e-3),
    Variant("mlp 16 + features, l2 1e-3", inputs=("metadata", "logits", "features"), hidden=16, l2=1e-3),
)


@dataclass
class Outputs:
    """The image model's outputs on one split, and the encoded metadata of the same images."""

    logits: np.ndarray  # (n, classes), the engine's (post-hoc and temperature included)
    labels: np.ndarray
    metadata: np.ndarray  # (n, ENCODING_WIDTH), `model.metadata.encode`
    present: np.ndarray  # any field known
    features: np.ndarray | None = None


def hide_fields(x: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """A copy of encoded metadata with each field of each row hidden (set to missing) with probability p."""
    x = x.copy()
    for cols, missing in FIELDS.values():
        rows = rng.random(len(x)) < p
        x[np.ix_(rows, range(cols.start, cols.stop))] = 0.0
        x[rows, missing] = 1.0
    return x


def _all_missing(x: np.ndarray) -> np.ndarray:
    return np.all([x[:, missing] == 1.0 for _, missing in FIELDS.values()], axis=0)


def _inputs(variant_inputs, meta: np.ndarray, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
    parts = {"metadata": meta, "logits": logits, "features": features}
    return np.concatenate([parts[k] for k in variant_inputs], axis=1)


def forward(params: dict[str, np.ndarray], x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The head's logits (before its temperature) for inputs x and image logits z, float64."""
    h = np.maximum(x @ params["W1"] + params["b1"], 0.0) if "W1" in params else x
    return z + h @ params["W"] + params["b"]


def _unpack(theta: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = theta[i : i + size].reshape(shape)
        i += size
    return out


def _fit(x: np.ndarray, z: np.ndarray, y: np.ndarray, weights: np.ndarray, *, hidden: int, l2: float,
         seed: int) -> dict[str, np.ndarray]:
    from scipy.optimize import minimize

    n, d = x.shape
    k = z.shape[1]
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    if hidden:
        shapes.update(W1=(d, hidden), b1=(hidden,))
    shapes.update(W=(hidden or d, k), b=(k,))
    init = {name: (rng.normal(0, 1 / np.sqrt(d), s) if name == "W1" else np.zeros(s)) for name, s in shapes.items()}
    theta0 = np.concatenate([v.ravel() for v in init.values()])
    onehot = np.eye(k)[y]
    w = weights[y] / weights[y].sum()

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        p = _unpack(theta, shapes)
        pre = x @ p["W1"] + p["b1"] if hidden else None
        h = np.maximum(pre, 0.0) if hidden else x
        out = z + h @ p["W"] + p["b"]
        out = out - out.max(axis=1, keepdims=True)
        logp = out - np.log(np.exp(out).sum(axis=1, keepdims=True))
        value = -float(np.sum(w * np.sum(onehot * logp, axis=1)))
        d_out = (np.exp(logp) - onehot) * w[:, None]
        grads = {"W": h.T @ d_out, "b": d_out.sum(axis=0)}
        penalised = ["W"]
        if hidden:
            d_h = (d_out @ p["W"].T) * (pre > 0)
            grads.update(W1=x.T @ d_h, b1=d_h.sum(axis=0))
            penalised.append("W1")
        for name in penalised:
            value += l2 * float(np.sum(p[name] ** 2))
            grads[name] = grads[name] + 2 * l2 * p[name]
        return value, np.concatenate([grads[name].ravel() for name in shapes])

    result = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 1000})
    return _unpack(result.x, shapes)


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, mean 1 over the images (balanced accuracy's view of the data)."""
    counts = np.bincount(labels, minlength=n_classes).astype("float64")
    if np.any(counts == 0):
        raise SkinclfError("the training split lacks a class: cannot fit the metadata head")
    return len(labels) / (n_classes * counts)


@dataclass
class Fitted:
    variant: Variant
    params: dict[str, np.ndarray]
    feature_center: np.ndarray | None = None
    feature_scale: np.ndarray | None = None
    temperature: float = 1.0
    validation: dict[str, Any] = field(default_factory=dict)

    def fused(self, out: Outputs) -> np.ndarray:
        """Head logits (temperature included) on `out`: image-only where no field is known."""
        z = out.logits.astype("float64")
        result = z.copy()
        rows = out.present
        feats = None
        if "features" in self.variant.inputs:
            feats = (out.features[rows] - self.feature_center) / self.feature_scale
        x = _inputs(self.variant.inputs, out.metadata[rows], z[rows], feats)
        result[rows] = forward(self.params, x, z[rows]) / self.temperature
        return result

    def spec(self, *, classes: list[str], image_model: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The bundle's JSON for this head (`model.metadata.MetadataHead` reads it)."""
        p = self.params
        spec: dict[str, Any] = {
            "format": HEAD_FORMAT, "classes": list(classes), "image_model": image_model,
            "inputs": list(self.variant.inputs),
            "encoding": {"age": "(age - 50) / 20, its square, missing flag", "sexes": list(SEXES),
                         "sites": list(SITES), "site_groups": {k: list(v) for k, v in SITE_GROUPS.items()},
                         "width": ENCODING_WIDTH},
            "hidden": {"W": p["W1"].tolist(), "b": p["b1"].tolist()} if "W1" in p else None,
            "out": {"W": p["W"].tolist(), "b": p["b"].tolist()},
            "logit_weight": 1.0, "temperature": self.temperature, "variant": self.variant.describe(),
            **extra,
        }
        if self.feature_center is not None:
            spec["feature_center"] = self.feature_center.tolist()
            spec["feature_scale"] = self.feature_scale.tolist()
        return spec


def fit_variant(variant: Variant, train: Outputs, *, seed: int = 0) -> Fitted:
    """Fit one variant on the training split (each field hidden at random in `copies` extra copies)."""
    rng = np.random.default_rng(seed)
    k = train.logits.shape[1]
    center = scale = None
    feats = None
    if "features" in variant.inputs:
        if train.features is None:
            raise SkinclfError(f"variant {variant.name!r} needs pooled features, which the engine did not give")
        center = train.features.mean(axis=0)
        scale = train.features.std(axis=0) + 1e-6
        feats = (train.features - center) / scale
    keep = train.present
    metas = [train.metadata[keep]] + [hide_fields(train.metadata[keep], rng, variant.hide) for _ in range(variant.copies)]
    m = np.concatenate(metas)
    known = ~_all_missing(m)  # a row with every field hidden gets the image logits whatever the head: no signal
    reps = len(metas)
    z = np.tile(train.logits[keep].astype("float64"), (reps, 1))[known]
    y = np.tile(train.labels[keep], reps)[known]
    f = np.tile(feats[keep], (reps, 1))[known] if feats is not None else None
    x = _inputs(variant.inputs, m[known], z, f)
    params = _fit(x, z, y, class_weights(train.labels, k), hidden=variant.hidden, l2=variant.l2, seed=seed)
    return Fitted(variant=variant, params=params, feature_center=center, feature_scale=scale)


def figures(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Balanced accuracy, melanoma recall and per-class recall of argmax(logits)."""
    pred = np.argmax(logits, axis=1)
    out = {"n": int(len(labels)), "balanced_accuracy": round(float(balanced_accuracy(labels, pred)), 4),
           "recall": {c: round(float(np.mean(pred[labels == i] == i)), 4) for i, c in enumerate(classes)
                      if np.any(labels == i)}}
    if "mel" in classes:
        out["melanoma_recall"] = out["recall"].get("mel")
    return out


def choose(train: Outputs, val: Outputs, classes: list[str], *, variants=VARIANTS, seed: int = 0,
           log=None) -> tuple[Fitted, list[dict[str, Any]]]:
    """Fit every variant on train, score each on validation, and keep the one with the best
    validation balanced accuracy among those whose melanoma recall is not below the image
    model's (ties: the simpler, earlier in the list). Its temperature is then fitted on validation."""
    base = figures(val.logits, val.labels, classes)
    table, best = [], None
    for variant in variants:
        if "features" in variant.inputs and (train.features is None or val.features is None):
            continue
        fitted = fit_variant(variant, train, seed=seed)
        fig = figures(fitted.fused(val), val.labels, classes)
        row = {**variant.describe(), "validation": fig}
        table.append(row)
        if log:
            log(f"{variant.name}: validation balanced accuracy {fig['balanced_accuracy']:.4f}, "
                f"melanoma recall {fig.get('melanoma_recall')}")
        ok = fig.get("melanoma_recall", 1) >= base.get("melanoma_recall", 0)
        if ok and (best is None or fig["balanced_accuracy"] > best[1]["balanced_accuracy"]):
            best = (fitted, fig)
    if best is None:
        raise SkinclfError("no metadata head kept validation melanoma recall at the image model's; nothing to store")
    fitted = best[0]
    rows = val.present
    fitted.temperature = 1.0
    fitted.temperature = fit_temperature(softmax(fitted.fused(val)[rows]), val.labels[rows])
    fitted.validation = {"image_only": base, "with_metadata": figures(fitted.fused(val), val.labels, classes)}
    return fitted, table
