"""Reading a model's metadata without Keras: the `.keras` bundle's `skinclf.json` member, or the
same JSON carried by an exported `.onnx`. The light install (no TensorFlow) needs only this."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from skinclf.errors import SkinclfError

BUNDLE_FORMAT = "skinclf-bundle/1"
META_MEMBER = "skinclf.json"


class ModelInfo:
    """What a loaded model says about itself, from its metadata (`meta`, `path`, `sha256`)."""

    meta: dict[str, Any]
    path: Path
    sha256: str

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def image_size(self) -> int:
        return int(self.meta["input_size"][0])

    def identity(self) -> dict[str, Any]:
        """What identifies this model in reports, CSV sidecars and the web page."""
        return {"path": str(self.path), "sha256": self.sha256, "name": self.meta.get("name", Path(self.path).stem),
                "created": self.meta.get("created"), "classes": self.classes, "input_size": self.meta["input_size"]}


def read_model_meta(path: Path) -> dict[str, Any]:
    """The metadata of a `.keras` bundle or of its `.onnx` export."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from skinclf.model.onnx_meta import read_meta, session

        return read_meta(session(path, threads=1), path)
    return read_bundle_meta(path)


def read_bundle_meta(path: Path) -> dict[str, Any]:
    """The metadata of a bundle, read without loading Keras weights."""
    path = Path(path)
    if not path.is_file():
        raise SkinclfError(f"model file not found: {path}")
    with open(path, "rb") as fh:
        legacy = fh.read(8) == b"\x89HDF\r\n\x1a\n"
    if legacy:
        raise SkinclfError(f"{path} is a legacy Keras 2 .h5 file; skinclf needs a .keras bundle from `skinclf train` "
                           "(which carries the class names and preprocessing)")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read(META_MEMBER))
    except KeyError:
        raise SkinclfError(f"{path} is a Keras model but not a skinclf bundle (no {META_MEMBER})") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SkinclfError(f"{path} is not a valid model file (corrupt or truncated: {exc})") from None
    if meta.get("format") != BUNDLE_FORMAT or "classes" not in meta or "input_size" not in meta:
        raise SkinclfError(f"{path} has metadata of an unknown format ({meta.get('format')!r}, expected {BUNDLE_FORMAT})")
    return meta


