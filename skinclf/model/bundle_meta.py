"""Reading a model's metadata without Keras: the `.keras` bundle's `skinclf.json` member, and
checking any metadata (a bundle's or the same JSON carried by an exported `.onnx`, read in
`onnx_meta`) before an engine or command relies on it. The light install needs only this."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from skinclf.errors import SkinclfError

BUNDLE_FORMAT = "skinclf-bundle/1"
META_MEMBER = "skinclf.json"
MIN_SIZE, MAX_SIZE = 8, 4096  # input sizes a metadata may name (pixels per side)
_OBJECTS = ("export", "data", "metrics", "calibration", "post_hoc", "versions")  # read with .get(...)


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


def _bad(path: Path, field: str, value: Any, expected: str) -> SkinclfError:
    shown = json.dumps(value)[:80] if not isinstance(value, type) else value.__name__
    return SkinclfError(f"{path}: its {META_MEMBER} metadata has {field} {shown}; expected {expected}")


def check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """`meta` if it has the form every engine and command relies on; otherwise one
    SkinclfError naming the model file, the field, its value and the expected form.
    Every path that reads a model's metadata (bundle, ONNX, any engine) goes through here."""
    from skinclf.model.outlier import SCORES

    if not isinstance(meta, dict):
        raise SkinclfError(f"{path}: its {META_MEMBER} metadata is a JSON {type(meta).__name__}, expected a JSON "
                           "object with classes and input_size")
    for key in ("classes", "input_size"):
        if key not in meta:
            raise SkinclfError(f"{path}: its {META_MEMBER} metadata has no {key}")
    classes, size = meta["classes"], meta["input_size"]
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(map(str, classes))) != len(classes)
            or not all(isinstance(c, str) and c.strip() for c in classes)):
        raise _bad(path, "classes", classes, "a list of two or more distinct class names")
    if (not isinstance(size, list) or len(size) != 2 or size[0] != size[1]
            or not all(isinstance(n, int) and not isinstance(n, bool) and MIN_SIZE <= n <= MAX_SIZE for n in size)):
        raise _bad(path, "input_size", size, f"[N, N] with N a whole number from {MIN_SIZE} to {MAX_SIZE}")
    ood = meta.get("ood")
    if ood and (not isinstance(ood, dict) or ood.get("score", "energy") not in SCORES
                or not isinstance(ood.get("threshold"), (int, float)) or isinstance(ood.get("threshold"), bool)):
        raise _bad(path, "ood", ood, f"an object with a numeric threshold (and score: one of {', '.join(SCORES)})")
    for key in _OBJECTS:
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise _bad(path, key, meta[key], "a JSON object")
    if not isinstance(meta.get("name", ""), str):
        raise _bad(path, "name", meta["name"], "a text")
    return meta


def check_graph(path: Path, meta: dict[str, Any], *, outputs: Any, input_shape: Any) -> None:
    """The network itself agrees with its metadata: one output per class, and the input size
    (where the graph fixes it). `outputs` is the graph's class count, `input_shape` its
    (height, width) with None for a dynamic side."""
    n = len(meta["classes"])
    if isinstance(outputs, int) and outputs != n:  # a dynamic (named) dimension cannot be checked
        raise SkinclfError(f"{path}: the network has {outputs} outputs but its {META_MEMBER} metadata names {n} "
                           f"classes ({', '.join(meta['classes'])}); expected one output per class")
    size = meta["input_size"][0]
    fixed = [d for d in input_shape if isinstance(d, int)]
    if any(d != size for d in fixed):
        raise SkinclfError(f"{path}: the network takes {'x'.join(map(str, input_shape))} images but its "
                           f"{META_MEMBER} metadata says input_size {meta['input_size']}; expected the same size")


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
    if isinstance(meta, dict) and meta.get("format") != BUNDLE_FORMAT:
        raise SkinclfError(f"{path} has metadata of an unknown format ({meta.get('format')!r}, expected {BUNDLE_FORMAT})")
    return check_meta(meta, path)


