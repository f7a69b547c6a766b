"""Does Shades of Gray colour constancy help? A cheap linear-probe check on the validation split.

Trains nothing but a logistic regression: ImageNet MobileNet features (globally pooled
`conv_dw_13_relu`, the last fully pretrained layer of the offline weights) of the training
split, with and without the colour-constancy layer in front, scored by balanced accuracy on the
validation split. A proxy for full fine-tuning, chosen because it costs minutes, not hours.

    python bench/colour_constancy_probe.py --data data/prepared \
        --weights ../shared/weights/mobilenet_1_0_224_imagenet_partial_no_top.weights.h5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from skinclf.backend import load_keras
from skinclf.data.layout import list_labelled_images
from skinclf.model.network import build_model
from skinclf.model.posthoc import balanced_accuracy
from skinclf.training.loader import ImageBatches

keras = load_keras()


def features(model, images, size: int) -> np.ndarray:
    batches = ImageBatches(images.paths, images.labels, num_classes=len(images.classes), image_size=size,
                           batch_size=64, workers=2)
    return np.concatenate([np.asarray(model.predict_on_batch(batches[b][0])) for b in range(len(batches))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    train = list_labelled_images(args.data / "train")
    val = list_labelled_images(args.data / "val", classes=train.classes)
    for cc in (False, True):
        model = build_model(num_classes=len(train.classes), image_size=args.size, weights=args.weights,
                            colour_constancy=cc)
        x = inputs = keras.Input((args.size, args.size, 3))
        for layer in model.layers[1:]:  # re-apply the chain: shared layers have several call sites
            x = layer(x)
            if layer.name == "conv_dw_13_relu":
                break
        probe = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
        xt, xv = features(probe, train, args.size), features(probe, val, args.size)
        scaler = StandardScaler().fit(xt)
        clf = LogisticRegression(max_iter=2000, class_weight="balanced", C=0.1).fit(scaler.transform(xt), train.labels)
        bal = balanced_accuracy(np.asarray(val.labels), clf.predict(scaler.transform(xv)), len(train.classes))
        print(f"colour constancy {'on ' if cc else 'off'}: validation balanced accuracy {bal:.3f}", flush=True)


if __name__ == "__main__":
    main()
