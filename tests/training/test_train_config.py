"""`TrainConfig`: the CLI builds it from the same options as before, it validates itself, and the
settings it records are exactly those an older skinclf recorded, so `--resume` continues such a run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from skinclf.config import TRAIN, TRAIN_SETTINGS, TrainConfig
from skinclf.errors import SkinclfError

# runs/member3-v2/state.json as written by the code before TrainConfig (tools/train_member3.sh).
RECORDED = {
    "data": "/work/main/data/prepared", "batch_size": 32, "lr": 0.0005, "trainable_layers": 118,
    "class_weight": "sqrt", "loss": "crossentropy", "focal_gamma": 2.0, "monitor": "val_balanced_accuracy",
    "patience": 30, "dropout": 0.25, "label_smoothing": 0.1, "seed": 42, "image_size": 224, "alpha": 1.0,
    "cache_views": 0, "color_jitter": 0.2, "crop_scale": 0.3, "weight_decay": 0.05, "schedule": "cosine",
    "warmup_epochs": 1, "train_size": 160, "fixres_epochs": 4, "colour_constancy": True, "arch": "mobilenetv2",
    "weights": "965ff7350f30b32c3c9e59cb39deb2ea5121376940f8a196056a04cc965058c0",
    "fingerprint": "0a3a2d807747c8c8a7d49a2f588aba6ffa233742db6d06865ba46c25f7616235",
    "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], "epochs_planned": 24,
}
MEMBER3 = ["--arch", "mobilenetv2", "--data", "data/prepared", "--out", "runs/member3-v2.keras",
           "--run-dir", "runs/member3-v2", "--weights", "w.weights.h5", "--trainable-layers", "118", "--epochs", "24",
           "--train-size", "160", "--fixres-epochs", "4", "--schedule", "cosine", "--warmup-epochs", "1",
           "--lr", "5e-4", "--weight-decay", "0.05", "--crop-scale", "0.3", "--color-jitter", "0.2",
           "--colour-constancy", "--label-smoothing", "0.1", "--class-weight", "sqrt", "--prior-correction", "fit",
           "--calibrate", "--monitor", "val_balanced_accuracy", "--patience", "30", "--workers", "2"]


def _config_from_cli(runner, monkeypatch, args: list[str]) -> TrainConfig:
    import skinclf.training.train as train_mod
    from skinclf.cli import app

    seen = []

    def capture(config, **_):
        seen.append(config)
        raise SkinclfError("captured")

    monkeypatch.setattr(train_mod, "train_model", capture)
    result = runner.invoke(app, ["train", *args])
    assert "captured" in result.output, result.output
    return seen[0]


def test_the_cli_builds_one_frozen_config(runner, monkeypatch) -> None:
    config = _config_from_cli(runner, monkeypatch, MEMBER3)
    assert config.arch == "mobilenetv2" and config.epochs == 24 and config.colour_constancy is True
    assert config.run_dir == Path("runs/member3-v2") and config.prior_correction == "fit"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]
    assert _config_from_cli(runner, monkeypatch, []) == TRAIN  # no option: the defaults


def test_validate_refuses_a_bad_setting_in_one_line() -> None:
    TRAIN.validate()
    with pytest.raises(SkinclfError, match=r"--epochs 0: must be at least 1"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(SkinclfError, match=r"--lr 0.0: must be positive"):
        TrainConfig(lr=0.0).validate()
    with pytest.raises(SkinclfError, match=r"--schedule 'step': choose one of plateau, cosine"):
        TrainConfig(schedule="step").validate()


def test_the_settings_record_keeps_its_keys_and_values_so_an_old_run_resumes(runner, monkeypatch,
                                                                             tmp_path: Path) -> None:
    import skinclf.training.train as train_mod
    from skinclf.training.callbacks import resume_state

    config = dataclasses.replace(_config_from_cli(runner, monkeypatch, MEMBER3), weights=RECORDED["weights"])
    assert TRAIN_SETTINGS == tuple(list(RECORDED)[1:24])
    monkeypatch.setattr(train_mod, "_data_fingerprint", lambda *a: RECORDED["fingerprint"])
    data = Path(RECORDED["data"])
    settings = train_mod._settings(config, data=data, weights_arg=config.weights, train_set=SimpleNamespace(
        classes=tuple(RECORDED["classes"])), val_set=None)
    assert list(settings) == list(RECORDED)
    assert {**settings, "data": RECORDED["data"]} == RECORDED
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"settings": {**RECORDED, "data": settings["data"]}, "epoch": 5}))
    assert resume_state(run, settings, True) == {"epoch": 5}
