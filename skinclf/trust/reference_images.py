"""Reference outliers for the out-of-distribution flag: pictures that are not dermoscopy.

`reference_outliers` builds non-dermoscopic images from what installed packages ship
(scikit-learn's and matplotlib's sample photographs, an MRI slice and terrain maps,
scikit-image's `skimage.data` when installed) plus generated ones (flat colours, gradients,
noise, textures, text pages, charts, tiny images, screenshot-like UI), all resized to the
model's input like any real input.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from skinclf.data.images import open_image
from skinclf.errors import SkinclfError


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
