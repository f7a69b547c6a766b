"""The model thread of `skinclf serve`: one engine, a queue of jobs, bounded uploads."""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time.
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from skinclf.batch.results import row
from skinclf.config import SERVE
from skinclf.data.images import ImageError, decode_image
from skinclf.engines.base import softmax
from skinclf.errors import SkinclfError
from skinclf.model.outlier import WARNING as UNLIKE_TRAINING
from skinclf.model.outlier import flag

MB = 1024 * 1024
MISSING_EXTRA = 'skinclf serve needs FastAPI: pip install "skinclf[serve]"'


@dataclass(frozen=True)
class Limits:
    """What one POST /api/predict may carry; more is answered 413."""

    max_file_bytes: int = int(SERVE.max_file_mb * MB)
    max_files: int = SERVE.max_files
    max_request_bytes: int = int(SERVE.max_request_mb * MB)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise SkinclfError(f"{name.replace('_', '-')} {value}: must be positive")


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


class Classifier:
    """One engine, run by one worker thread; callers from any thread get its logits back
    (`engine.logits`; a bare callable engine's output as it is).

    Callers' images wait in a queue; the worker runs them in full batches of the engine's
    `batch_size`, filled from as many requests as are waiting (a request may span two calls),
    so concurrent uploads share batches instead of each padding its own. It never waits for
    more work: a lone request runs at once. Only the worker thread ever touches the engine.
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
        self.calls = 0  # engine calls made (tests check that requests were run together)
        self.busy_seconds = 0.0  # time spent in the engine (the load bench reports it)
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="skinclf-model", daemon=True)
        self._worker.start()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits (n, classes) for `images` (n, size, size, 3); blocks until done."""
        return self.forward(images)[0]

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (n, classes) and pooled features (n, features_dim; None when the engine gives
        none) of `images` from one forward pass; blocks until done."""
        n_classes = len(self.engine.classes)
        if len(images) == 0:
            out = np.zeros((0, self._width), dtype="float32")
        else:
            job = _Job(np.asarray(images, dtype="float32"), self._width)
            self._jobs.put(job)
            out = job.done.result()
        return out[:, :n_classes], (out[:, n_classes:] if self.features_dim else None)

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._jobs.put(None)
        self._worker.join()

    def _work(self) -> None:
        pending: deque[_Job] = deque()
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
            # The next batch: images in arrival order, up to batch_size, across requests.
            parts, count = [], 0
            for job in pending:
                k = min(self.batch_size - count, len(job.images) - job.taken)
                parts.append((job, job.taken, job.taken + k))
                count += k
                if count == self.batch_size:
                    break
            try:
                started = time.perf_counter()
                probs = self._run(np.concatenate([job.images[a:b] for job, a, b in parts]))
                self.busy_seconds += time.perf_counter() - started
                self.calls += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the requests in this batch
                for job, _, _ in parts:
                    pending.remove(job)
                    job.done.set_exception(exc)
                continue
            offset = 0
            for job, a, b in parts:
                job.probs[a:b] = probs[offset : offset + b - a]
                offset += b - a
                job.taken = b
                if b == len(job.images):
                    pending.remove(job)
                    job.done.set_result(job.probs)


@dataclass
class Upload:
    """One file of a request, held in memory."""

    name: str
    data: bytearray = field(default_factory=bytearray)


def classify_uploads(classifier: Classifier, uploads: Sequence[Upload], *, classes: Sequence[str], image_size: int,
                     top_k: int, all_probs: bool) -> list[list[str]]:
    """CSV rows (`results.row`) for uploaded files, in upload order; a bad file is a row with an error."""
    x = np.zeros((len(uploads), image_size, image_size, 3), dtype="float32")
    errors: list[str | None] = [None] * len(uploads)
    notes: list[list[str]] = [[] for _ in uploads]
    for j, upload in enumerate(uploads):
        try:
            x[j] = decode_image(bytes(upload.data), image_size, notes=notes[j])
        except ImageError as exc:
            errors[j] = str(exc)
        upload.data = bytearray()  # the bytes are not needed past decoding
    ok = [j for j, e in enumerate(errors) if e is None]
    logits = np.full((len(uploads), len(classes)), np.nan, dtype="float32")
    features = np.full((len(uploads), classifier.features_dim), np.nan, dtype="float32")
    if ok:
        logits[ok], f = classifier.forward(x[ok])
        if f is not None:
            features[ok] = f
    # The same arithmetic as predict's, so every cell matches its CSV to the last digit.
    probs = softmax(logits)
    scores, flagged = flag(logits, getattr(classifier.engine, "meta", {}).get("ood"),
                           features if classifier.features_dim else None)
    for j in np.nonzero(flagged)[0]:
        if errors[j] is None:
            notes[j].append(UNLIKE_TRAINING)
    return [row(u.name, p, e, classes, top_k, all_probs, n, ood_score=s)
            for u, p, e, n, s in zip(uploads, probs, errors, notes, scores)]
