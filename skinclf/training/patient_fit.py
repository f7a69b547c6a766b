"""Fitting the metadata head (`skinclf.model.patient_head`) on the image model's cached outputs.

The chosen form is a product of experts: a multinomial logistic regression p(class | metadata)
fitted on the TRAINING split's metadata alone (each field hidden at random in extra copies of
every image, so partial metadata gets a sensible answer; L2; L-BFGS from scipy), added to the
image logits as beta * (log p(class | metadata) - log training prior), plus a per-class shift
(melanoma weight delta and prior correction tau, as the image model's own decision was set),
with beta, delta and tau chosen on the VALIDATION split (largest balanced accuracy with melanoma
recall not below the image model's) and then a temperature fitted there. The image model's
outputs on its own training images are over-confident (training balanced accuracy 0.93 against
0.83 on validation), so a head learnt from them (`fit_variant`, the residual form, kept for
comparison) trusts the image too much and moves the decision towards nevi; the metadata model
never sees them. The test split is never read here.

`forward` is the training-side forward pass (float64, the function the optimiser
differentiates); `skinclf.model.patient_head.MetadataHead.apply` is the numpy one every engine uses,
from the JSON; a test checks they agree to 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skinclf.errors import SkinclfError
from skinclf.metrics import balanced_accuracy
from skinclf.model.patient_head import ENCODING_WIDTH, FIELDS, HEAD_FORMAT, SEXES, SITE_GROUPS, SITES
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


def fit_metadata_model(train: Outputs, *, l2: float, hide: float = 0.3, copies: int = 4,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """p(class | metadata): multinomial logistic regression on the training split's metadata
    alone (unweighted: a posterior under the training prior), fields hidden at random."""
    rng = np.random.default_rng(seed)
    m = np.concatenate([train.metadata] + [hide_fields(train.metadata, rng, hide) for _ in range(copies)])
    y = np.tile(train.labels, copies + 1)
    k = train.logits.shape[1]
    params = _fit(m, np.zeros((len(m), k)), y, np.ones(k), hidden=0, l2=l2, seed=seed)
    return {"W": params["W"], "b": params["b"]}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


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
    metadata_model: dict[str, np.ndarray] | None = None  # product of experts: p(class | metadata)
    log_prior: np.ndarray | None = None
    weight: float = 1.0  # beta
    shift: np.ndarray | None = None  # per class

    def fused(self, out: Outputs) -> np.ndarray:
        """Head logits (temperature included) on `out`: image-only where no field is known."""
        z = out.logits.astype("float64")
        result = z.copy()
        rows = out.present
        feats = None
        if "features" in self.variant.inputs:
            feats = (out.features[rows] - self.feature_center) / self.feature_scale
        x = _inputs(self.variant.inputs, out.metadata[rows], z[rows], feats)
        fused = forward(self.params, x, z[rows]) if self.params else z[rows].copy()
        if self.metadata_model is not None:
            m = out.metadata[rows] @ self.metadata_model["W"] + self.metadata_model["b"]
            fused = fused + self.weight * (_log_softmax(m) - self.log_prior)
        if self.shift is not None:
            fused = fused + self.shift
        result[rows] = fused / self.temperature
        return result

    def spec(self, *, classes: list[str], image_model: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The bundle's JSON for this head (`model.metadata.MetadataHead` reads it)."""
        p = self.params or {}
        spec: dict[str, Any] = {
            "format": HEAD_FORMAT, "classes": list(classes), "image_model": image_model,
            "inputs": list(self.variant.inputs),
            "encoding": {"age": "(age - 50) / 20, its square, missing flag", "sexes": list(SEXES),
                         "sites": list(SITES), "site_groups": {k: list(v) for k, v in SITE_GROUPS.items()},
                         "width": ENCODING_WIDTH},
            "hidden": {"W": p["W1"].tolist(), "b": p["b1"].tolist()} if "W1" in p else None,
            "out": {"W": p["W"].tolist(), "b": p["b"].tolist()} if "W" in p else None,
            "metadata_model": None if self.metadata_model is None else {
                "W": self.metadata_model["W"].tolist(), "b": self.metadata_model["b"].tolist(),
                "log_prior": self.log_prior.tolist(), "weight": self.weight},
            "shift": None if self.shift is None else self.shift.tolist(),
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


BETAS = np.round(np.arange(0.2, 1.21, 0.1), 2)
MEL_SHIFTS = np.round(np.arange(0.0, 1.51, 0.125), 3)
TAUS = (-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3)
L2S = (1e-2, 1e-3, 1e-4)


def choose(train: Outputs, val: Outputs, classes: list[str], *, l2s=L2S, seed: int = 0,
           log=None) -> tuple[Fitted, list[dict[str, Any]]]:
    """The product-of-experts head: for each L2, p(class | metadata) fitted on train; its weight
    beta, the melanoma shift delta and the prior correction tau chosen on validation (largest
    balanced accuracy with melanoma recall not below the image model's; ties: the first in
    grid order); then its temperature fitted on validation (images with metadata)."""
    base = figures(val.logits, val.labels, classes)
    prior = np.bincount(train.labels, minlength=len(classes)) / len(train.labels)
    log_prior = np.log(prior)
    mel = classes.index("mel") if "mel" in classes else None
    z, rows = val.logits.astype("float64"), val.present
    table, best = [], None
    for l2 in l2s:
        model = fit_metadata_model(train, l2=l2, seed=seed)
        ratio = (_log_softmax(val.metadata @ model["W"] + model["b"]) - log_prior) * rows[:, None]
        found = None
        for beta in BETAS:
            for delta in (MEL_SHIFTS if mel is not None else (0.0,)):
                for tau in TAUS:
                    shift = -tau * log_prior + (delta * np.eye(len(classes))[mel] if mel is not None else 0.0)
                    fig = figures(z + beta * ratio + shift * rows[:, None], val.labels, classes)
                    if fig.get("melanoma_recall", 1) < base.get("melanoma_recall", 0):
                        continue
                    if found is None or fig["balanced_accuracy"] > found[0]["balanced_accuracy"]:
                        found = (fig, float(beta), float(delta), float(tau), shift)
        if found is None:
            continue
        fig, beta, delta, tau, shift = found
        table.append({"l2": l2, "weight": beta, "mel_shift": delta, "tau": tau, "validation": fig})
        if log:
            log(f"metadata model l2 {l2:g}: beta {beta:g}, melanoma shift {delta:g}, tau {tau:g}: validation balanced "
                f"accuracy {fig['balanced_accuracy']:.4f}, melanoma recall {fig.get('melanoma_recall')}")
        if best is None or fig["balanced_accuracy"] > best[1]["balanced_accuracy"]:
            best = (Fitted(variant=Variant(f"product of experts, l2 {l2:g}", inputs=("metadata",), l2=l2), params={},
                           metadata_model=model, log_prior=log_prior, weight=beta, shift=np.asarray(shift, "float64")),
                    fig)
    if best is None:
        raise SkinclfError("no metadata head kept validation melanoma recall at the image model's; nothing to store")
    fitted = best[0]
    fitted.temperature = 1.0
    fitted.temperature = fit_temperature(softmax(fitted.fused(val)[rows]), val.labels[rows])
    fitted.validation = {"image_only": base, "with_metadata": figures(fitted.fused(val), val.labels, classes)}
    return fitted, table
