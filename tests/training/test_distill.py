"""Distilling the ensemble into one network: the teacher-view cache, the loss, EMA weights saved, and resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from utils.models import make_tiny_bundle
from utils.synthetic import lesion_image, CLASSES, CLASS_COLOURS

SIZE = 48


def _prepared(root: Path, per_class: dict[str, int]) -> Path:
    n = 0
    for split, count in per_class.items():
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for _ in range(count):
                lesion_image(CLASS_COLOURS[cls], n).save(folder / f"ISIC_{n:07d}.jpg", quality=90)
                n += 1
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from skinclf.data.layout import list_labelled_images
    from skinclf.engines.load import load_engine
    from skinclf.training.augment import WINNERS
    from skinclf.training.views import ViewSpec, build_views, engine_teacher

    root = tmp_path_factory.mktemp("distill")
    data = _prepared(root / "data", {"train": 3, "val": 2})
    engine = load_engine(make_tiny_bundle(root / "teacher.keras", image_size=SIZE), engine="keras", batch_size=8)
    teacher, record = engine_teacher(engine)
    paths = list_labelled_images(data / "train").paths
    spec = ViewSpec(size=32, teacher_size=SIZE, seed=7, augment=WINNERS)
    build_views(paths, root / "views", spec, teacher, views=2, teacher_record=record, num_classes=7, batch_size=8,
                workers=1, show_progress=False)
    return {"root": root, "data": data, "paths": paths, "spec": spec, "teacher": teacher, "record": record}


def test_view_cache_is_reproducible_and_holds_the_teachers_logits(setup, tmp_path: Path) -> None:
    from skinclf.training.views import build_views, draw_view, open_views

    images, logits, _ = open_views(setup["root"] / "views", 2)
    # Built again elsewhere, in two sessions (one view, then extended to two): the same bytes.
    build_views(setup["paths"], tmp_path / "again", setup["spec"], setup["teacher"], views=1,
                teacher_record=setup["record"], num_classes=7, batch_size=8, workers=2, show_progress=False)
    build_views(setup["paths"], tmp_path / "again", setup["spec"], setup["teacher"], views=2,
                teacher_record=setup["record"], num_classes=7, batch_size=8, workers=2, show_progress=False)
    again, again_logits, _ = open_views(tmp_path / "again", 2)
    for k in range(2):
        assert np.array_equal(images[k], again[k]) and np.array_equal(logits[k], again_logits[k])
    assert not np.array_equal(images[0], images[1])  # views differ
    for i in (0, 5, len(setup["paths"]) - 1):
        big, small = draw_view(setup["paths"][i], i, 1, setup["spec"])
        assert np.array_equal(small, images[1][i])
        assert np.allclose(logits[1][i], setup["teacher"](big[None])[0], atol=1e-5)
    other = replace(setup["spec"], seed=8)
    assert not np.array_equal(draw_view(setup["paths"][0], 0, 0, other)[1], images[0][0])


def test_distillation_loss_matches_a_hand_computed_example() -> None:
    from skinclf.training.distill import distillation_loss

    probs = np.array([[0.7, 0.2, 0.1]], dtype="float32")
    teacher = np.array([[2.0, 0.0, -1.0]], dtype="float32")
    y = np.concatenate([[[0.0, 1.0, 0.0]], teacher, [[1.5]]], axis=1).astype("float32")
    t, alpha = 2.0, 0.7
    pt = np.exp(teacher[0] / t) / np.exp(teacher[0] / t).sum()
    ps = probs[0] ** (1 / t) / (probs[0] ** (1 / t)).sum()  # softmax(log p / T)
    expected = alpha * t * t * np.sum(pt * np.log(pt / ps)) + (1 - alpha) * 1.5 * -np.log(0.2)
    got = np.asarray(distillation_loss(3, t, alpha)(y, probs))
    assert got.shape == (1,) and got[0] == pytest.approx(expected, rel=1e-5)


def _distill(setup, run: str, **kwargs):
    from skinclf.training.distill import distill

    root = setup["root"]
    return distill(data=setup["data"], views_dir=root / "views", run_dir=root / run, out=root / f"{run}.keras",
                   weights=None, config=setup["config"], workers=1, **kwargs)


@pytest.fixture(scope="module")
def sessions(setup):
    """One uninterrupted 2-epoch run, and one stopped after epoch 1 (a copy kept) then resumed."""
    import shutil

    from skinclf.training.distill import DistillConfig

    setup["config"] = DistillConfig(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0, views=2, image_size=SIZE,
                                    seed=3, ema_momentum=0.9)
    straight = _distill(setup, "straight")
    first = _distill(setup, "resumed", stop_after=1)
    shutil.copytree(setup["root"] / "resumed", setup["root"] / "after-1")
    resumed = _distill(setup, "resumed", resume=True)
    return {"straight": straight, "first": first, "resumed": resumed}


def _student(setup, run: str):
    """A student compiled as distill compiles it, holding `run`'s last epoch (raw weights and optimizer)."""
    import warnings

    from skinclf.model.mobilenet_v2 import build_student
    from skinclf.training.callbacks import restore
    from skinclf.training.distill import _optimizer, distillation_loss

    model = build_student(num_classes=7, image_size=None, colour_constancy=True)
    model.compile(optimizer=_optimizer(setup["config"], 3), loss=distillation_loss(7, 2.0, 0.7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a skipped optimizer would compare nothing
        restore(model, setup["root"] / run)
    return model


def test_ema_weights_are_what_gets_saved(setup, sessions) -> None:
    from skinclf.model.bundle import load_bundle
    from skinclf.model.mobilenet_v2 import build_student
    from skinclf.training.distill import swap_ema

    model = _student(setup, "after-1")  # epoch 1 is the best epoch of a 1-epoch session
    raw = [np.array(v) for v in model.trainable_variables]
    swap_ema(model)
    ema = [np.array(v) for v in model.trainable_variables]
    best = build_student(num_classes=7, image_size=None, colour_constancy=True)
    best.load_weights(setup["root"] / "after-1" / "best.weights.h5")
    saved = [np.array(v) for v in best.trainable_variables]
    assert all(np.allclose(a, b) for a, b in zip(saved, ema))
    assert not all(np.allclose(a, b) for a, b in zip(saved, raw))
    # The bundle carries the best epoch's EMA weights (its classifier also holds the post-hoc fold).
    straight = build_student(num_classes=7, image_size=None, colour_constancy=True)
    straight.load_weights(setup["root"] / "straight" / "best.weights.h5")
    bundle = load_bundle(setup["root"] / "straight.keras")
    assert np.allclose(bundle.model.get_layer("Conv1").get_weights()[0], straight.get_layer("Conv1").get_weights()[0])
    assert bundle.meta["architecture"]["base"] == "MobileNetV2"
    assert bundle.meta["training"]["best_epoch"] == sessions["straight"]["training"]["best_epoch"]


def test_resumed_distillation_ends_with_the_same_history(setup, sessions) -> None:
    assert sessions["first"] == {}
    assert json.loads((setup["root"] / "after-1" / "state.json").read_text())["epoch"] == 1
    a = json.loads((setup["root"] / "straight" / "state.json").read_text())["history"]
    b = json.loads((setup["root"] / "resumed" / "state.json").read_text())["history"]
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert np.isclose(ra[key], rb[key], rtol=1e-4, atol=1e-5, equal_nan=True), key
    assert sessions["resumed"]["training"]["best_epoch"] == sessions["straight"]["training"]["best_epoch"]


def test_tool_passes_every_setting(setup, monkeypatch) -> None:
    """tools/distill.py hands each option to the view builder and the student (--views once did not)."""
    import importlib.util
    from dataclasses import fields

    from utils.paths import REPO

    import skinclf.engines.load
    import skinclf.training.distill
    import skinclf.training.views

    seen: dict = {}
    monkeypatch.setattr(skinclf.engines.load, "load_engine", lambda *a, **k: type("E", (), {
        "meta": {}, "path": "t", "sha256": "s", "name": "fake", "logits": None})())
    monkeypatch.setattr(skinclf.training.views, "build_views", lambda *a, **k: seen.update(views=k["views"]))
    monkeypatch.setattr(skinclf.training.distill, "distill", lambda **k: seen.update(k))
    spec = importlib.util.spec_from_file_location("distill_tool", REPO / "tools" / "distill.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--data", str(setup["data"]), "--run-dir", str(setup["root"] / "tool-run"), "--views", "3",
                      "--epochs", "5", "--kd-alpha", "0.5", "--decision-weight", "mel=1.5", "--no-colour-constancy",
                      "--resume"]) == 0
    config = seen["config"]
    assert seen["views"] == config.views == 3 and config.epochs == 5 and config.kd_alpha == 0.5
    assert config.decision_weight == "mel=1.5" and not config.colour_constancy and seen["resume"] is False
    defaults = skinclf.training.distill.DistillConfig()
    assert {f.name for f in fields(config)} == {f.name for f in fields(defaults)}
