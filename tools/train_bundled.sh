#!/usr/bin/env bash
# The exact training command of the bundled model (extra arguments are appended, e.g. --resume).
# Needs the prepared split (skinclf prepare --seed 42) in data/prepared and the ImageNet weights
# file; see README "Reproduce".
set -euo pipefail
weights=${SKINCLF_WEIGHTS:-../shared/weights/mobilenet_1_0_224_imagenet_partial_no_top.weights.h5}
exec skinclf train --data data/prepared --out runs/exp10.keras --run-dir runs/exp10 \
  --weights "$weights" \
  --trainable-layers 63 --epochs 24 --train-size 160 --fixres-epochs 4 \
  --schedule cosine --warmup-epochs 1 --lr 5e-4 --weight-decay 0.05 \
  --crop-scale 0.3 --color-jitter 0.2 --colour-constancy --label-smoothing 0.1 \
  --class-weight sqrt --prior-correction fit --calibrate \
  --monitor val_balanced_accuracy --patience 30 --workers 3 "$@"
