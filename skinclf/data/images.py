"""Decoding image files into model-ready arrays, whatever the file turns out to be.

One function (`load_image`) serves training, evaluation and prediction, so that every path
into the model resizes and converts images the same way. A file that cannot be decoded raises
`ImageError` with a one-line reason; callers turn it into a row with an error (predict) or a
clear message (train), never a traceback.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})  # .dcm: skinclf.dicom

# The only Pillow decoders a file ever reaches. Pillow picks a plugin by content, not by name, so
# without this list a PostScript file named lesion.jpg went to the EPS plugin and Ghostscript
# (and a crafted file to any of some forty decoders). Content in one of these four formats is
# read whatever its supported extension says (a PNG named .jpg is a PNG): the four are the same
# decoders a renamed file would reach anyway, and refusing a mislabelled image would lose a
# result without making anything safer. The extension only decides which is tried first.
DECODERS = ("JPEG", "PNG", "BMP", "TIFF")
_DECODER_OF = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
NOT_AN_IMAGE = "not a recognised image file (skinclf reads JPEG, PNG, BMP and TIFF only)"

# Dermatoscope cameras produce at most a few tens of megapixels; a header claiming more is a
# decompression bomb or a corrupt file, and decoding it could exhaust memory.
MAX_PIXELS = 80_000_000
# skinclf checks MAX_PIXELS itself, from the header that Image.open reads before decoding
# anything, with one message. Pillow's own check (a warning above 89 megapixels, an error above
# 179) is switched off once, here: its warning leaked to stderr, and silencing it per call with
# `warnings.catch_warnings` is not thread-safe, so decode threads gave one oversized file either
# of two messages from run to run.
Image.MAX_IMAGE_PIXELS = None

# An image whose shorter side is below this share of the model's input is mostly invented by
# the upscaling: its row carries a warning (see `size_warnings`).
MIN_SIDE_SHARE = 0.25

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class ImageError(Exception):
    """One file could not be turned into an image; the message is a one-line reason."""


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension (any case) is a supported image format."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def decoders_for(name: str | Path | None) -> list[str]:
    """The decoders `open_image` lets Pillow try for a file called `name`, likeliest first."""
    first = _DECODER_OF.get(Path(name).suffix.lower()) if name else None
    return [first, *(d for d in DECODERS if d != first)] if first else list(DECODERS)


def open_image(source: Path | str | BinaryIO, name: str | Path | None = None) -> Image.Image:
    """`Image.open` limited to JPEG, PNG, BMP and TIFF: the one way skinclf opens an image
    file. Raises PIL.UnidentifiedImageError for anything else (PostScript, GIF, WebP, ...)."""
    if name is None and isinstance(source, (str, Path)):
        name = source
    return Image.open(source, formats=decoders_for(name))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode (grayscale, palette, alpha, CMYK, 16-bit) to 8-bit RGB."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(im, dtype=np.float32)
        if a.size and a.max() > 255:
            a = a / 257.0  # 16-bit range onto 8 bits
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Drop transparency by compositing on black, the background of dermoscopy images.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _draft_factor(image_size: tuple[int, int], size: int) -> int:
    """The reduction PIL's JPEG `draft` picks: the largest of 1, 2, 4, 8 keeping both sides >= size."""
    scale = min(image_size[0] // size, image_size[1] // size)
    return next((f for f in (8, 4, 2) if f <= scale), 1)


def _decode(im: Image.Image, size: int) -> np.ndarray:
    is_jpeg = im.format == "JPEG"
    if is_jpeg:
        im.draft("RGB", (size, size))
    im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    if not is_jpeg:
        # Shrink other formats by the factor JPEG's DCT scaling uses, so the same picture as
        # PNG or JPEG reaches the model as (nearly) the same pixels.
        factor = _draft_factor(im.size, size)
        if factor > 1:
            im = im.reduce(factor)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def size_warnings(width: int, height: int, size: int) -> list[str]:
    """Warnings for an image too small for a model whose input is `size` x `size` pixels."""
    if min(width, height) >= size * MIN_SIDE_SHARE:
        return []
    return [f"image is {width}x{height} pixels, far below the model's {size}x{size} input: the result is unreliable"]


def page_warnings(pages: int) -> list[str]:
    """A file of several pages (a multi-page TIFF) is classified on its first page only: say so."""
    if pages <= 1:
        return []
    return [f"file has {pages} pages: only page 1 was classified (check the others separately)"]


def load_image(path: Path | str, size: int, *, notes: list[str] | None = None) -> np.ndarray:
    """Decode `path` into a `(size, size, 3)` uint8 RGB array.

    EXIF orientation is applied; every mode becomes RGB; the whole image is resized (not
    cropped) to `size` x `size` with antialiased bilinear filtering. JPEGs are decoded at a
    reduced scale first where the format allows (DCT scaling), which is several times faster
    for full-size photographs and still leaves at least `size` pixels on each side.

    Raises ImageError for empty, truncated, corrupt, unreadable, non-image or oversized files.
    With `notes`, appends warnings about an image the model cannot judge well (far too small).
    """
    path = Path(path)
    try:
        empty = path.stat().st_size == 0
    except Exception as exc:  # noqa: BLE001 - reported like any other unreadable file
        raise _image_error(exc) from None
    if empty:
        raise ImageError("empty file (0 bytes)")
    return _open_and_decode(path, size, notes, path.name)


def decode_image(data: bytes, size: int, *, notes: list[str] | None = None, name: str | None = None) -> np.ndarray:
    """`load_image` for a file held in memory (an upload called `name`): the same checks,
    decoders, decoding and resizing, byte for byte, without the bytes ever touching the disk."""
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    return _open_and_decode(io.BytesIO(data), size, notes, name)


def _open_and_decode(source: Path | BinaryIO, size: int, notes: list[str] | None, name: str | None) -> np.ndarray:
    """The one path behind `load_image` and `decode_image`: header checks, then `_decode`."""
    from skinclf.dicom.read import DICOM_EXTENSIONS  # --- issue 32: DICOM by name; by content below ---

    if name is not None and Path(name).suffix.lower() in DICOM_EXTENSIONS:
        return _decode_dicom(source, size, notes)
    try:
        with open_image(source, name) as im:  # reads the header only
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"image too large ({width}x{height} pixels; the limit is {MAX_PIXELS:,})")
            if notes is not None:
                notes += size_warnings(width, height, size) + page_warnings(getattr(im, "n_frames", 1))
            return _decode(im, size)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        if _is_dicom_content(source):  # issue 32: the DICM preamble, whatever the name
            return _decode_dicom(source, size, notes)
        raise _image_error(exc) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file error
        raise _image_error(exc) from None


# --- issue 32: DICOM --------------------------------------------------------------------------
def _is_dicom_content(source: Path | BinaryIO) -> bool:
    from skinclf.dicom.read import is_dicom

    if hasattr(source, "seek"):
        source.seek(0)
    return is_dicom(source, "")


def _decode_dicom(source: Path | BinaryIO, size: int, notes: list[str] | None) -> np.ndarray:
    """A DICOM image through the same `_decode` as any file: its encapsulated JPEG as a JPEG
    (same decoder, same DCT scaling), its uncompressed RGB pixels as a PNG's would be."""
    from skinclf.dicom.read import DicomError, read_dicom

    try:
        image = read_dicom(source, max_pixels=MAX_PIXELS)
    except DicomError as exc:
        raise ImageError(str(exc)) from None
    if notes is not None:
        notes += size_warnings(image.width, image.height, size)
    try:
        if image.jpeg is not None:
            with Image.open(io.BytesIO(image.jpeg), formats=["JPEG"]) as im:
                return _decode(im, size)
        return _decode(Image.fromarray(image.pixels, "RGB"), size)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file error
        raise _image_error(exc) from None
# --- end issue 32 ------------------------------------------------------------------------------


def _image_error(exc: BaseException) -> ImageError:
    """A one-line ImageError for whatever opening or decoding a file raised."""
    if isinstance(exc, FileNotFoundError):
        return ImageError("file not found")
    if isinstance(exc, PermissionError):
        return ImageError("permission denied")
    if isinstance(exc, IsADirectoryError):
        return ImageError("is a directory")
    if isinstance(exc, UnidentifiedImageError):
        return ImageError(NOT_AN_IMAGE)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError(f"image too large ({exc})")
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return ImageError(f"cannot decode image: {reason}")
