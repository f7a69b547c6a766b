"""The ONNX Runtime engine: a `.onnx` written by `skinclf export`, no TensorFlow needed.

The file carries the bundle's whole metadata (one `metadata_props` entry, key `skinclf.json`),
so it needs nothing beside it. Imports only numpy and onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from skinclf.engines import Engine
from skinclf.errors import SkinclfError
from skinclf.files import sha256_file
from skinclf.parallel import usable_cpus

META_KEY = "skinclf.json"
INSTALL_HINT = 'pip install "skinclf"  (or: pip install onnxruntime)'


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def session(path: Path | bytes, *, threads: int | None = None):
    """An ONNX Runtime CPU session on `threads` intra-op threads (default: the usable CPUs)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SkinclfError(f"the ONNX engine needs ONNX Runtime, which is not installed: {INSTALL_HINT}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Do not busy-wait between batches: decode threads need those cycles on a small machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or not ONNX at all
        reason = " ".join(str(exc).split())[:200]
        raise SkinclfError(f"cannot load ONNX model {path}: {reason}") from None


def read_meta(sess, path: Path) -> dict[str, Any]:
    """The skinclf metadata stored in an exported ONNX model."""
    text = sess.get_modelmeta().custom_metadata_map.get(META_KEY)
    if text is None:
        raise SkinclfError(f"{path} is an ONNX model but not a skinclf export (no {META_KEY} metadata); "
                           f"create one with: skinclf export MODEL.keras --format onnx --out {path}")
    meta = json.loads(text)
    if "classes" not in meta or "input_size" not in meta:
        raise SkinclfError(f"{path}: its {META_KEY} metadata has no classes or input_size")
    return meta


class OnnxEngine(Engine):
    """An exported `.onnx` on ONNX Runtime (CPU): float32, or int8 (quantized) graphs alike."""

    name = "onnx"

    def __init__(self, path: Path, *, batch_size: int, threads: int | None = None, sess=None,
                 model_path: Path | None = None) -> None:
        path = Path(path)
        if sess is None:
            if not path.is_file():
                raise SkinclfError(f"model file not found: {path}")
            sess = session(path, threads=threads)
        self.session = sess
        self.onnx_path = path
        self.threads = threads or usable_cpus()
        meta = read_meta(sess, path)
        export = meta.get("export", {})
        # The model's identity is its source bundle's: the same model whichever runtime runs it.
        super().__init__(meta=meta, path=model_path or path, sha256=export.get("source_sha256", ""),
                         batch_size=batch_size)
        self.format = export.get("format", "onnx")

    @property
    def source_sha256(self) -> str:
        return self.sha256

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "onnx": str(self.onnx_path), "onnx_sha256": sha256_file(self.onnx_path),
                "format": self.format, "threads": self.threads}

    def _padded(self, x: np.ndarray) -> np.ndarray:
        return self._logits(x)  # the graph's batch is dynamic: no padding needed

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"image": np.ascontiguousarray(x, dtype="float32")})[0]
