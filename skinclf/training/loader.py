"""Input pipelines: image batches (decoded and augmented in threads) and cached-feature batches.

Randomness is keyed by (seed, epoch, image index), never by call order, so an epoch looks the
same whether it runs straight through, in another process after `--resume`, or is read back
from the feature cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skinclf.backend import load_keras
from skinclf.data.images import ImageError, load_image
from skinclf.errors import SkinclfError
from skinclf.parallel import in_background  # noqa: F401 - re-exported: train and bench import it from here
from skinclf.training.augment import RECIPE, AugmentSpec, random_affine

keras = load_keras()


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Float32 one-hot rows for integer labels."""
    return np.eye(num_classes, dtype="float32")[labels]


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order in which an epoch visits `n` items: a seeded permutation, or 0..n-1."""
    return np.random.default_rng([seed, epoch, 1]).permutation(n) if shuffle else np.arange(n)


class _LabelledBatches(keras.utils.PyDataset):
    """Batches of (inputs, one-hot labels[, sample weights]) in a seeded order per epoch.

    Subclasses say how to produce the inputs of a list of item indices. `epoch` advances at
    each epoch end, when Keras has already stopped its loader threads.
    """

    def __init__(self, labels: Sequence[int], *, num_classes: int, batch_size: int, shuffle: bool, seed: int,
                 epoch: int, sample_weights: Sequence[float] | None, **pydataset_options) -> None:
        super().__init__(**pydataset_options)
        self.labels = np.asarray(labels, dtype="int64")
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.sample_weights = None if sample_weights is None else np.asarray(sample_weights, dtype="float32")
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._order = epoch_order(len(self.labels), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)

    def _inputs(self, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, batch: int):
        idx = self._order[batch * self.batch_size : (batch + 1) * self.batch_size]
        x, y = self._inputs(idx), one_hot(self.labels[idx], self.num_classes)
        return (x, y) if self.sample_weights is None else (x, y, self.sample_weights[idx])

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._new_epoch()


class ImageBatches(_LabelledBatches):
    """Images decoded from files; with `augment` (True for the seed recipe, or an AugmentSpec),
    each gets a random augmentation drawn from a generator seeded with (seed, epoch, index)."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        *,
        num_classes: int,
        image_size: int,
        batch_size: int,
        augment: bool | AugmentSpec = False,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        sample_weights: Sequence[float] | None = None,
        workers: int = 1,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.image_size = image_size
        self.augment = RECIPE if augment is True else (augment or None)
        super().__init__(labels, num_classes=num_classes, batch_size=batch_size, shuffle=shuffle, seed=seed,
                         epoch=epoch, sample_weights=sample_weights, workers=workers, use_multiprocessing=False,
                         max_queue_size=max(2 * workers, 4))

    def image(self, index: int) -> np.ndarray:
        """Image `index` as the model sees it this epoch (augmented when training)."""
        try:
            pixels = load_image(self.paths[index], self.image_size)
        except ImageError as exc:
            raise SkinclfError(f"cannot read {self.paths[index]}: {exc}") from None
        if self.augment:
            pixels = random_affine(pixels, np.random.default_rng([self.seed, self.epoch, index]), self.augment)
        return pixels

    def _inputs(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self.image(i) for i in indices]).astype("float32")


class FeatureBatches(_LabelledBatches):
    """Cached frozen-part outputs: each epoch shows every image through one of its cached
    augmented views, picked at random with (seed, epoch)."""

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
        self.views = list(views)
        super().__init__(labels, num_classes=num_classes, batch_size=batch_size, shuffle=shuffle, seed=seed,
                         epoch=epoch, sample_weights=sample_weights)

    def _new_epoch(self) -> None:
        super()._new_epoch()
        self._view = np.random.default_rng([self.seed, self.epoch, 2]).integers(0, len(self.views), len(self.labels))

    def _inputs(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self.views[self._view[i]][i] for i in indices]).astype("float32")
