"""The ONNX Runtime engine: a `.onnx` written by `skinclf export`, no TensorFlow needed.

The file carries the bundle's whole metadata (one `metadata_props` entry, key `skinclf.json`),
so it needs nothing beside it. Imports only numpy and onnxruntime. The one place an ONNX
Runtime session is made (`session`): the provider list is chosen here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from skinclf.engines.base import Engine
from skinclf.engines.registry import register_engine
from skinclf.errors import SkinclfError
from skinclf.files import sha256_file
from skinclf.model.bundle_meta import read_bundle_meta
from skinclf.model.onnx_meta import read_meta
from skinclf.model.onnx_meta import read_head
from skinclf.parallel import usable_cpus

INSTALL_HINT = 'pip install "skinclf"  (or: pip install onnxruntime)'
INT8 = "onnx-int8"  # a bundle's int8 form (`<name>.int8.onnx`), auto's first choice where it was exported
PROVIDERS = ["CPUExecutionProvider"]


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def session(path: Path | bytes, *, threads: int | None = None):
    """An ONNX Runtime session (`PROVIDERS`) on `threads` intra-op threads (default: the usable CPUs)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SkinclfError(f"the ONNX engine needs ONNX Runtime, which is not installed: {INSTALL_HINT}") from None
    # The switch that counts is ORT_DISABLE_TELEMETRY, set when skinclf is imported (see
    # skinclf/__init__.py); this call also mutes the events a build may still emit.
    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Do not busy-wait between batches: decode threads need those cycles on a small machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=PROVIDERS)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or not ONNX at all
        reason = " ".join(str(exc).split())[:200]
        raise SkinclfError(f"cannot load ONNX model {path}: {reason}") from None


def read_model_meta(path: Path) -> dict[str, Any]:
    """The metadata of a `.keras` bundle or of its `.onnx` export, checked (no Keras needed)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return read_meta(session(path, threads=1), path)
    return read_bundle_meta(path)


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
        outputs = {o.name: o for o in sess.get_outputs()}
        self.head = read_head(sess)
        # One pass: the graph ends at the pooled features and the head runs in numpy. Files exported
        # before that (logits in the graph) still run, and those before the `features` output too,
        # with the logit-based flag only.
        self._outputs = (["features"] if self.head is not None else
                         ["logits", "features"] if "features" in outputs else ["logits"])
        self._features_dim = int(outputs["features"].shape[-1]) if "features" in outputs else 0

    @property
    def source_sha256(self) -> str:
        return self.sha256

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "onnx": str(self.onnx_path), "onnx_sha256": sha256_file(self.onnx_path),
                "format": self.format, "threads": self.threads}

    @property
    def features_dim(self) -> int:
        return self._features_dim

    def _padded(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self._forward(x)  # the graph's batch is dynamic: no padding needed

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(self._outputs, {"image": np.ascontiguousarray(x, dtype="float32")})
        if self.head is not None:
            return self.head(out[0]), out[0]
        return out[0], (out[1] if len(out) > 1 else None)


@register_engine("onnx", suffixes=(".onnx",), extra=INSTALL_HINT, available=lambda: onnxruntime_available())
def load_onnx(path: Path, *, batch_size: int, threads: int | None = None, model_path: Path | None = None) -> OnnxEngine:
    """An ONNX file on ONNX Runtime; `model_path`: the `.keras` bundle it is the ONNX form of."""
    return OnnxEngine(path, batch_size=batch_size, threads=threads, model_path=model_path)


@register_engine(INT8, suffixes=(), extra=INSTALL_HINT, available=lambda: onnxruntime_available())
def load_onnx_int8(path: Path, *, batch_size: int, threads: int | None = None,
                   model_path: Path | None = None) -> OnnxEngine:
    """A bundle's int8 ONNX form (`engines.int8`: mixed precision, checked against float on
    validation when exported) on ONNX Runtime; run directly, any .onnx file goes to `onnx`."""
    return OnnxEngine(path, batch_size=batch_size, threads=threads, model_path=model_path)
