"""Patient metadata (age, sex, body site) and the head that adds it to the image model's answer.

The head is fused late: it runs after ANY engine (Keras, ONNX Runtime float or int8, serve, Ray
workers) on the logits (and, if it was fitted with them, the pooled features) the engine
returns, in plain numpy, from the JSON the bundle carries (`meta["metadata_head"]`, copied into
the ONNX export with the rest of the metadata). By construction an image without metadata gets
EXACTLY the image-only logits:

    out = z                                              when no field (age, sex, site) is known
    out = (a * z + beta * (log p(class | metadata) - log prior) + g(x) + shift) / T   otherwise

The product-of-experts term: p(class | metadata) is a multinomial logistic regression on the
metadata alone (`metadata_model`), fitted on the training split's metadata with fields randomly
hidden, so it never sees the image model's (over-confident) outputs on its own training images;
dividing by the training prior turns it into a likelihood ratio that shifts the image logits.
g is an optional learned map (linear, or one ReLU layer then linear) of x = [metadata, z, ...];
`shift` is a per-class constant (the decision re-balanced on validation, as the image model's
own prior correction and melanoma weight were), beta its weight and T a temperature, all three
chosen on validation (`skinclf.training.patient_fit`).

The metadata encoding (21 numbers): age scaled ((age - 50) / 20), its square and a missing flag;
sex one-hot (female, male, unknown); body site one-hot over HAM10000's 14 sites plus unknown. A
coarser ISIC site ("head/neck", "anterior torso", ...) spreads evenly over the HAM10000 sites it
covers. Values are parsed tolerantly (`parse_age`, `parse_sex`, `parse_site`: case, spacing,
plurals, small misspellings); a bad value is a ValueError naming it and what is accepted, which
callers turn into a SkinclfError naming the row or field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from skinclf.errors import SkinclfError

HEAD_FORMAT = "skinclf-metadata-head/1"
HEAD_KEY = "metadata_head"  # where a bundle's metadata carries the head
AGE_RANGE = (0.0, 120.0)
AGE_CENTER, AGE_SCALE = 50.0, 20.0
SEXES = ("female", "male")
# HAM10000's `localization` values (its "unknown" is a missing site).
SITES = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity", "neck",
         "scalp", "trunk", "upper extremity")
# ISIC's coarser `anatom_site_general(_challenge)` values: the HAM10000 sites each one covers.
SITE_GROUPS = {
    "head/neck": ("face", "scalp", "neck", "ear"),
    "anterior torso": ("chest", "abdomen"),
    "posterior torso": ("back",),
    "lateral torso": ("trunk",),
    "torso": ("trunk", "back", "chest", "abdomen"),
    "palms/soles": ("acral", "hand", "foot"),
    "oral/genital": ("genital",),
}
ENCODING_WIDTH = 3 + len(SEXES) + 1 + len(SITES) + 1
# Each field's columns in the encoding and the column that says it is missing (training hides fields).
FIELDS = {"age": (slice(0, 3), 2), "sex": (slice(3, 3 + len(SEXES) + 1), 3 + len(SEXES)),
          "site": (slice(4 + len(SEXES), ENCODING_WIDTH), ENCODING_WIDTH - 1)}
NO_VALUE = ("", "unknown", "unk", "na", "n/a", "nan", "none", "null", "?", "-", "not specified", "unspecified",
           "missing")
_SEX_ALIASES = {"f": "female", "female": "female", "woman": "female", "w": "female", "girl": "female",
                "m": "male", "male": "male", "man": "male", "boy": "male"}
_SITE_ALIASES = {"lower limb": "lower extremity", "leg": "lower extremity", "upper limb": "upper extremity",
                 "arm": "upper extremity", "feet": "foot", "genitals": "genital", "genitalia": "genital",
                 "head neck": "head/neck", "head and neck": "head/neck", "head": "head/neck",
                 "palms soles": "palms/soles", "palm": "palms/soles", "sole": "palms/soles",
                 "oral genital": "oral/genital", "posterior trunk": "back", "anterior trunk": "anterior torso",
                 "hands": "hand", "ears": "ear"}


@dataclass(frozen=True)
class PatientMeta:
    """What is known about an image's patient and lesion; None: not known."""

    age: float | None = None
    sex: str | None = None  # one of SEXES
    site: str | None = None  # one of SITES or a key of SITE_GROUPS

    @property
    def present(self) -> bool:
        return self.age is not None or self.sex is not None or self.site is not None

    def as_dict(self) -> dict[str, Any]:
        return {"age": self.age, "sex": self.sex, "site": self.site}


NO_METADATA = PatientMeta()


def _missing(text: str) -> bool:
    return text.strip().lower() in NO_VALUE


def parse_age(value: Any) -> float | None:
    """Age in years (0-120) from a number or text ("45", "45.0", "45 years"); None when missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    if _missing(text):
        return None
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)\s*(?:y|yr|yrs|years?)?", text.lower())
    if not match:
        raise ValueError(f"age {text!r} is not a number of years (expected 0 to 120, or empty when unknown)")
    age = float(match.group(1))
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise ValueError(f"age {text} is outside 0 to 120 years")
    return age


def parse_sex(value: Any) -> str | None:
    """'female' or 'male' from any case or common spelling (f, m, woman, man); None when missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    if _missing(text):
        return None
    found = _SEX_ALIASES.get(text.lower())
    if found is None:
        raise ValueError(f"sex {text!r} is not one of female, male (or f, m; empty or unknown when not known)")
    return found


def _site_key(text: str) -> str:
    key = " ".join(re.sub(r"[_\-]+", " ", text.lower()).split())
    return key.replace(" / ", "/")


def parse_site(value: Any) -> str | None:
    """A HAM10000 site (or an ISIC site group) from any case, spacing, plural or a small
    misspelling; None when missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    if _missing(text):
        return None
    key = _site_key(text)
    known = {**{s: s for s in SITES}, **{g: g for g in SITE_GROUPS}, **_SITE_ALIASES}
    for candidate in (key, key.rstrip("s"), key.replace("extremities", "extremity")):
        if candidate in known:
            return known[candidate]
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.85)
    if close:
        return known[close[0]]
    raise ValueError(f"site {text!r} is not a known body site (expected one of {', '.join(SITES)}, or ISIC's "
                     f"{', '.join(SITE_GROUPS)}; empty or unknown when not known)")


def parse_meta(*, age: Any = None, sex: Any = None, site: Any = None) -> PatientMeta:
    """A PatientMeta from raw values (ValueError naming the first bad one)."""
    return PatientMeta(age=parse_age(age), sex=parse_sex(sex), site=parse_site(site))


def encode(metas: list[PatientMeta]) -> tuple[np.ndarray, np.ndarray]:
    """The (n, ENCODING_WIDTH) float64 encoding of each image's metadata, and whether any field is known."""
    x = np.zeros((len(metas), ENCODING_WIDTH), dtype="float64")
    present = np.zeros(len(metas), dtype=bool)
    sex0, site0 = 3, 3 + len(SEXES) + 1
    for i, m in enumerate(metas):
        present[i] = m.present
        if m.age is None:
            x[i, 2] = 1.0
        else:
            a = (m.age - AGE_CENTER) / AGE_SCALE
            x[i, 0], x[i, 1] = a, a * a
        x[i, sex0 + (SEXES.index(m.sex) if m.sex in SEXES else len(SEXES))] = 1.0
        if m.site is None:
            x[i, site0 + len(SITES)] = 1.0
        else:
            covered = SITE_GROUPS.get(m.site, (m.site,))
            for s in covered:
                x[i, site0 + SITES.index(s)] = 1.0 / len(covered)
    return x, present


def image_model_fingerprint(meta: dict[str, Any]) -> str:
    """What the head's inputs depend on: the image model's identity beyond its weights' file
    (created, members, post-hoc shifts, temperature). A bundle whose image model changed since
    the head was fitted (retrained, recalibrated) no longer matches, and the head is not used."""
    parts = {k: meta.get(k) for k in ("created", "members", "architecture", "post_hoc")}
    parts["temperature"] = (meta.get("calibration") or {}).get("temperature")
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class MetadataHead:
    """The fitted head, as the bundle's JSON describes it; `apply` is its numpy forward."""

    def __init__(self, spec: dict[str, Any], *, classes: list[str]) -> None:
        self.spec = spec
        n = len(classes)
        self.inputs = list(spec["inputs"])
        self.hidden = None
        if spec.get("hidden"):
            self.hidden = (np.asarray(spec["hidden"]["W"], dtype="float64"), np.asarray(spec["hidden"]["b"], dtype="float64"))
        out = spec.get("out") or {"W": np.zeros((self._width_of(spec, n), n)), "b": np.zeros(n)}
        self.w_out = np.asarray(out["W"], dtype="float64")
        self.b_out = np.asarray(out["b"], dtype="float64")
        self.shift = np.asarray(spec.get("shift") or np.zeros(n), dtype="float64")
        self.meta_model = None
        if spec.get("metadata_model"):
            mm = spec["metadata_model"]
            self.meta_model = (np.asarray(mm["W"], dtype="float64"), np.asarray(mm["b"], dtype="float64"),
                               np.asarray(mm["log_prior"], dtype="float64"), float(mm["weight"]))
            if (self.meta_model[0].shape != (ENCODING_WIDTH, n) or self.meta_model[1].shape != (n,)
                    or self.meta_model[2].shape != (n,)):
                raise ValueError(f"the metadata model's weights do not fit {ENCODING_WIDTH} inputs and {n} classes")
        if self.shift.shape != (n,):
            raise ValueError(f"shift has {self.shift.shape} values for {n} classes")
        self.logit_weight = float(spec.get("logit_weight", 1.0))
        self.temperature = float(spec.get("temperature", 1.0))
        self.feature_center = np.asarray(spec.get("feature_center") or [], dtype="float64")
        self.feature_scale = np.asarray(spec.get("feature_scale") or [], dtype="float64")
        width = self.input_width(n)
        first = self.hidden[0] if self.hidden else self.w_out
        if first.shape[0] != width or self.w_out.shape[1] != n or self.b_out.shape != (n,):
            raise ValueError(f"weights of shape {first.shape} / {self.w_out.shape} do not fit {width} inputs and {n} classes")
        if self.hidden and (self.hidden[1].shape != (first.shape[1],) or self.w_out.shape[0] != first.shape[1]):
            raise ValueError("the hidden layer's shapes do not match")
        if not self.temperature > 0:
            raise ValueError(f"temperature {self.temperature} is not positive")

    def _width_of(self, spec: dict[str, Any], n: int) -> int:
        self.inputs = list(spec["inputs"])
        self.feature_center = np.asarray(spec.get("feature_center") or [], dtype="float64")
        return self.input_width(n)

    @property
    def needs_features(self) -> bool:
        return "features" in self.inputs

    def input_width(self, n_classes: int) -> int:
        width = {"metadata": ENCODING_WIDTH, "logits": n_classes, "features": len(self.feature_center)}
        return sum(width[k] for k in self.inputs)

    def apply(self, logits: np.ndarray, metas: list[PatientMeta], features: np.ndarray | None = None) -> np.ndarray:
        """The logits with the metadata added: image-only rows (no field known, or a NaN row of a
        file that could not be read) are returned exactly as they came."""
        z = np.asarray(logits, dtype="float32")
        x_meta, present = encode(metas)
        present &= np.isfinite(z).all(axis=1)
        if self.needs_features:
            if features is None:
                raise ValueError("this head needs the pooled features, which this engine does not give")
            present &= np.isfinite(features).all(axis=1)
        out = z.copy()
        if not present.any():
            return out
        rows = np.nonzero(present)[0]
        parts = {"metadata": x_meta[rows], "logits": z[rows].astype("float64")}
        if self.needs_features:
            parts["features"] = (np.asarray(features, dtype="float64")[rows] - self.feature_center) / self.feature_scale
        x = np.concatenate([parts[k] for k in self.inputs], axis=1)
        if self.hidden:
            x = np.maximum(x @ self.hidden[0] + self.hidden[1], 0.0)
        fused = self.logit_weight * z[rows].astype("float64") + x @ self.w_out + self.b_out + self.shift
        if self.meta_model is not None:
            w, b, log_prior, weight = self.meta_model
            m = x_meta[rows] @ w + b
            m = m - m.max(axis=1, keepdims=True)
            fused += weight * (m - np.log(np.exp(m).sum(axis=1, keepdims=True)) - log_prior)
        fused /= self.temperature
        out[rows] = fused.astype("float32")
        return out


def load_head(meta: dict[str, Any], *, path: Any = "model") -> MetadataHead | None:
    """The bundle's metadata head, or None when it has none. A head that does not fit the model
    (malformed, other classes, fitted to another version of the image model) is a SkinclfError,
    so that nobody is told their metadata was used when it could not be."""
    spec = meta.get(HEAD_KEY)
    if not spec:
        return None
    if not isinstance(spec, dict) or spec.get("format") != HEAD_FORMAT:
        raise SkinclfError(f"{path}: its {HEAD_KEY} is not a {HEAD_FORMAT} head; refit it: "
                           "python tools/fit_metadata_head.py --model MODEL")
    if spec.get("classes") != list(meta["classes"]):
        raise SkinclfError(f"{path}: its metadata head was fitted for classes {spec.get('classes')}, not the model's "
                           f"{meta['classes']}; refit it: python tools/fit_metadata_head.py --model MODEL")
    if spec.get("image_model") != image_model_fingerprint(meta):
        raise SkinclfError(f"{path}: its metadata head was fitted to another version of the image model (retrained or "
                           "recalibrated since); refit it: python tools/fit_metadata_head.py --model MODEL, or run "
                           "without --metadata")
    try:
        return MetadataHead(spec, classes=list(meta["classes"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SkinclfError(f"{path}: its metadata head is malformed ({exc}); refit it: "
                           "python tools/fit_metadata_head.py --model MODEL") from None
