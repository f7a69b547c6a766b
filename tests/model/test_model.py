"""The network, its split for the feature cache, batch-norm folding, the bundle, augmentation."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from skinclf.errors import SkinclfError
from skinclf.model.bundle import load_bundle, save_bundle
from skinclf.model.bundle_meta import read_bundle_meta
from skinclf.model.network import build_model, fold_batch_norm, set_trainable, split_model
from skinclf.training.augment import AugmentSpec, random_affine


@pytest.fixture(scope="module")
def model():
    """A small MobileNet with non-trivial batch-norm statistics and weights."""
    m = build_model(num_classes=7, weights=None, alpha=0.25, image_size=64, seed=1)
    rng = np.random.default_rng(0)
    for layer in m.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    return m


def images(n: int = 3, size: int = 64) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, (n, size, size, 3)).astype("float32")


def test_folding_batch_norms_keeps_the_function(model) -> None:
    folded = fold_batch_norm(model)
    assert not any(layer.__class__.__name__ == "BatchNormalization" for layer in folded.layers)
    # MobileNet has 27 conv + batch-norm pairs: each batch norm is now a pass-through
    assert sum(layer.__class__.__name__ == "FoldedBatchNorm" for layer in folded.layers) == 27
    x = images()
    assert np.allclose(np.asarray(folded.predict_on_batch(x)), np.asarray(model.predict_on_batch(x)), atol=1e-5)


def test_split_prefix_then_suffix_is_the_whole_model(model) -> None:
    start = set_trainable(model, 43)
    prefix, suffix = split_model(model, start)
    assert model.layers[start].name == "conv_dw_7"
    assert not prefix.trainable_weights and suffix.trainable_weights
    x = images()
    whole = np.asarray(model.predict_on_batch(x))
    assert np.allclose(np.asarray(suffix.predict_on_batch(prefix.predict_on_batch(x))), whole, atol=1e-6)
    with pytest.raises(SkinclfError, match="3..85"):
        set_trainable(model, 86)


def test_bundle_round_trip(model, tmp_path: Path) -> None:
    path = save_bundle(model, tmp_path / "m.keras", {"classes": list("abcdefg"), "input_size": [64, 64]})
    assert sorted(zipfile.ZipFile(path).namelist()) == ["config.json", "metadata.json", "model.weights.h5",
                                                        "skinclf.json"]
    bundle = load_bundle(path)
    x = images()
    assert np.array_equal(np.asarray(bundle.model.predict_on_batch(x)), np.asarray(model.predict_on_batch(x)))
    assert bundle.classes == list("abcdefg") and len(bundle.sha256) == 64
    assert read_bundle_meta(path)["format"] == "skinclf-bundle/1"
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_bundle_refuses_mismatched_class_names(model, tmp_path: Path) -> None:
    with pytest.raises(SkinclfError, match="7 outputs but 2 class names"):
        save_bundle(model, tmp_path / "m.keras", {"classes": ["a", "b"], "input_size": [64, 64]})
    assert not (tmp_path / "m.keras").exists()


def test_identity_augmentation_changes_nothing() -> None:
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    still = AugmentSpec(rotation=0, shift=0, zoom=0, flips=False)
    out = random_affine(image, np.random.default_rng(0), still)
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 1


def test_augmentation_is_seeded_and_varied() -> None:
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a = random_affine(image, np.random.default_rng([42, 1, 7]))
    b = random_affine(image, np.random.default_rng([42, 1, 7]))
    c = random_affine(image, np.random.default_rng([42, 2, 7]))
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_horizontal_flip_alone_mirrors_the_image() -> None:
    image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    flips_only = AugmentSpec(rotation=0, shift=0, zoom=0, flips=True)
    mirrored = 0
    for seed in range(20):
        out = random_affine(image, np.random.default_rng(seed), flips_only).astype(int)
        candidates = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
        assert min(np.abs(out - c.astype(int)).max() for c in candidates) <= 1  # always one of the four
        mirrored += np.abs(out - image[:, ::-1].astype(int)).max() <= 1
    assert 0 < mirrored < 20
