"""Out-of-distribution flags: "this image is unlike the training images".

A classifier names one of its classes for any picture, a landscape or a page of text included.
An out-of-distribution (OOD) score computed from the model's own logits says how unlike the
training images an input is; a threshold fitted on held-out dermoscopic images (the validation
split) so that `pass_rate` (95%) of them pass flags the rest. Higher scores are more unusual:

- `energy`: -logsumexp(z) (Liu et al., "Energy-based out-of-distribution detection", 2020);
- `max_logit`: -max(z) (Hendrycks et al., "Scaling out-of-distribution detection", 2022);
- `max_prob`: -max softmax(z) (Hendrycks & Gimpel, 2017, the baseline).

Logits come from every engine (`engine.logits`), so the flag works with Keras and ONNX alike.
Which score a bundle uses is chosen by `fit_ood` on how well each separates the validation
split from `reference_outliers()` (mean ROC-AUC over the outlier sets), and recorded in the
bundle's metadata (`meta["ood"]`) with its threshold and the flag rate on every set.

`reference_outliers` builds non-dermoscopic images from what installed packages ship
(scikit-learn's and matplotlib's sample photographs, scikit-image's `skimage.data` when
installed) plus generated ones (flat colours, noise, text, tiny images, screenshot-like UI).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from skinclf.data.images import open_image
from skinclf.errors import SkinclfError
from skinclf.model.outlier import PASS_RATE, SCORES, WARNING, ood_scores


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Probability that a random outlier scores above a random inlier (ties count half)."""
    a, b = np.asarray(inliers, dtype="float64"), np.asarray(outliers, dtype="float64")
    if not len(a) or not len(b):
        return float("nan")
    ranks = _average_ranks(np.concatenate([a, b]))
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    sorted_values = values[order]
    # Average the ranks of tied values.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2
    return ranks


def fit_ood(
    inlier_logits: np.ndarray,
    outlier_logits: Mapping[str, np.ndarray],
    *,
    pass_rate: float = PASS_RATE,
    score: str | None = None,
    fitted_on: str = "validation split",
) -> dict[str, Any]:
    """Choose the score that best separates inliers from the outlier sets and fit its threshold.

    The score with the highest mean ROC-AUC over the outlier sets (each set weighs the same,
    whatever its size) wins unless `score` names one; its threshold is the `pass_rate`
    quantile of the inliers' scores, so that share of them passes. Returns the record stored
    as `meta["ood"]`: score, threshold, flag rate on the inliers and on each outlier set, and
    every candidate's separation.
    """
    if not 0.5 <= pass_rate < 1:
        raise SkinclfError(f"pass rate {pass_rate}: must be in [0.5, 1), e.g. 0.95")
    inlier_logits = np.asarray(inlier_logits)
    if len(inlier_logits) < 20:
        raise SkinclfError(f"{len(inlier_logits)} images are too few to fit an OOD threshold (need at least 20)")
    candidates = [score] if score else list(SCORES)
    separation = {}
    for name in candidates:
        inside = ood_scores(inlier_logits, name)
        per_set = {k: auroc(inside, ood_scores(v, name)) for k, v in outlier_logits.items() if len(v)}
        separation[name] = {"mean_auroc": float(np.mean(list(per_set.values()))) if per_set else float("nan"),
                            "auroc": per_set}
    chosen = score or max(candidates, key=lambda n: (np.nan_to_num(separation[n]["mean_auroc"], nan=-1.0),
                                                     -candidates.index(n)))
    inside = ood_scores(inlier_logits, chosen)
    threshold = float(np.quantile(inside, pass_rate, method="higher"))
    flag_rates = {fitted_on: float(np.mean(inside > threshold))}
    counts = {fitted_on: int(len(inside))}
    for k, v in outlier_logits.items():
        if len(v):
            flag_rates[k] = float(np.mean(ood_scores(v, chosen) > threshold))
            counts[k] = int(len(v))
    return {"score": chosen, "formula": SCORES[chosen], "threshold": threshold, "pass_rate": pass_rate,
            "fitted_on": fitted_on, "flag_rates": flag_rates, "counts": counts, "separation": separation,
            "chosen_by": "highest mean ROC-AUC (fitted_on vs each outlier set) over the candidate scores",
            "warning": WARNING}


def with_logits_output(model):
    """A Keras model giving `[softmax(z), z]` side by side ((n, 2 * classes)) from a chain
    model ending in the 'predictions' softmax: probabilities and OOD score in one forward pass,
    batch norms folded as `inference_model` does."""
    from skinclf.backend import load_keras
    from skinclf.engines.keras import inference_model
    from skinclf.model.network import logits_model

    keras = load_keras()
    folded = inference_model(logits_model(model))
    z = folded.outputs[0]
    both = keras.layers.Concatenate(name="probs_and_logits")([keras.layers.Softmax(name="softmax")(z), z])
    return keras.Model(folded.inputs, both, name=f"{model.name}_probs_logits")


# --- reference outliers ----------------------------------------------------------------------


def _square(image: Image.Image, size: int) -> np.ndarray:
    """The whole picture resized to size x size, as `images.load_image` does (float32 0..255)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype="float32")


def _with_crops(image: Image.Image) -> list[Image.Image]:
    """The picture and its four quadrants: more samples from few photographs."""
    w, h = image.size
    boxes = [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]
    return [image, *(image.crop(b) for b in boxes)]


def _package_photographs() -> dict[str, list[Image.Image]]:
    """Photographs that ship inside installed packages, by kind (missing packages are skipped)."""
    photos: list[Image.Image] = []
    medical: list[Image.Image] = []
    textures: list[Image.Image] = []
    pages: list[Image.Image] = []
    try:
        from sklearn.datasets import load_sample_images

        photos += [Image.fromarray(a) for a in load_sample_images().images]
    except Exception:  # noqa: BLE001 - optional source
        pass
    try:
        import matplotlib

        hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if hopper.is_file():
            with open_image(hopper) as im:
                photos.append(im.convert("RGB"))
    except Exception:  # noqa: BLE001
        pass
    try:
        import skimage.data as sk

        def grab(names: tuple[str, ...], into: list[Image.Image]) -> None:
            for name in names:
                try:
                    a = np.asarray(getattr(sk, name)())
                    into.append(Image.fromarray((a * 255).astype(np.uint8) if a.dtype == bool else a).convert("RGB"))
                except Exception:  # noqa: BLE001 - a sample that needs a download
                    pass

        grab(("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "clock", "hubble_deep_field",
              "colorwheel"), photos)
        grab(("retina", "immunohistochemistry"), medical)
        grab(("grass", "gravel", "brick"), textures)
        grab(("page", "text"), pages)
    except ImportError:
        pass
    return {"photographs": photos, "other medical images": medical, "textures": textures, "pages": pages}


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


_WORDS = ("patient", "report", "dermatology", "clinic", "lesion", "follow-up", "date", "referral", "left", "arm",
          "the", "of", "and", "image", "scan", "results", "page", "invoice", "total", "name", "address")


def _text_page(rng: np.random.Generator, size: int) -> Image.Image:
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    im = Image.new("RGB", (size * 2, size * 2), paper)
    draw = ImageDraw.Draw(im)
    font_size = int(rng.integers(12, 40))
    font = _font(font_size)
    y = int(rng.integers(5, 30))
    while y < im.height - font_size:
        words = " ".join(rng.choice(_WORDS, int(rng.integers(3, 9))))
        draw.text((int(rng.integers(5, 40)), y), words, fill=ink, font=font)
        y += int(font_size * rng.uniform(1.2, 1.8))
    return im


def _screenshot(rng: np.random.Generator, size: int) -> Image.Image:
    w, h = size * 3, size * 2
    dark = rng.random() < 0.3
    background = (30, 30, 36) if dark else (245, 245, 247)
    fg = (220, 220, 220) if dark else (30, 30, 30)
    accent = tuple(int(v) for v in rng.integers(0, 256, 3))
    im = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, w, 28), fill=(60, 60, 70) if dark else (215, 215, 220))  # title bar
    for i, colour in enumerate(((255, 95, 86), (255, 189, 46), (39, 201, 63))):
        draw.ellipse((8 + 20 * i, 8, 20 + 20 * i, 20), fill=colour)
    sidebar = int(rng.integers(80, 180))
    draw.rectangle((0, 28, sidebar, h), fill=(45, 45, 52) if dark else (232, 232, 236))
    font = _font(14)
    for j in range(int(rng.integers(5, 12))):
        draw.text((10, 40 + 24 * j), str(rng.choice(_WORDS)), fill=fg, font=font)
    y = 44
    while y < h - 40:
        if rng.random() < 0.25:  # a button
            x = sidebar + int(rng.integers(20, 200))
            draw.rounded_rectangle((x, y, x + int(rng.integers(60, 140)), y + 26), radius=6, fill=accent)
            y += 40
        else:
            draw.text((sidebar + 20, y), " ".join(rng.choice(_WORDS, int(rng.integers(3, 10)))), fill=fg, font=font)
            y += 22
    return im


def _generated(seed: int, size: int, per_set: int) -> dict[str, list[Image.Image]]:
    rng = np.random.default_rng(seed)
    flat = [Image.new("RGB", (size, size), tuple(int(v) for v in c)) for c in (
        (0, 0, 255), (0, 90, 200), (255, 255, 255), (0, 0, 0), (128, 128, 128), (255, 0, 0), (0, 160, 0),
        (255, 220, 0), (220, 180, 160), (190, 140, 110), (120, 80, 60), (255, 192, 203))]
    flat += [Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
             for _ in range(max(0, per_set - len(flat)))]
    noise = []
    for i in range(per_set):
        kind = i % 3
        if kind == 0:
            a = rng.integers(0, 256, (size, size, 3))
        elif kind == 1:  # skin-toned gaussian noise
            a = rng.normal((200, 160, 140), 30, (size, size, 3))
        else:  # coloured blotches: low-resolution noise blown up
            a = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).resize(
                (size, size), Image.Resampling.BICUBIC), dtype="float64")
        noise.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    tiny = []
    for _ in range(per_set):
        side = int(rng.integers(4, 17))  # a thumbnail of a few pixels, blown up by the resize
        tiny.append(Image.fromarray(rng.integers(0, 256, (side, side, 3)).astype(np.uint8)))
    return {"flat colours": flat[:per_set] if per_set >= len(flat) else flat,
            "noise": noise,
            "text": [_text_page(rng, size) for _ in range(per_set)],
            "tiny images": tiny,
            "screenshots": [_screenshot(rng, size) for _ in range(per_set)]}


def reference_outliers(*, size: int = 224, seed: int = 0, per_set: int = 12) -> dict[str, np.ndarray]:
    """Non-dermoscopic images by set, each an array (n, size, size, 3) of float32 0..255.

    Sets: photographs (scikit-learn, matplotlib and, when installed, scikit-image samples, each
    whole and as four quadrant crops), other medical images (scikit-image's retina and
    immunohistochemistry, when installed), textures, pages of text (scanned pages from
    scikit-image plus pages drawn with Pillow), flat colours, noise, tiny images and
    screenshot-like UI pictures. Deterministic for a given `seed` and installed packages;
    empty sets are left out.
    """
    if size < 8 or per_set < 1:
        raise SkinclfError(f"reference outliers need size >= 8 and per_set >= 1 (got {size}, {per_set})")
    packaged = _package_photographs()
    generated = _generated(seed, size, per_set)
    sets: dict[str, list[Image.Image]] = {
        "photographs": [c for im in packaged["photographs"] for c in _with_crops(im)],
        "other medical images": [c for im in packaged["other medical images"] for c in _with_crops(im)],
        "textures": [c for im in packaged["textures"] for c in _with_crops(im)],
        "text": packaged["pages"] + generated["text"],
        "flat colours": generated["flat colours"],
        "noise": generated["noise"],
        "tiny images": generated["tiny images"],
        "screenshots": generated["screenshots"],
    }
    return {name: np.stack([_square(im, size) for im in images]) for name, images in sets.items() if images}


def describe_sets(sets: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Images per set, for reports."""
    return {name: int(len(v)) for name, v in sets.items()}


def outlier_logits(logits_fn: Callable[[np.ndarray], np.ndarray], sets: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `logits_fn` (e.g. `engine.logits`) over every set."""
    return {name: np.asarray(logits_fn(images)) for name, images in sets.items()}
