"""The policy that recognises skinclf's own outputs, so a command replaces only its own earlier
file (`files.check_replace`), never a user's file that happens to sit at the same path."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

# Each kind of output skinclf writes, and how an earlier one is recognised by its content (never
# by its name alone: `--out scan.jpg` names an image, whatever the user meant). MODEL is never
# recognised: a model file took hours to make, so replacing one always needs --overwrite.
CSV, JSON, PNG, ONNX, MODEL = "predict CSV", "skinclf JSON report", "PNG picture", "skinclf ONNX export", "model"


def is_regular(path: Path) -> bool:
    """Whether `path` is a regular file (after links), checked without opening it: opening a FIFO
    for reading blocks until a writer comes, and a device may answer forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _head(path: Path, size: int = 64 * 1024) -> bytes:
    if not is_regular(path):
        return b""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


# The first bytes of each model format skinclf reads: a Keras 3 bundle is a zip, Keras 2 and
# weights are HDF5, a TensorFlow Lite file has "TFL3" after its 4-byte root offset, an ONNX file
# is a protobuf ModelProto that starts with field 1 (ir_version, a varint).
def looks_like_model(path: Path) -> bool:
    """Whether the existing file at `path` is a model by its content (never by its suffix)."""
    head = _head(path, 16)
    return (head.startswith(b"PK\x03\x04") or head.startswith(b"\x89HDF\r\n\x1a\n") or head[4:8] == b"TFL3"
            or (head[:1] == b"\x08" and len(head) > 2 and head[1] < 0x80 and head[2:3] in (b"\x12", b"\x1a", b"\x22",
                                                                                           b"\x3a", b"\x42")))


def _is_predict_csv(path: Path) -> bool:
    # Parsed as CSV: skinclf quotes every cell (formula guard), older versions did not.
    line = _head(path).split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    first = next(csv.reader([line]), [])
    return first[:1] == ["path"] and "error" in first


def _is_skinclf_json(path: Path) -> bool:
    if not is_regular(path):
        return False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    for candidate in (text, text.split("\n", 1)[0]):  # a JSON document, or JSON lines (a run record)
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        return isinstance(data, dict) and ("model" in data or "skinclf" in data)
    return False


def _is_skinclf_onnx(path: Path) -> bool:
    # The bundle's metadata is stored under this key (see `skinclf.model.onnx_meta`).
    if not is_regular(path):
        return False
    try:
        with open(path, "rb") as fh:
            return b"skinclf.json" in fh.read()
    except OSError:
        return False


_RECOGNISE = {
    CSV: _is_predict_csv,
    JSON: _is_skinclf_json,
    # A picture skinclf drew carries a "Software: skinclf" text chunk: never a patient's PNG image.
    PNG: lambda path: _head(path, 8) == b"\x89PNG\r\n\x1a\n" and b"skinclf" in _head(path, 4096),
    ONNX: _is_skinclf_onnx,
    MODEL: lambda path: False,
}


def is_own_output(path: Path, kind: str) -> bool:
    """Whether the existing file at `path` is an earlier skinclf output of `kind`."""
    return _RECOGNISE[kind](Path(path))
