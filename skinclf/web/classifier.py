"""The model thread of `skinclf serve`: one engine, a queue of jobs, bounded uploads."""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time.
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from skinclf.batch.results import batch_rows
from skinclf.config import SERVE
from skinclf.data.images import ImageError, decode_image
from skinclf.engines.base import softmax
from skinclf.engines.runner import BatchResult
from skinclf.errors import SkinclfError
from skinclf.web.guards import DecodeGate, header_size

log = logging.getLogger("skinclf.serve")

MB = 1024 * 1024
MISSING_EXTRA = 'skinclf serve needs FastAPI: pip install "skinclf[serve]"'


@dataclass(frozen=True)
class Limits:
    """What one POST /api/predict may carry (more is answered 413), and how much decoding the
    server does at once (see `guards.DecodeGate`; more waits, then is answered 503)."""

    max_file_bytes: int = int(SERVE.max_file_mb * MB)
    max_files: int = SERVE.max_files
    max_request_bytes: int = int(SERVE.max_request_mb * MB)
    max_decodes: int = SERVE.max_decodes
    max_image_pixels: int = SERVE.max_image_pixels
    max_decode_pixels: int = SERVE.max_decode_pixels
    decode_wait_s: float = SERVE.decode_wait_s

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            least = 0 if name == "decode_wait_s" else 1
            if value < least:
                raise SkinclfError(f"{name.replace('_', '-')} {value}: must be {'positive' if least else '0 or more'}")
        if self.max_image_pixels > self.max_decode_pixels:
            raise SkinclfError(f"max-image-pixels {self.max_image_pixels:,} is over max-decode-pixels "
                               f"{self.max_decode_pixels:,}: such an image could never be decoded")

    def gate(self) -> DecodeGate:
        return DecodeGate(max_decodes=self.max_decodes, max_pixels=self.max_decode_pixels, wait_s=self.decode_wait_s)


@dataclass(frozen=True)
class ServeInfo:
    """What `serve` tells its caller once the model is loaded and the port is open."""

    url: str
    host: str
    port: int
    model: dict[str, Any]
    limits: Limits
    warnings: list[str] = field(default_factory=list)


class _Job:
    """One caller's images, filled in as the model gets to them (possibly over several calls)."""

    def __init__(self, images: np.ndarray, n_classes: int) -> None:
        self.images = images
        self.probs = np.zeros((len(images), n_classes), dtype="float32")
        self.taken = 0  # images handed to the model so far
        self.done: Future = Future()


class ModelUnavailable(Exception):
    """The model thread has stopped: this request and every later one is answered 503."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


class Classifier:
    """One engine, run by one worker thread; callers from any thread get its logits back
    (`engine.logits`; a bare callable engine's output as it is).

    Callers' images wait in a queue; the worker runs them in full batches of the engine's
    `batch_size`, filled from as many requests as are waiting (a request may span two calls),
    so concurrent uploads share batches instead of each padding its own. It never waits for
    more work: a lone request runs at once. Only the worker thread ever touches the engine.

    An exception from the engine fails the requests of that batch only (the next may work). A
    worker that cannot go on (an output that does not match the classes, anything raised outside
    the engine call) records why in `failure`, fails every waiting request with ModelUnavailable,
    and refuses new ones the same way: nothing ever waits for a thread that is gone.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self._run = getattr(engine, "logits", engine)
        # Engines with pooled features run `forward` once and hand back [logits | features] rows.
        self.features_dim = int(getattr(engine, "features_dim", 0) or 0)
        if self.features_dim and hasattr(engine, "forward"):
            self._run = lambda x: np.concatenate(engine.forward(x), axis=1)
        self._width = len(engine.classes) + self.features_dim
        self.batch_size = int(getattr(engine, "batch_size", 16))
        self.n_classes = len(engine.classes)
        self.calls = 0  # engine calls made (tests check that requests were run together)
        self.busy_seconds = 0.0  # time spent in the engine (the load bench reports it)
        self.failure: str | None = None  # why the worker stopped (or is stopping), once it has
        self._jobs: queue.Queue = queue.Queue()
        self._pending: deque[_Job] = deque()  # taken from the queue, not finished
        self._lock = threading.Lock()  # a job is queued only while the worker is known to be running
        self._worker = threading.Thread(target=self._work, name="skinclf-model", daemon=True)
        self._worker.start()

    def check(self) -> None:
        """Raise ModelUnavailable if the worker has stopped (or is stopping)."""
        if self.failure is not None:
            raise ModelUnavailable(f"the model is not running ({self.failure}); restart skinclf serve")
        if not self._worker.is_alive():
            raise ModelUnavailable("the model is not running; restart skinclf serve")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits (n, classes) for `images` (n, size, size, 3); blocks until done."""
        return self.forward(images)[0]

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (n, classes) and pooled features (n, features_dim; None when the engine gives
        none) of `images` from one forward pass; blocks until done."""
        if len(images) == 0:
            out = np.zeros((0, self._width), dtype="float32")
        else:
            job = _Job(np.asarray(images, dtype="float32"), self._width)
            with self._lock:
                self.check()
                self._jobs.put(job)
            out = job.done.result()
        return out[:, :self.n_classes], (out[:, self.n_classes:] if self.features_dim else None)

    def close(self, timeout: float | None = SERVE.shutdown_s) -> None:
        """Finish what is queued, then stop the worker. An engine call that hangs is not waited for
        beyond `timeout`: the requests still waiting on it are failed, so their threads end, and
        the worker is a daemon thread, so it does not keep the process alive."""
        with self._lock:
            self.failure = self.failure or "the server is shutting down"
            self._jobs.put(None)
        self._worker.join(timeout)
        if self._worker.is_alive():
            self._stop("the server stopped while the model was still running")

    def _work(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - recorded, and every waiting request is told
            reason = f"the model thread stopped: {_one_line(exc)}"
            log.error("skinclf serve: %s; every request is now answered 503", reason)
            self._stop(reason)

    def _stop(self, reason: str) -> None:
        with self._lock:
            self.failure = reason
            waiting = list(self._pending)
            self._pending.clear()
            while not self._jobs.empty():
                job = self._jobs.get_nowait()
                if job is not None:
                    waiting.append(job)
        for job in waiting:
            if not job.done.done():
                job.done.set_exception(ModelUnavailable(f"the model is not running ({reason}); restart skinclf serve"))

    def _serve(self) -> None:
        pending = self._pending
        stopping = False
        while pending or not stopping:
            if not pending:
                job = self._jobs.get()  # idle: wait for work
                if job is None:
                    return
                pending.append(job)
            while not stopping:  # take whatever else is already waiting, never wait for more
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                else:
                    pending.append(job)
            parts = self._next_batch()
            x = np.concatenate([job.images[a:b] for job, a, b in parts])
            try:
                started = time.perf_counter()
                out = np.asarray(self._run(x))
                self.busy_seconds += time.perf_counter() - started
                self.calls += 1
            except Exception as exc:  # noqa: BLE001 - handed to the requests in this batch
                for job, _, _ in parts:
                    pending.remove(job)
                    job.done.set_exception(exc)
                continue
            if out.shape != (len(x), self._width):
                # Not this batch's fault: a model whose outputs do not match its classes is wrong for every request.
                raise RuntimeError(f"the model gave an output of shape {out.shape} for {len(x)} image(s) and "
                                   f"{self.n_classes} classes" + (f" + {self.features_dim} features" if self.features_dim else ""))
            self._deliver(parts, out)

    def _next_batch(self) -> list[tuple[_Job, int, int]]:
        """The next batch: images in arrival order, up to batch_size, across requests."""
        parts, count = [], 0
        for job in self._pending:
            k = min(self.batch_size - count, len(job.images) - job.taken)
            parts.append((job, job.taken, job.taken + k))
            count += k
            if count == self.batch_size:
                break
        return parts

    def _deliver(self, parts: list[tuple[_Job, int, int]], out: np.ndarray) -> None:
        offset = 0
        for job, a, b in parts:
            job.probs[a:b] = out[offset : offset + b - a]
            offset += b - a
            job.taken = b
            if b == len(job.images):
                self._pending.remove(job)
                job.done.set_result(job.probs)


def probe_engine(engine) -> None:
    """One forward pass on a blank image before the port opens (which also compiles the model, so
    the first visitor does not wait for it): a model whose output does not match the classes its
    metadata names is refused here, in one line, instead of by a worker that dies on the first upload."""
    size, classes = engine.image_size, engine.classes
    try:
        out = np.asarray(getattr(engine, "logits", engine)(np.zeros((1, size, size, 3), dtype="float32")))
    except SkinclfError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the model itself
        raise SkinclfError(f"model {engine.path} fails on a test image: {_one_line(exc)}") from None
    if out.shape != (1, len(classes)):
        got = f"{out.shape[1]} outputs per image" if out.ndim == 2 else f"an output of shape {out.shape}"
        raise SkinclfError(f"model {engine.path} gives {got} but its metadata names {len(classes)} classes "
                           f"({', '.join(classes)}); use a model exported by skinclf export")


@dataclass
class Upload:
    """One file of a request, held in memory."""

    name: str
    data: bytearray = field(default_factory=bytearray)


def decode_upload(data: bytes, image_size: int, notes: list[str], gate: DecodeGate | None,
                  max_image_pixels: int) -> np.ndarray:
    """`decode_image` within the decode gate: the size its header claims is checked against the
    per-image limit, then held against the budget while its pixels exist."""
    size = header_size(data) if data else None
    if gate is None or size is None:
        return decode_image(data, image_size, notes=notes)  # no header: fails at once, with its reason
    width, height = size
    if width * height > max_image_pixels:  # worded as predict words its own (equal, by default) limit
        raise ImageError(f"image too large ({width}x{height} pixels; the limit is {max_image_pixels:,})")
    with gate.admit(width * height):
        return decode_image(data, image_size, notes=notes)


def classify_uploads(classifier: Classifier, uploads: Sequence[Upload], *, classes: Sequence[str], image_size: int,
                     top_k: int, all_probs: bool, gate: DecodeGate | None = None,
                     max_image_pixels: int = SERVE.max_image_pixels, metas: Sequence | None = None,
                     head=None) -> list[list[str]]:
    """CSV rows (`results.row`) for uploaded files, in upload order; a bad file is a row with an error.
    ModelUnavailable when the model thread has stopped, Rejected(503) when decoding stays too busy.
    `metas` (one `PatientMeta` per upload; None: no metadata sent) goes through the model's
    metadata `head` exactly as `predict --metadata` does, and each row gains its `metadata` cell."""
    classifier.check()
    x = np.zeros((len(uploads), image_size, image_size, 3), dtype="float32")
    errors: list[str | None] = [None] * len(uploads)
    notes: list[list[str]] = [[] for _ in uploads]
    for j, upload in enumerate(uploads):
        data, upload.data = bytes(upload.data), bytearray()  # the bytes are not needed past decoding
        try:
            x[j] = decode_upload(data, image_size, notes[j], gate, max_image_pixels)
        except ImageError as exc:
            errors[j] = str(exc)
    ok = [j for j, e in enumerate(errors) if e is None]
    logits = np.full((len(uploads), len(classes)), np.nan, dtype="float32")
    features = np.full((len(uploads), classifier.features_dim), np.nan, dtype="float32")
    if ok:
        logits[ok], f = classifier.forward(x[ok])
        if f is not None:
            features[ok] = f
    # The same rows as predict's (one row builder), so every cell matches its CSV to the last digit.
    batch = BatchResult(paths=[u.name for u in uploads], probs=softmax(logits), errors=errors, warnings=notes,
                        logits=logits, features=features if classifier.features_dim else None)
    return batch_rows(batch, names=[u.name for u in uploads], classes=classes, top_k=top_k, all_probs=all_probs,
                      ood=getattr(classifier.engine, "meta", {}).get("ood"),
                      metas=None if metas is None else list(metas), head=head)
