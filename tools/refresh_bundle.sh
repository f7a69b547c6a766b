#!/usr/bin/env bash
# Make the finished training run the bundled model and regenerate everything derived from it,
# in one command (run from the repository root, with the train extra installed):
#
#     bash tools/refresh_bundle.sh
#
# 1. re-bundle the finished run of tools/train_bundled.sh into models/ (no training: the best
#    epoch, prior correction and temperature fitted on validation, the split's image ids);
# 2. calibrate: temperature refit and the out-of-distribution threshold on validation, the trust
#    figures and heat maps (bench/trust_report.py, docs/);
# 3. the ONNX form, checked against Keras (skinclf export);
# 4. validation and test reports (reports/val, reports/test: the test split is a second look);
# 5. the fixed-image outputs the integration test checks (tests/fixed_image_expected.json).
# The model card and README quote the numbers these write.
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/skinclf-mobilenet.keras
bash tools/train_bundled.sh --resume --out "$model"
python bench/trust_report.py --model "$model" --val data/prepared/val --out reports/trust --docs docs --in-place
skinclf export "$model" --format onnx --out models/skinclf-mobilenet.onnx
skinclf evaluate --model "$model" --data data/prepared/val --out reports/val --engine keras --json > reports/val.json
skinclf evaluate --model "$model" --data data/prepared/test --out reports/test --engine keras --json > reports/test.json
python tools/fixed_image.py > tests/fixed_image_expected.json.tmp
mv tests/fixed_image_expected.json.tmp tests/fixed_image_expected.json
echo "Refreshed $model and everything derived from it; quote reports/{val,test}.json and reports/trust/trust.md."
