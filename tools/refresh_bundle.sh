#!/usr/bin/env bash
# Make the finished training run the bundled model and regenerate everything derived from it,
# in one command (run from the repository root, with the train extra installed):
#
#     bash tools/refresh_bundle.sh                 # from the finished training run (step 1 on)
#     bash tools/refresh_bundle.sh --from-bundled  # from models/skinclf-mobilenet.keras as it is (step 2 on)
#
# 1. re-bundle the finished run of tools/train_bundled.sh (no training: the best epoch, prior
#    correction and temperature fitted on validation, the split's image ids) and average it with
#    the earlier exp02 network into models/ (skinclf ensemble, its own post-hoc fitted on validation);
# 2. calibrate: temperature refit and the out-of-distribution flag (the Mahalanobis distance of the
#    pooled features: class means and covariance fitted on data/prepared/train, threshold passing
#    95% of validation), the trust figures and heat maps (bench/trust_report.py, docs/);
# 2b. the held-out test figures and the flag's false-alarm rate on test recorded in the bundle, for
#    /api/model (tools/held_out_figures.py: a look at the test split, after every choice is made);
# 2c. the patient-metadata head (age, sex, body site; tools/fit_metadata_head.py): fitted on the image
#    model's outputs on data/prepared/train with fields hidden at random, chosen and given its temperature
#    on validation, test figures a first look; refit here whenever the image model changes (a head fitted
#    to another version of the image model is refused at run time). Reads HAM10000_metadata.csv beside the
#    repo (../shared/data/ham10000/) or from $HAM10000_METADATA;
# 3. the ONNX forms, checked: float (the graph ends at the pooled features; the numpy head is stored
#    beside it) against Keras, and int8 (mixed precision, bench/int8_probe.py) against float on the
#    whole validation split: the light install's default engine when it holds;
# 4. validation and test reports (reports/val, reports/test: the test split is a second look);
# 5. the test figures' PNGs in models/, the fixed-image outputs the integration test checks
#    (tests/fixed_image_expected.json) and every figures table in README.md and the model card
#    (tools/card_figures.py).
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/skinclf-mobilenet.keras
# The bundled model is an ensemble of two networks (model card: "Runs"):
#  - exp10, the full fine-tuning recipe (tools/train_bundled.sh; --resume on the finished run
#    re-bundles it without training);
#  - exp02, the previous bundled model (feature-cache recipe), taken from the commit that
#    bundled it and checked by its SHA-256.
if [ "${1:-}" != "--from-bundled" ]; then
  bash tools/train_bundled.sh --resume
  exp02_sha=fb677a43f5566fb0218afdcb745fffe86f5d3ba57229c155d7b182f11a832a78
  git show 204a6bb:models/skinclf-mobilenet.keras > runs/exp02.keras
  echo "$exp02_sha  runs/exp02.keras" | sha256sum --check --quiet
  # Prior correction, the melanoma decision weight and the temperature are fitted or chosen on
  # the validation split (model card: the weight is the largest validation balanced accuracy
  # with melanoma recall >= 0.75).
  skinclf ensemble runs/exp10.keras runs/exp02.keras --out "$model" --overwrite --val data/prepared/val \
    --prior-correction fit --decision-weight mel=1.75 --calibrate
fi
# Step 2 starts here with --from-bundled: everything below reads only models/skinclf-mobilenet.keras.
# calibrate (inside trust_report) reads data/prepared/train for the features' statistics.
python bench/trust_report.py --model "$model" --val data/prepared/val --out reports/trust --docs docs --in-place
python tools/held_out_figures.py --model "$model" --test data/prepared/test \
  --note "third look: the test split was evaluated before for exp02 and for the two-network ensemble (exp10 + exp02)"
python tools/fit_metadata_head.py --model "$model" --test --report reports/metadata_head.json \
  ${HAM10000_METADATA:+--metadata "$HAM10000_METADATA"}
skinclf export "$model" --format onnx --out models/skinclf-mobilenet.onnx --overwrite
skinclf export "$model" --format onnx-int8 --out models/skinclf-mobilenet.int8.onnx --overwrite \
  --calibration data/prepared/train --validation data/prepared/val
skinclf evaluate --model "$model" --data data/prepared/val --out reports/val --engine keras --json > reports/val.json
skinclf evaluate --model "$model" --data data/prepared/test --out reports/test --engine keras --json > reports/test.json
python tools/test_calibration.py > reports/test_calibration.json
cp reports/test/confusion_matrix.png models/test_confusion_matrix.png
cp reports/test/roc.png models/test_roc.png
# An ensemble shows its members' histories; the bundled one predates that, so its curves stay as drawn.
if skinclf evaluate --history --model "$model" --out reports/curves --overwrite; then
  cp reports/curves/history.png models/training_curves.png
else
  echo "kept models/training_curves.png (drawn from the members' own bundles)"
fi
python tools/fixed_image.py > tests/fixed_image_expected.json.tmp
mv tests/fixed_image_expected.json.tmp tests/fixed_image_expected.json
python tools/card_figures.py
echo "Refreshed $model and everything derived from it; check the prose around the regenerated tables."
