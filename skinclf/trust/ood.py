"""Out-of-distribution flags: "this image is unlike the training images".

A classifier names one of its classes for any picture, a landscape or a page of text included.
An out-of-distribution (OOD) score says how unlike the training images an input is; a
threshold fitted on held-out dermoscopic images (the validation split) so that `pass_rate`
(95%) of them pass flags the rest. Higher scores are more unusual. Candidates
(`skinclf.model.outlier`, computed in numpy from every engine's outputs):

- from the logits: `energy` (Liu et al. 2020), `max_logit` (Hendrycks et al. 2022), `max_prob`
  (Hendrycks & Gimpel 2017);
- from the pooled features of the same forward pass (`engine.forward`): `mahalanobis` (Lee et
  al. 2018: class means and a shared covariance of the training features) and
  `relative_mahalanobis` (Ren et al. 2021: minus the distance under one background Gaussian),
  fitted on the training split by `fit_feature_stats`.

`fit_ood` picks the candidate with the best (mean ROC-AUC + worst set's flag rate) / 2 between
the validation split and `reference_outliers()`, and records it in the bundle's metadata
(`meta["ood"]`) with its threshold, the flag rate on every set, every candidate's separation,
the feature statistics it needs and a logit-score fallback for engines without features.

`reference_outliers` builds non-dermoscopic images from what installed packages ship
(scikit-learn's and matplotlib's sample photographs, an MRI slice and terrain maps,
scikit-image's `skimage.data` when installed) plus generated ones (flat colours, gradients,
noise, textures, text pages, charts, tiny images, screenshot-like UI), all resized to the
model's input like any real input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from skinclf.data.images import open_image
from skinclf.errors import SkinclfError
from skinclf.model.outlier import (
    FEATURE_SCORES,
    LOGIT_SCORES,
    PASS_RATE,
    SCORES,
    WARNING,
    feature_scores,
    fit_gaussian,
    ood_scores,
)


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Probability that a random outlier scores above a random inlier (ties count half): the
    ROC-AUC of the outliers as positives (`metrics.roc_auc`); NaN when either side is empty."""
    from skinclf.metrics import roc_auc

    a, b = np.asarray(inliers, dtype="float64"), np.asarray(outliers, dtype="float64")
    if not len(a) or not len(b):
        return float("nan")
    return roc_auc(np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)], np.concatenate([a, b]))


# Principal components kept per covariance, the rest one shared variance (PPCA). On the bundled
# ensemble (2048-d features) ranks 64 and 256 separate validation from the reference outliers
# alike (mean ROC-AUC 0.9996 vs 0.9998); 64 keeps the stored statistics under 1 MB.
RANK = 64


def fit_feature_stats(features: np.ndarray, labels: np.ndarray, *, rank: int = RANK,
                      fitted_on: str = "training split") -> dict[str, Any]:
    """What the feature scores need, fitted on training features (n, d) and their labels: class
    means with the tied covariance (Lee et al.) and the background Gaussian of all features
    (Ren et al.), each covariance in low-rank form (`outlier.fit_gaussian`)."""
    f = np.asarray(features, dtype="float64")
    ok = np.isfinite(f).all(axis=1)
    if ok.sum() < 20:
        raise SkinclfError(f"{int(ok.sum())} readable training images are too few to fit feature statistics "
                           "(need at least 20)")
    return {"class": fit_gaussian(f[ok], np.asarray(labels)[ok], rank=rank),
            "background": fit_gaussian(f[ok], rank=rank), "width": int(f.shape[1]), "images": int(ok.sum()),
            "fitted_on": fitted_on}


def _scores(name: str, logits: np.ndarray, features: np.ndarray | None, stats: Mapping[str, Any] | None) -> np.ndarray:
    if name in FEATURE_SCORES:
        return feature_scores(features, stats, name)
    return ood_scores(logits, name)


def _candidate(name: str, inside: np.ndarray, outside: Mapping[str, np.ndarray], pass_rate: float) -> dict[str, Any]:
    """A score's separation: ROC-AUC per outlier set and flag rates at the `pass_rate` threshold."""
    inside = inside[np.isfinite(inside)]
    threshold = float(np.quantile(inside, pass_rate, method="higher"))
    per_set = {k: auroc(inside, v) for k, v in outside.items()}
    rates = {k: float(np.mean(v > threshold)) for k, v in outside.items()}
    mean = float(np.mean(list(per_set.values()))) if per_set else float("nan")
    worst = float(min(rates.values())) if rates else float("nan")
    return {"mean_auroc": mean, "auroc": per_set, "threshold": threshold, "flag_rates": rates,
            "worst_flag_rate": worst, "merit": (mean + worst) / 2}


def fit_ood(
    inlier_logits: np.ndarray,
    outlier_logits: Mapping[str, np.ndarray],
    *,
    pass_rate: float = PASS_RATE,
    score: str | None = None,
    fitted_on: str = "validation split",
    inlier_features: np.ndarray | None = None,
    outlier_features: Mapping[str, np.ndarray] | None = None,
    stats: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Choose the score that best separates inliers from the outlier sets and fit its threshold.

    Candidates: the logit scores, plus the feature scores when `stats` (`fit_feature_stats`) and
    the features of the inliers and every outlier set are given. The winner has the highest
    merit, (mean ROC-AUC over the outlier sets + the worst set's flag rate) / 2, each set
    weighing the same whatever its size, unless `score` names one; its threshold is the
    `pass_rate` quantile of the inliers' scores. Returns the record stored as `meta["ood"]`:
    score, threshold, flag rates on the inliers and on each outlier set, every candidate's
    separation, the feature statistics when a feature score wins, and a logit-score `fallback`
    for engines that give no features.
    """
    if not 0.5 <= pass_rate < 1:
        raise SkinclfError(f"pass rate {pass_rate}: must be in [0.5, 1), e.g. 0.95")
    inlier_logits = np.asarray(inlier_logits)
    if len(inlier_logits) < 20:
        raise SkinclfError(f"{len(inlier_logits)} images are too few to fit an OOD threshold (need at least 20)")
    with_features = stats is not None and inlier_features is not None and outlier_features is not None
    candidates = [score] if score else list(LOGIT_SCORES) + (list(FEATURE_SCORES) if with_features else [])
    if any(c in FEATURE_SCORES for c in candidates) and not with_features:
        raise SkinclfError(f"OOD score {score!r} needs the model's features and training statistics")
    sets = [k for k, v in outlier_logits.items() if len(v)]
    separation = {}
    for name in candidates:
        inside = _scores(name, inlier_logits, inlier_features, stats)
        outside = {k: _scores(name, outlier_logits[k], (outlier_features or {}).get(k), stats) for k in sets}
        separation[name] = _candidate(name, inside, outside, pass_rate)
    chosen = score or max(candidates, key=lambda n: (np.nan_to_num(separation[n]["merit"], nan=-1.0),
                                                     -candidates.index(n)))
    record = _record(chosen, separation[chosen], inlier_logits, inlier_features, stats, fitted_on, sets, outlier_logits)
    record.update(pass_rate=pass_rate, fitted_on=fitted_on, separation=_rounded(separation), warning=WARNING,
                  chosen_by="highest (mean ROC-AUC over the outlier sets + worst set's flag rate) / 2, "
                            f"threshold passing {pass_rate:.0%} of the {fitted_on}")
    if chosen in FEATURE_SCORES:
        logit_only = max(LOGIT_SCORES, key=lambda n: np.nan_to_num(
            separation.get(n, {}).get("merit", np.nan), nan=-1.0))
        fallback = separation.get(logit_only) or _candidate(
            logit_only, ood_scores(inlier_logits, logit_only),
            {k: ood_scores(outlier_logits[k], logit_only) for k in sets}, pass_rate)
        record["fallback"] = {"score": logit_only, "formula": SCORES[logit_only], "threshold": fallback["threshold"],
                              "flag_rates": fallback["flag_rates"], "why": "engines without a features output"}
    return record


def _record(chosen, best, inlier_logits, inlier_features, stats, fitted_on, sets, outlier_logits) -> dict[str, Any]:
    inside = _scores(chosen, inlier_logits, inlier_features, stats)
    counts = {fitted_on: int(np.isfinite(inside).sum()), **{k: len(outlier_logits[k]) for k in sets}}
    rates = {fitted_on: float(np.mean(inside[np.isfinite(inside)] > best["threshold"])), **best["flag_rates"]}
    record = {"score": chosen, "formula": SCORES[chosen], "threshold": best["threshold"], "flag_rates": rates,
              "counts": counts}
    if chosen in FEATURE_SCORES:  # only what the chosen score reads: the bundle stays small
        record["features"] = {k: v for k, v in stats.items() if k != "background" or chosen == "relative_mahalanobis"}
    return record


def _rounded(separation: Mapping[str, Any]) -> dict[str, Any]:
    """Every candidate's figures, without the per-candidate thresholds' noise digits."""
    return {name: {"mean_auroc": round(c["mean_auroc"], 4), "worst_flag_rate": round(c["worst_flag_rate"], 4),
                   "merit": round(c["merit"], 4), "auroc": {k: round(v, 4) for k, v in c["auroc"].items()},
                   "flag_rates": {k: round(v, 4) for k, v in c["flag_rates"].items()}}
            for name, c in separation.items()}


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
    charts: list[Image.Image] = []
    try:
        samples = _matplotlib_samples()
        photos += samples["photographs"]
        medical += samples["other medical images"]
        charts += samples["charts"]
    except Exception:  # noqa: BLE001 - optional source
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
    return {"photographs": photos, "other medical images": medical, "textures": textures, "pages": pages,
            "charts": charts}


def _matplotlib_samples() -> dict[str, list[Image.Image]]:
    """matplotlib's sample data: a portrait and an object photograph, an MRI slice, terrain maps."""
    import gzip

    import matplotlib
    from matplotlib import colormaps

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    out: dict[str, list[Image.Image]] = {"photographs": [], "other medical images": [], "charts": []}
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        if (folder / name).is_file():
            with open_image(folder / name) as im:
                out["photographs"].append(im.convert("RGB"))
    if (folder / "s1045.ima.gz").is_file():  # a 256 x 256 16-bit MRI slice
        mri = np.frombuffer(gzip.decompress((folder / "s1045.ima.gz").read_bytes()), "<u2").reshape(256, 256)
        out["other medical images"].append(Image.fromarray((mri / max(mri.max(), 1) * 255).astype(np.uint8)))
    for name, key in (("topobathy.npz", "topo"), ("jacksboro_fault_dem.npz", "elevation")):
        if (folder / name).is_file():
            with np.load(folder / name) as data:
                z = np.asarray(data[key], dtype="float64")
            z = (z - z.min()) / max(np.ptp(z), 1e-9)
            for cmap in ("terrain", "viridis", "gist_earth"):
                out["charts"].append(Image.fromarray((colormaps[cmap](z)[..., :3] * 255).astype(np.uint8)))
    return out


def _plot(rng: np.random.Generator, size: int) -> Image.Image:
    """A line or bar chart drawn with Pillow: axes, ticks, a legend box, coloured series."""
    w, h = max(size * 2, 320), max(int(size * 1.5), 240)  # drawn at a chart's size, resized like any input
    im = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    left, bottom = 40, h - 30
    draw.line((left, 10, left, bottom), fill=(0, 0, 0), width=2)
    draw.line((left, bottom, w - 10, bottom), fill=(0, 0, 0), width=2)
    for t in range(left, w - 10, 40):
        draw.line((t, bottom, t, bottom + 5), fill=(0, 0, 0))
    for _ in range(int(rng.integers(1, 4))):
        colour = tuple(int(v) for v in rng.integers(0, 220, 3))
        ys = bottom - np.cumsum(rng.normal(0, 8, 30)) - rng.uniform(40, bottom - 40)
        ys = np.clip(ys, 12, bottom - 2)
        xs = np.linspace(left + 2, w - 12, 30)
        if rng.random() < 0.5:
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
        else:
            for x, y in zip(xs[::3], ys[::3]):
                draw.rectangle((x, y, x + 8, bottom - 1), fill=colour)
    draw.rectangle((w - 110, 15, w - 15, 50), outline=(0, 0, 0))
    draw.text((w - 105, 20), str(rng.choice(_WORDS)), fill=(0, 0, 0), font=_font(12))
    return im


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    """A linear or radial blend of two colours (skin tones among them)."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if rng.random() < 0.3:
        a = np.array([int(rng.integers(180, 240)), int(rng.integers(130, 190)), int(rng.integers(110, 170))])
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
    else:
        t = np.hypot(xx - rng.uniform(0.2, 0.8), yy - rng.uniform(0.2, 0.8))
    t = (t - t.min()) / max(np.ptp(t), 1e-9)
    return Image.fromarray((a * (1 - t[..., None]) + b * t[..., None]).astype(np.uint8))


def _texture(rng: np.random.Generator, size: int) -> Image.Image:
    """Generated textures: stripes, checks, fractal (1/f) noise, bricks and fabric-like weaves."""
    kind = int(rng.integers(0, 5))
    yy, xx = np.mgrid[0:size, 0:size].astype("float64")
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if kind == 0:  # stripes
        t = (np.sin((xx * np.cos(rng.uniform(0, 3)) + yy * np.sin(rng.uniform(0, 3))) / rng.uniform(2, 12)) > 0)
    elif kind == 1:  # checks
        cell = int(rng.integers(4, 32))
        t = ((xx // cell + yy // cell) % 2).astype(bool)
    elif kind == 2:  # fractal noise: white noise with a 1/f spectrum
        spectrum = np.fft.fft2(rng.normal(size=(size, size)))
        f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
        t = np.real(np.fft.ifft2(spectrum / np.maximum(f, 1 / size) ** rng.uniform(1.0, 2.0)))
        t = (t - t.min()) / max(np.ptp(t), 1e-9)
        return Image.fromarray((c1 * (1 - t[..., None]) + c2 * t[..., None]).astype(np.uint8))
    elif kind == 3:  # bricks
        bh, bw = int(rng.integers(8, 24)), int(rng.integers(16, 48))
        row = yy // bh
        t = ((yy % bh) < 2) | (((xx + (row % 2) * bw // 2) % bw) < 2)
    else:  # a weave
        p = int(rng.integers(3, 10))
        t = ((np.sin(xx * np.pi / p) * np.sin(yy * np.pi / p)) > 0)
    a = np.where(t[..., None], c1, c2) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


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
            "gradients": [_gradient(rng, size) for _ in range(per_set)],
            "textures": [_texture(rng, size) for _ in range(per_set)],
            "charts": [_plot(rng, size) for _ in range(per_set)],
            "noise": noise,
            "text": [_text_page(rng, size) for _ in range(per_set)],
            "tiny images": tiny,
            "screenshots": [_screenshot(rng, size) for _ in range(per_set)]}


def reference_outliers(*, size: int = 224, seed: int = 0, per_set: int = 24) -> dict[str, np.ndarray]:
    """Non-dermoscopic images by set, each an array (n, size, size, 3) of float32 0..255.

    Sets: photographs (scikit-learn, matplotlib and, when installed, scikit-image samples, each
    whole and as four quadrant crops), other medical images (matplotlib's MRI slice, and
    scikit-image's retina and immunohistochemistry when installed), textures (scikit-image's,
    plus generated stripes, checks, fractal noise, bricks, weaves), pages of text (scanned pages
    from scikit-image plus pages drawn with Pillow), charts (matplotlib's terrain maps in three
    colour maps, generated line and bar charts), flat colours, gradients, noise, tiny images and
    screenshot-like UI pictures. Every picture is drawn or loaded at its own size and resized
    to `size` as `images.load_image` resizes real inputs, so no set stands out by size alone.
    Deterministic for a given `seed` and installed packages; empty sets are left out.
    """
    if size < 8 or per_set < 1:
        raise SkinclfError(f"reference outliers need size >= 8 and per_set >= 1 (got {size}, {per_set})")
    packaged = _package_photographs()
    generated = _generated(seed, size, per_set)
    sets: dict[str, list[Image.Image]] = {
        "photographs": [c for im in packaged["photographs"] for c in _with_crops(im)],
        "other medical images": [c for im in packaged["other medical images"] for c in _with_crops(im)],
        "textures": [c for im in packaged["textures"] for c in _with_crops(im)] + generated["textures"],
        "text": packaged["pages"] + generated["text"],
        "flat colours": generated["flat colours"],
        "noise": generated["noise"],
        "tiny images": generated["tiny images"],
        "screenshots": generated["screenshots"],
        "charts": packaged["charts"] + generated["charts"],
        "gradients": generated["gradients"],
    }
    return {name: np.stack([_square(im, size) for im in images]) for name, images in sets.items() if images}


def describe_sets(sets: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Images per set, for reports."""
    return {name: len(v) for name, v in sets.items()}


def outlier_logits(logits_fn: Callable[[np.ndarray], np.ndarray], sets: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `logits_fn` (e.g. `engine.logits`) over every set."""
    return {name: np.asarray(logits_fn(images)) for name, images in sets.items()}


def outlier_outputs(engine, sets: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Logits and pooled features (None when the engine gives none) of every set, one pass each."""
    logits, features = {}, {}
    for name, images in sets.items():
        logits[name], features[name] = engine.forward(images)
    return logits, (features if all(f is not None for f in features.values()) else None)
