"""Input pipelines: image batches (decoded and augmented in threads) and cached-feature batches.

Randomness is keyed by (seed, epoch, image index), never by call order, so an epoch looks the
same whether it runs straight through, in another process after `--resume`, or is read back
from the feature cache.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from skinclf.augment import random_affine
from skinclf.backend import load_keras
from skinclf.errors import SkinclfError
from skinclf.images import ImageError, load_image

keras = load_keras()
T = TypeVar("T")


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Float32 one-hot rows for integer labels."""
    return np.eye(num_classes, dtype="float32")[labels]


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order in which an epoch visits `n` items: a seeded permutation, or 0..n-1."""
    return np.random.default_rng([seed, epoch, 1]).permutation(n) if shuffle else np.arange(n)


def in_background(tasks: Sequence[Callable[[], T]], *, workers: int, lookahead: int | None = None) -> Iterator[T]:
    """Run `tasks` in a thread pool, yielding results in order, at most `lookahead` ahead.

    Decoding and resizing release the GIL in Pillow, so threads overlap them with the model,
    which releases it too. Bounded lookahead keeps memory flat however many tasks there are.
    """
    lookahead = lookahead or 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="skinclf-load") as pool:
        pending: deque = deque()
        it = iter(tasks)
        for task in it:
            pending.append(pool.submit(task))
            if len(pending) >= lookahead:
                break
        while pending:
            result = pending.popleft().result()
            for task in it:
                pending.append(pool.submit(task))
                break
            yield result


class ImageBatches(keras.utils.PyDataset):
    """Batches of (images, one-hot labels[, sample weights]) decoded from files.

    With `augment`, each image gets the random affine of `skinclf.augment`, drawn from a
    generator seeded with (seed, epoch, image index). `epoch` advances at each epoch end,
    when Keras has already stopped its loader threads.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        *,
        num_classes: int,
        image_size: int,
        batch_size: int,
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        sample_weights: Sequence[float] | None = None,
        workers: int = 1,
    ) -> None:
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(2 * workers, 4))
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype="int64")
        self.num_classes = num_classes
        self.image_size = image_size
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.sample_weights = None if sample_weights is None else np.asarray(sample_weights, dtype="float32")
        self._order = epoch_order(len(self.paths), seed=seed, epoch=epoch, shuffle=shuffle)

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def image(self, index: int, epoch: int | None = None) -> np.ndarray:
        """Image `index` as the model sees it in `epoch` (augmented when training)."""
        try:
            pixels = load_image(self.paths[index], self.image_size)
        except ImageError as exc:
            raise SkinclfError(f"cannot read {self.paths[index]}: {exc}") from None
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])
            pixels = random_affine(pixels, rng)
        return pixels

    def indices(self, batch: int) -> np.ndarray:
        return self._order[batch * self.batch_size : (batch + 1) * self.batch_size]

    def __getitem__(self, batch: int):
        idx = self.indices(batch)
        x = np.stack([self.image(i) for i in idx]).astype("float32")
        y = one_hot(self.labels[idx], self.num_classes)
        if self.sample_weights is None:
            return x, y
        return x, y, self.sample_weights[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = epoch_order(len(self.paths), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)


class FeatureBatches(keras.utils.PyDataset):
    """Batches of cached frozen-part outputs: each epoch, every image is shown through one of
    its cached augmented views, picked at random with (seed, epoch)."""

    def __init__(
        self,
        views: Sequence[np.ndarray],
        labels: Sequence[int],
        *,
        num_classes: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        sample_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.views = list(views)
        self.labels = np.asarray(labels, dtype="int64")
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.sample_weights = None if sample_weights is None else np.asarray(sample_weights, dtype="float32")
        self._reset()

    def _reset(self) -> None:
        n = len(self.labels)
        self._order = epoch_order(n, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        self._view = np.random.default_rng([self.seed, self.epoch, 2]).integers(0, len(self.views), n)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, batch: int):
        idx = self._order[batch * self.batch_size : (batch + 1) * self.batch_size]
        x = np.stack([self.views[self._view[i]][i] for i in idx]).astype("float32")
        y = one_hot(self.labels[idx], self.num_classes)
        if self.sample_weights is None:
            return x, y
        return x, y, self.sample_weights[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._reset()
