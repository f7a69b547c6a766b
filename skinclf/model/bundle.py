"""The model bundle: one `.keras` file with its metadata member `skinclf.json` (save, load).

Loading checks the metadata before Keras sees the file (format, classes, input size) and refuses
Lambda layers, so a hostile bundle cannot run code.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from skinclf.backend import load_keras
from skinclf.errors import SkinclfError
from skinclf.files import atomic_path, sha256_file
from skinclf.model.bundle_meta import BUNDLE_FORMAT, META_MEMBER, ModelInfo, check_graph, read_bundle_meta

keras = load_keras()


@dataclass
class Bundle(ModelInfo):
    """A loaded model and its metadata."""

    model: Any
    meta: dict[str, Any]
    path: Path
    sha256: str = field(default="")


def save_bundle(model, path: Path, meta: dict[str, Any]) -> Path:
    """Save `model` (without optimizer state) and `meta` as one `.keras` file, atomically."""
    path = Path(path)
    if path.suffix != ".keras":
        raise SkinclfError(f"--out {path}: the model file must end in .keras")
    n_out = int(model.outputs[0].shape[-1])
    if n_out != len(meta["classes"]):
        raise SkinclfError(f"model has {n_out} outputs but {len(meta['classes'])} class names")
    meta = {"format": BUNDLE_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **meta}
    plain = keras.Model(model.inputs, model.outputs, name=model.name)  # uncompiled: no optimizer
    with atomic_path(path) as tmp:
        plain.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            zf.writestr(META_MEMBER, json.dumps(meta, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def load_bundle(path: Path) -> Bundle:
    """Load a bundle; any problem with the file is a one-line SkinclfError."""
    path = Path(path)
    meta = read_bundle_meta(path)
    # The bundle's custom layers (ShadesOfGray) are registered with Keras when their module is
    # imported; without it, loading fails with "Could not locate class 'ShadesOfGray'".
    import skinclf.model.network  # noqa: F401
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a partial load is a corrupt model
            model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - corrupt weights, wrong Keras version, ...
        reason = " ".join(str(exc).split())[:200]
        raise SkinclfError(f"cannot load model {path}: {reason}") from None
    check_graph(path, meta, outputs=model.outputs[0].shape[-1], input_shape=tuple(model.inputs[0].shape[1:3]))
    return Bundle(model=model, meta=meta, path=path, sha256=sha256_file(path))
