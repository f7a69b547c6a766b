"""The skinclf metadata stored in an ONNX file (key `skinclf.json`), read from a session.

Sessions are made in `engines/onnx.py` (the one place an ONNX Runtime session is created);
`engines.onnx.read_model_meta` reads either form (a `.keras` bundle or its `.onnx` export).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from skinclf.errors import SkinclfError
from skinclf.model.bundle_meta import check_graph, check_meta

META_KEY = "skinclf.json"


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
    head = read_head(sess)
    if "image" not in inputs or not ("logits" in graph or (head is not None and "features" in graph)):
        raise SkinclfError(f"{path}: the network has inputs {', '.join(inputs)} and outputs {', '.join(graph)}; "
                           "expected input 'image' and output 'features' (with its head) or 'logits', as skinclf "
                           "export writes them")
    if head is not None and graph["features"][-1] != head.features_dim:
        raise SkinclfError(f"{path}: its head reads {head.features_dim} features but the network gives "
                           f"{graph['features'][-1]}; export the model again")
    check_graph(path, meta, outputs=head.classes if head is not None else graph["logits"][-1],
                input_shape=inputs["image"][1:3])
    return meta


def read_head(sess):
    """The numpy head (`model.head.LinearHead`) stored in an exported ONNX model, or None for a file
    whose graph computes the logits itself (exported before the one-pass form)."""
    from skinclf.model.head import HEAD_KEY, LinearHead

    text = sess.get_modelmeta().custom_metadata_map.get(HEAD_KEY)
    return None if text is None else LinearHead.from_json(text)
