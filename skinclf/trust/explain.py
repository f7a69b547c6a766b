"""`skinclf explain`: a heat map of what drove each image's top class, beside its top-k bars.

Occlusion sensitivity (Zeiler & Fergus, 2014): a patch of the model-sized image is covered
(by a blurred copy of itself by default, or mid grey or the image's mean colour), the patch
slides over the image, and the drop in the top class's probability is averaged over the
patches covering each pixel. Forward passes only, batched through `engine(images)`, so it
works with every engine (Keras, ONNX) and any callable that maps an image batch to
probabilities. A map is a guide to where the model looked, not a proof of why.

Each picture is written as `<out>/<name>.png`: the image, the map over the image (both at the
image's own size, up to `max_side`), and the top-k probabilities; `explain.json` lists them.
A map whose largest drop is below `FLAT_DROP` is flat: nothing covered moves the top class, so
it is not painted (its colours would only be noise stretched to the full scale) and the
picture says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps, PngImagePlugin

from skinclf import ui
from skinclf.checks import at_least
from skinclf.config import EXPLAIN, ExplainConfig
from skinclf.data.images import ImageError, load_image
from skinclf.data.walk import walk_images
from skinclf.errors import SkinclfError
from skinclf.files import atomic_path, atomic_write_json, check_output_dir, check_output_files
from skinclf.own_outputs import JSON, PNG

FILLS = ("blur", "grey", "mean")
# Marks a picture as skinclf's, so a later run may replace it and nothing else (`files.check_replace`).
_MARKER = PngImagePlugin.PngInfo()
_MARKER.add_text("Software", "skinclf")
GAP = 6  # pixels between panels
BAR_PANEL = 260
FLAT_DROP = 0.05  # below this largest drop of p(top class), a map says nothing: it is reported flat


@dataclass
class Explained:
    """One explained image."""

    path: str
    png: Path
    top: list[tuple[str, float]]
    peak: tuple[float, float]  # where the map is highest, (row, column) as shares of height and width
    max_drop: float  # the largest mean drop of the top class's probability
    panel_size: tuple[int, int]  # (width, height) of the image and map panels
    unlike_training: bool | None = None  # None: the model has no fitted OOD flag; True: either tier
    flat: bool = False
    warnings: list[str] = field(default_factory=list)  # predict's warning cell for this image, as a list  # max_drop < FLAT_DROP: no region matters; the map is not painted


@dataclass
class ExplainSummary:
    """What an explain run did."""

    out: Path
    explained: list[Explained] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def _positions(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)  # cover the last rows and columns too
    return starts


def _filled(image: np.ndarray, fill: str, patch: int) -> np.ndarray:
    if fill == "grey":
        return np.full_like(image, 128.0)
    if fill == "mean":
        return np.broadcast_to(image.mean(axis=(0, 1)), image.shape).astype(image.dtype)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=patch / 2)), dtype=image.dtype)


def occlusion_map(
    engine: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    *,
    target: int | None = None,
    patch: int = EXPLAIN.patch,
    stride: int = EXPLAIN.stride,
    fill: str = EXPLAIN.fill,
    chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Occlusion sensitivity of one (size, size, 3) image: the map (size, size) of the mean drop
    of class `target`'s probability (default: the top class) when a patch covers each pixel, and
    the image's own probabilities."""
    if fill not in FILLS:
        raise SkinclfError(f"--fill {fill!r}: choose one of {', '.join(FILLS)}")
    image = np.asarray(image, dtype="float32")
    size = image.shape[0]
    if image.shape != (size, size, 3):
        raise SkinclfError(f"occlusion needs a square RGB image, got shape {image.shape}")
    if not 1 <= stride <= patch <= size:
        raise SkinclfError(f"--patch {patch} / --stride {stride}: need 1 <= stride <= patch <= {size} (the input size)")
    probs = np.asarray(engine(image[None]))[0]
    target = int(np.argmax(probs)) if target is None else target
    cover = _filled(image, fill, patch)
    boxes = [(y, x) for y in _positions(size, patch, stride) for x in _positions(size, patch, stride)]
    drops = np.empty(len(boxes))
    for start in range(0, len(boxes), chunk):
        batch = np.repeat(image[None], len(boxes[start : start + chunk]), axis=0)
        for j, (y, x) in enumerate(boxes[start : start + chunk]):
            batch[j, y : y + patch, x : x + patch] = cover[y : y + patch, x : x + patch]
        drops[start : start + len(batch)] = probs[target] - np.asarray(engine(batch))[:, target]
    total = np.zeros((size, size))
    count = np.zeros((size, size))
    for (y, x), drop in zip(boxes, drops):
        total[y : y + patch, x : x + patch] += drop
        count[y : y + patch, x : x + patch] += 1
    return total / np.maximum(count, 1), probs


def _display_image(path: Path, max_side: int) -> Image.Image:
    """The file as a person sees it (EXIF orientation, RGB), shrunk to `max_side` if larger."""
    from skinclf.data.images import _to_rgb, open_image

    with open_image(path) as im:
        im.draft("RGB", (max_side, max_side))
        shown = _to_rgb(ImageOps.exif_transpose(im))
        if max(shown.size) > max_side:
            shown.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return shown.copy()


def _colour(heat: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["inferno"](heat)[..., :3] * 255


def label_font(size: int = 11) -> ImageFont.ImageFont:
    """DejaVu Sans, which ships with matplotlib (found without importing it): Pillow's built-in
    font gives a space 2 pixels wide at this size, so labels read as one word."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def render(shown: Image.Image, heat: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, top_k: int,
           max_drop: float, note: str = "") -> Image.Image:
    """The picture: [image | map over the image | top-k bars]; `heat` in 0..1 at any size."""
    w, h = shown.size
    m = np.asarray(Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR), dtype="float64") / 255
    base = np.asarray(shown, dtype="float64")
    alpha = (0.15 + 0.7 * m)[..., None]
    overlay = Image.fromarray((base * (1 - alpha) + _colour(m) * alpha).clip(0, 255).astype(np.uint8))
    height = max(h, 150)
    canvas = Image.new("RGB", (2 * w + 2 * GAP + BAR_PANEL, height), (255, 255, 255))
    canvas.paste(shown, (0, 0))
    canvas.paste(overlay, (w + GAP, 0))
    draw = ImageDraw.Draw(canvas)
    draw.font = label_font()
    x0 = 2 * w + 2 * GAP + 6
    order = np.argsort(-probs, kind="stable")[:top_k]
    draw.text((x0, 4), f"map: drop in p({classes[order[0]]})", fill=(0, 0, 0))
    draw.text((x0, 18), f"when covered (max {max_drop:.2f})", fill=(0, 0, 0))
    y = 40
    for i in order:
        draw.text((x0, y), f"{classes[i]} {probs[i]:.2f}", fill=(0, 0, 0))
        draw.rectangle((x0 + 80, y + 2, x0 + 80 + int(160 * float(probs[i])), y + 11), fill=(70, 110, 180))
        y += 18
    for line in [n for n in note.split("\n") if n]:
        draw.text((x0, y + 6), line, fill=(190, 30, 30))
        y += 20
    draw.text((x0, min(height - 14, y + 10)), "not a diagnosis", fill=(120, 120, 120))
    return canvas


def _output_names(rel_paths: Sequence[str]) -> list[str]:
    stems = [Path(r).with_suffix("").as_posix().replace("/", "__") for r in rel_paths]
    taken = {s: stems.count(s) for s in stems}
    return [(s if taken[s] == 1 else f"{s}_{Path(r).suffix.lstrip('.').lower()}") + ".png"
            for s, r in zip(stems, rel_paths)]


def explain_files(
    engine: Any,
    files: Sequence[tuple[str, Path]],
    out: Path,
    *,
    top_k: int = EXPLAIN.top_k,
    patch: int = EXPLAIN.patch,
    stride: int = EXPLAIN.stride,
    fill: str = EXPLAIN.fill,
    max_side: int = EXPLAIN.max_side,
    show_progress: bool | None = None,
) -> ExplainSummary:
    """Explain `(name, path)` files with `engine` (a callable on image batches with `classes` and
    `image_size`; with `logits` and a fitted `meta["ood"]` the picture also says when an image is
    unlike the training images). Bad files are collected, not raised."""
    from skinclf.model.outlier import levels, tier_warning

    classes = list(engine.classes)
    if not 1 <= top_k <= len(classes):
        raise SkinclfError(f"--top-k {top_k}: must be 1..{len(classes)} (the model's classes: {', '.join(classes)})")
    at_least("--max-side", max_side, 16)
    ood = (getattr(engine, "meta", None) or {}).get("ood")
    out = Path(out)
    summary = ExplainSummary(out=out)
    names = _output_names([rel for rel, _ in files])
    with ui.progress(enabled=show_progress) as progress:
        task = progress.add_task("Explaining", total=len(files), rate="")
        for (rel, path), name in zip(files, names):
            size_notes: list[str] = []  # "far below the model's input", as predict and the page say
            try:
                x = load_image(path, engine.image_size, notes=size_notes).astype("float32")
                shown = _display_image(path, max_side)
            except Exception as exc:  # noqa: BLE001 - ImageError, or a file load_image took but display cannot
                reason = str(exc) if isinstance(exc, ImageError) else f"cannot decode image: {' '.join(str(exc).split())}"
                summary.errors.append((rel, reason))
                progress.console.print(ui.printable(f"{rel}: {reason}"), markup=False, highlight=False, soft_wrap=True)
                progress.update(task, advance=1)
                continue
            heat, probs = occlusion_map(engine, x, patch=patch, stride=stride, fill=fill)
            max_drop = float(heat.max())
            flat = max_drop < FLAT_DROP
            scaled = np.zeros_like(heat) if flat else np.clip(heat, 0, None) / max_drop
            level = None
            if ood and hasattr(engine, "forward"):
                level = _level(engine, x, ood)
            elif ood and hasattr(engine, "logits"):
                level = int(levels(engine.logits(x[None]), ood)[2][0])
            unlike = None if level is None else level > 0
            warnings = [*size_notes, *([tier_warning(level)] if level else [])]
            notes = [f"flat map: no region moves p(top) by {FLAT_DROP}" if flat else "", *warnings]
            picture = render(shown, scaled, probs, classes, top_k=top_k, max_drop=max_drop, note="\n".join(notes))
            target = out / name
            with atomic_path(target) as tmp:
                picture.save(tmp, format="PNG", optimize=True, pnginfo=_MARKER)
            peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
            order = np.argsort(-probs, kind="stable")[:top_k]
            summary.explained.append(Explained(
                path=rel, png=target, top=[(classes[i], round(float(probs[i]), 4)) for i in order],
                peak=(round((peak[0] + 0.5) / heat.shape[0], 4), round((peak[1] + 0.5) / heat.shape[1], 4)),
                max_drop=round(max_drop, 4), panel_size=shown.size, unlike_training=unlike, flat=flat,
                warnings=warnings))
            progress.update(task, advance=1)
    return summary


def _level(engine, x: np.ndarray, ood) -> int:
    """The OOD tier (0, 1 unusual, 2 very unlike) of one image from one forward pass (logits
    and, when given, features)."""
    from skinclf.model.outlier import levels

    logits, features = engine.forward(x[None])
    return int(levels(logits, ood, features)[2][0])


def list_inputs(source: Path) -> list[tuple[str, Path]]:
    """`(name, path)` of one image file, or of every image in a folder (recursive, sorted)."""
    source = Path(source)
    if source.is_file():
        from skinclf.own_outputs import PNG, is_own_output

        if is_own_output(source, PNG):
            raise SkinclfError(f"{source} is a picture skinclf drew (a heat map), not an image to explain")
        return [(source.name, source)]
    if not source.exists():
        raise SkinclfError(f"not found: {source} (give an image file or a folder of images)")
    walk = walk_images(source, recursive=True)
    # Folders that could not be read are entries too: they fail to load and are reported as bad.
    found = sorted((rel, source / rel) for rel in [*walk.files, *(p.path for p in walk.problems)])
    if not found:
        raise SkinclfError(f"no images in or below {source} (JPEG, PNG, BMP or TIFF; hidden files skipped)")
    return found


def explain_images(config: ExplainConfig | None = None, /, *, engine: str = "auto", show_progress: bool | None = None,
                   **settings: Any) -> ExplainSummary:
    """The `explain` command: a heat-map picture per image of `source` (a file or a folder) in
    `out`, and `explain.json` (`config`, or its fields as keywords; `engine`: auto, keras, onnx, ...).
    With `strict`, raises after writing if any file was bad."""
    from skinclf.engines.load import load_engine

    c = config if config is not None else ExplainConfig(**settings)
    if c.fill not in FILLS:
        raise SkinclfError(f"--fill {c.fill!r}: choose one of {', '.join(FILLS)}")
    check_output_dir(Path(c.out))  # before the model loads and the maps are computed
    files = list_inputs(c.source)
    # Never over a user's picture (e.g. --out the image folder itself), only over earlier maps.
    check_output_files(Path(c.out), {**dict.fromkeys(_output_names([rel for rel, _ in files]), PNG),
                                     "explain.json": JSON}, overwrite=c.overwrite)
    engine = load_engine(c.model, engine=engine, batch_size=c.batch_size)
    if not 1 <= c.stride <= c.patch <= engine.image_size:
        raise SkinclfError(f"--patch {c.patch} / --stride {c.stride}: need 1 <= stride <= patch <= "
                           f"{engine.image_size} (the model's input size)")
    summary = explain_files(engine, files, c.out, top_k=c.top_k, patch=c.patch, stride=c.stride, fill=c.fill,
                            max_side=c.max_side, show_progress=show_progress)
    atomic_write_json(Path(c.out) / "explain.json", {
        "model": engine.identity(),
        "method": {"name": "occlusion sensitivity", "patch": c.patch, "stride": c.stride, "fill": c.fill,
                   "input_size": engine.image_size,
                   "map": "mean drop of the top class's probability when a patch covering the pixel is occluded"},
        "images": [{**asdict(e), "png": e.png.name} for e in summary.explained],
        "errors": [{"path": p, "error": e} for p, e in summary.errors],
    })
    if c.strict and summary.errors:
        raise SkinclfError(f"{len(summary.errors)} of {len(files)} files could not be explained (listed above and in "
                           f"{Path(c.out) / 'explain.json'})")
    return summary
