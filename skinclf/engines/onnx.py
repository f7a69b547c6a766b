"""The ONNX Runtime engine: a `.onnx` written by `skinclf export`, no TensorFlow needed.

The file carries the bundle's whole metadata (one `metadata_props` entry, key `skinclf.json`),
so it needs nothing beside it. Imports only numpy and onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from skinclf.engines.base import Engine
from skinclf.errors import SkinclfError
from skinclf.files import sha256_file
from skinclf.model.onnx_meta import read_head, read_meta, session
from skinclf.parallel import usable_cpus


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
