"""ONNX Runtime sessions and the skinclf metadata stored in an ONNX file, with no engine in sight.

The bundle reads an ONNX model's metadata through here, so `model/` never imports `engines/`;
`read_model_meta` reads either form (a `.keras` bundle or its `.onnx` export).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from skinclf.errors import SkinclfError
from skinclf.model.bundle_meta import check_graph, check_meta, read_bundle_meta
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
    try:
        meta = check_meta(json.loads(text), path)
    except ValueError as exc:  # not JSON at all
        raise SkinclfError(f"{path}: its {META_KEY} metadata is not valid JSON ({exc}); expected a JSON object "
                           "with classes and input_size") from None
    graph = {o.name: o.shape for o in sess.get_outputs()}
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    if "logits" not in graph or "image" not in inputs:
        raise SkinclfError(f"{path}: the network has inputs {', '.join(inputs)} and outputs {', '.join(graph)}; "
                           "expected input 'image' and output 'logits', as skinclf export writes them")
    check_graph(path, meta, outputs=graph["logits"][-1], input_shape=inputs["image"][1:3])
    return meta


def read_model_meta(path: Path) -> dict[str, Any]:
    """The metadata of a `.keras` bundle or of its `.onnx` export, checked (no Keras needed)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return read_meta(session(path, threads=1), path)
    return read_bundle_meta(path)
