"""Issue 32: `skinclf listen`'s work: each image a DICOM Storage SCP receives, classified into a
predict-style CSV (rows appended whole, under a lock, flushed and synced) and, with `sr_dir`, a SR.

A received object is decoded in memory (`data.images.decode_image`, the same pipeline as predict),
never written to disk; its row's `path` is `<calling AE>/<SOP Instance UID>.dcm`. Images arriving on
several associations at once are classified one at a time (one engine, one lock).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from skinclf.batch.dicom_rows import DICOM, SOP_COLUMN, meta_of, write_report
from skinclf.config import ListenSettings
from skinclf.batch.results import DISCLAIMER, class_names, columns, read_csv, row, sidecar_path, write_csv
from skinclf.errors import SkinclfError
from skinclf.files import atomic_write, atomic_write_json, check_output_file

SUCCESS, FAILURE = 0x0000, 0x0110


@dataclass
class ListenOutput:
    """The CSV every received image's row is appended to (created with its header, or continued
    when it was written by an earlier `listen` with the same columns)."""

    path: Path
    header: list[str]
    lock: threading.Lock

    @classmethod
    def open(cls, path: Path, header: list[str]) -> ListenOutput:
        path = Path(path)
        check_output_file(path, example="received.csv")
        if path.exists():
            text = path.read_bytes().decode("utf-8", errors="replace")
            lines = read_csv(text)
            if not lines or lines[0] != header:
                raise SkinclfError(f"--out {path} exists with other columns than listen writes ({', '.join(header)}); "
                                   "give another file")
            if not text.endswith("\n"):  # a torn last line (killed mid-write): drop it
                atomic_write(path, text[: text.rfind("\n") + 1])
        else:
            import io

            sink = io.StringIO()
            write_csv(sink, [header])
            atomic_write(path, sink.getvalue())
        return cls(path=path, header=header, lock=threading.Lock())

    def append(self, rows: list[list[str]]) -> None:
        import io

        sink = io.StringIO()
        write_csv(sink, rows)
        data = sink.getvalue().encode("utf-8")
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)  # whole lines in one write
                os.fsync(fd)
            finally:
                os.close(fd)


class ReceivedImages:
    """The callback the listener calls per object: classify, append the row, write the SR."""

    def __init__(self, runner, *, out: Path, top_k: int, all_probs: bool = False, tta: int = 1,
                 use_tags: bool = True, sr_dir: Path | None = None) -> None:
        from skinclf.engines.runner import engine_tta
        from skinclf.model.patient_head import load_head
        from skinclf.model.outlier import active_record

        self.runner, self.top_k, self.all_probs, self.sr_dir = runner, top_k, all_probs, sr_dir
        self.run = engine_tta(runner, tta)
        self.ood = active_record(runner.meta.get("ood"), runner.features_dim > 0)
        head = load_head(runner.meta, path=runner.path) if use_tags else None
        self.head = head if head is not None and not (head.needs_features and not runner.features_dim) else None
        self.header = columns(runner.classes, top_k, all_probs) + ["metadata", SOP_COLUMN]
        self.output = ListenOutput.open(out, self.header)
        self.engine_lock = threading.Lock()
        self.rows = 0

    def sidecar(self, options: dict[str, Any]) -> None:
        atomic_write_json(sidecar_path(self.output.path), {
            "note": DISCLAIMER, "model": self.runner.identity(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "options": {**options, "metadata_head": self.head is not None},
            "classes": class_names(self.runner.classes)})

    def __call__(self, data: bytes, calling_ae: str) -> int:
        from skinclf.data.images import ImageError, decode_image
        from skinclf.dicom.read import DicomError, read_tags

        try:
            tags = read_tags(data)
        except DicomError as exc:
            self.output.append([row(f"{calling_ae}/unreadable.dcm", None, str(exc), self.runner.classes, self.top_k,
                                    self.all_probs) + ["", ""]])
            return FAILURE
        rel = f"{calling_ae}/{tags.sop_instance_uid or 'no-sop-instance-uid'}.dcm"
        notes: list[str] = []
        try:
            x = decode_image(data, self.runner.image_size, notes=notes, name="received.dcm")
        except ImageError as exc:
            self.output.append([row(rel, None, str(exc), self.runner.classes, self.top_k, self.all_probs)
                                + ["", tags.sop_instance_uid]])
            return SUCCESS  # stored and answered with an error row, as predict would
        cells = self._classify(x, tags, rel, notes)
        if self.sr_dir is not None:
            problem = write_report(data, cells, self.header, sr_dir=self.sr_dir, model=self.runner.identity())
            if problem:
                from skinclf.batch.results import warning_cell

                warning = self.header.index("warning")
                cells[warning] = warning_cell([*filter(None, cells[warning].split("; ")), problem])
        self.output.append([cells])
        self.rows += 1
        return SUCCESS

    def _classify(self, x: np.ndarray, tags, rel: str, notes: list[str]) -> list[str]:
        """The row of one received image, made by the one row builder (`batch_rows`): the tags'
        metadata through the head when the model has one; the cell says `dicom` where used."""
        from skinclf.batch.patient import MISSING
        from skinclf.batch.results import batch_rows
        from skinclf.engines.runner import BatchResult

        meta = meta_of(tags)
        with self.engine_lock:
            probs, logits, features = self.run(x[None].astype("float32"))
        batch = BatchResult(paths=[Path(rel)], probs=probs, errors=[None], warnings=[notes], logits=logits,
                            features=features)
        metas = [meta] if self.head is not None else None
        cells = batch_rows(batch, names=[rel], classes=self.runner.classes, top_k=self.top_k,
                           all_probs=self.all_probs, ood=self.ood, metas=metas, head=self.head)[0]
        if metas is not None:
            cells = cells[:-1]  # the builder's used/missing cell: here the values came from the tags
        return [*cells, DICOM if metas is not None and meta.present else MISSING, tags.sop_instance_uid]


def run_listener(settings: ListenSettings, *, stop: threading.Event, on_ready=None) -> dict[str, int]:
    """Receive, classify and record DICOM images until `stop` is set (or `max_objects` rows are
    written, 0: no limit). Every option is checked, and the model loaded, before the port opens.
    `on_ready(port)` is called once it listens. Returns the listener's counters."""
    from skinclf.batch.dicom_rows import check_sr_dir
    from skinclf.batch.predict import _load
    from skinclf.dicom.storage_scp import ListenConfig, ListenError, Listener

    s = settings
    if s.max_mb <= 0:
        raise SkinclfError(f"--max-mb {s.max_mb}: must be above 0")
    config = ListenConfig(host=s.host, port=s.port, ae_title=s.ae_title, allow=tuple(s.allow),
                          max_associations=s.max_associations, max_bytes=int(s.max_mb * 1024 * 1024))
    try:
        Listener(config, lambda data, ae: SUCCESS)  # the options checked before the model loads
    except ListenError as exc:
        raise SkinclfError(str(exc)) from None
    sr_dir = check_sr_dir(s.sr)
    engine, top_k, _ = _load(s.model, engine=s.engine, batch_size=1, threads=s.threads, tta=1, top_k=s.top_k)
    received = ReceivedImages(engine, out=Path(s.out), top_k=top_k, use_tags=s.dicom_metadata, sr_dir=sr_dir)
    received.sidecar({"host": s.host, "ae_title": s.ae_title, "allow": list(s.allow),
                      "max_associations": s.max_associations, "max_mb": s.max_mb,
                      "sr": str(sr_dir) if sr_dir else None, "top_k": top_k})
    return _serve(Listener(config, _counting(received, s.max_objects, stop)), stop=stop, on_ready=on_ready,
                  received=received)


def _counting(received: ReceivedImages, max_objects: int, stop: threading.Event):
    """The per-object callback: classify, and stop after `max_objects` rows (0: never)."""
    def on_object(data: bytes, calling_ae: str) -> int:
        status = received(data, calling_ae)
        if max_objects and received.rows >= max_objects:
            stop.set()
        return status

    return on_object


def _serve(listener, *, stop: threading.Event, on_ready, received: ReceivedImages) -> dict[str, int]:
    from skinclf.dicom.storage_scp import ListenError

    try:
        bound = listener.start()
    except ListenError as exc:
        raise SkinclfError(str(exc)) from None
    try:
        if on_ready is not None:
            on_ready(bound)
        while not stop.wait(0.5):
            pass
    finally:
        listener.stop()
    c = listener.counters
    return {"stored": c.stored, "failed": c.failed, "aborted": c.aborted, "refused": c.refused, "rows": received.rows}
