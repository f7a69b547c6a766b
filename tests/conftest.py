"""Shared fixtures: tiny synthetic datasets built on the fly, and the real shared data.

The helpers they use live in tests/utils/ and are importable from here too (`from conftest import ...`).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest
from typer.testing import CliRunner
from utils.models import interrupt_after, make_tiny_bundle, make_tiny_onnx, with_ood_record  # noqa: F401
from utils.paths import BUNDLED_MODEL, REPO, SHARED, SHARED_FULLRES, SHARED_HAM, SHARED_WEIGHTS, require  # noqa: F401
from utils.synthetic import (  # noqa: F401
    CLASS_COLOURS,
    CLASSES,
    FakeKaggleApi,
    HTTPErrorLike,
    kaggle_style_zip,
    lesion_folder,
    lesion_image,
    write_ham,
)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def tiny_ham(tmp_path: Path) -> Path:
    return write_ham(tmp_path / "ham")


@pytest.fixture
def ham_zip(tiny_ham: Path, tmp_path: Path) -> Path:
    return kaggle_style_zip(tiny_ham, tmp_path / "skin-cancer-mnist-ham10000.zip")


@pytest.fixture
def no_kaggle_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.keras")
