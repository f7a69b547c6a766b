"""The Ray actor of `--ray`: the model's ONNX form on ONNX Runtime in each worker, paths in, rows out.

Ray is imported only inside the actor (the optional extra `skinclf[ray]`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from skinclf.batch.ray_hooks import actor_exit_once
from skinclf.errors import SkinclfError


class Classifier:
    """One Ray actor: the model's ONNX form on ONNX Runtime, loaded once; a batch of relative
    paths (JSON text) in, their CSV rows (JSON text, in the same order) out."""

    def __init__(self, *, model: list, name: str, directory: str, top_k: int, all_probs: bool, batch_size: int,
                 threads: int, tta: int, metadata: bool = False) -> None:
        from skinclf import keep_private

        keep_private()  # telemetry off before ONNX Runtime loads, whatever the worker's environment
        if not Path(directory).is_dir():  # else every file would come back as a "file not found" row
            import socket

            raise SkinclfError(f"the folder {directory} is not readable on the Ray node {socket.gethostname()}: "
                               "mount it at the same path on every node")
        import ray

        from skinclf.engines.onnx import OnnxEngine
        from skinclf.engines.onnx import session
        from skinclf.model.outlier import active_record

        data = ray.get(model[0])  # the one copy in the object store, shared by the actors of a node
        self.engine = OnnxEngine(Path(name), batch_size=batch_size, threads=threads, sess=session(data, threads=threads))
        self.ood = active_record(self.engine.meta.get("ood"), self.engine.features_dim > 0)
        self.root, self.top_k, self.all_probs, self.tta = Path(directory), top_k, all_probs, tta
        self.head = None
        if metadata:  # --metadata: the head the driver checked, from the same ONNX file
            from skinclf.model.patient_head import load_head

            self.head = load_head(self.engine.meta, path=name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from skinclf.batch.results import batch_rows
        from skinclf.engines.runner import predict_files

        actor_exit_once()
        paths = [self.root / json.loads(p) for p in batch["path"]]
        metas = [_meta(text) for text in batch["meta"]] if "meta" in batch else None
        rows: list[list[str]] = []
        for result in predict_files(self.engine, paths, image_size=self.engine.image_size,
                                    batch_size=max(1, len(paths)), workers=1, tta=self.tta):
            names = [Path(p).relative_to(self.root).as_posix() for p in result.paths]
            rows += batch_rows(result, names=names, classes=self.engine.classes, top_k=self.top_k,
                               all_probs=self.all_probs, ood=self.ood, metas=metas, head=self.head)
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


def _meta(text: str):
    """An image's PatientMeta from its `meta` cell (JSON; null: no row in the metadata file)."""
    from skinclf.model.patient_head import NO_METADATA, PatientMeta

    value = json.loads(text)
    return PatientMeta(**value) if value else NO_METADATA
