"""Record the bundled model's output on fixed images, for tests/test_bundled_model.py.

    python tools/fixed_image.py > tests/fixed_image_expected.json

Run by tools/refresh_bundle.sh whenever the bundled model changes: the test then checks that
the committed model (by SHA-256), the Keras and ONNX engines and the preprocessing still give
these numbers, so any accidental change of one of them shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from skinclf.data.images import load_image  # noqa: E402
from skinclf.engines.load import load_engine  # noqa: E402

FIXED = ["ISIC_0024358.jpg", "ISIC_0024566.jpg"]
SAMPLES = REPO.parent / "shared" / "data" / "ham10000-fullres"


def _probs(engine) -> dict:
    import numpy as np

    x = np.stack([load_image(SAMPLES / name, engine.image_size) for name in FIXED]).astype("float32")
    return {name: {c: round(float(p), 6) for c, p in zip(engine.classes, row)} for name, row in zip(FIXED, engine(x))}


def main() -> None:
    model = REPO / "models" / "skinclf-mobilenet.keras"
    keras = load_engine(model, engine="keras")
    # The ONNX forms the light install runs (int8 is auto's choice), each checked against its own record.
    print(json.dumps({"model_sha256": keras.sha256, "images": _probs(keras),
                      "engines": {name: _probs(load_engine(model, engine=name)) for name in ("onnx", "onnx-int8")}},
                     indent=2))


if __name__ == "__main__":
    main()
