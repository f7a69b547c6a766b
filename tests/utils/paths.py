"""Where the checkout, the shared data and the bundled model are; `require` skips a test without them."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SHARED_HAM = SHARED / "data" / "ham10000"
SHARED_FULLRES = SHARED / "data" / "ham10000-fullres"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_1_0_224_imagenet_partial_no_top.weights.h5"
BUNDLED_MODEL = REPO / "models" / "skinclf-mobilenet.keras"


def require(path: Path) -> Path:
    """Skip the test when shared data or the bundled model is absent (it is present in CI)."""
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path
