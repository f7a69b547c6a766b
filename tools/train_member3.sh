#!/usr/bin/env bash
# The third ensemble member: MobileNetV2 1.0/224 (../shared/weights, batch norms folded and frozen)
# with exp10's full fine-tuning recipe (blocks 4-16 trained, 20 epochs at 160 px, 4 at 224).
# Resumable: run it again with --resume after an interruption. Extra arguments are appended.
set -euo pipefail
weights=${SKINCLF_WEIGHTS_V2:-../shared/weights/mobilenet_v2_1.0_224_imagenet_dequant_no_top.weights.h5}
exec skinclf train --arch mobilenetv2 --data data/prepared --out runs/member3-v2.keras --run-dir runs/member3-v2 \
  --weights "$weights" \
  --trainable-layers 118 --epochs 24 --train-size 160 --fixres-epochs 4 \
  --schedule cosine --warmup-epochs 1 --lr 5e-4 --weight-decay 0.05 \
  --crop-scale 0.3 --color-jitter 0.2 --colour-constancy --label-smoothing 0.1 \
  --class-weight sqrt --prior-correction fit --calibrate \
  --monitor val_balanced_accuracy --patience 30 --workers 2 "$@"
