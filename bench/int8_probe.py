"""Where does int8 lose the bundled model's accuracy, and what holds it? Variants side by side, one run.

    python bench/int8_probe.py [--model models/skinclf-mobilenet.keras] [--train data/prepared/train]
        [--val data/prepared/val] [--calibration 144] [--every 1] [--per-layer] [--keep 0,3,5,7,9]

Every variant is ONNX Runtime's static QDQ quantization (per-channel int8 weights) of the bundle's
float ONNX form (the graph ends at the pooled features; the numpy head stays float), calibrated on
the same training images (every k-th of the training split), then scored against the float model
on every `--every`-th validation image (validation chose the model; no test image is read): top-1
agreement, balanced accuracy, melanoma recall, and the speed ratio to float measured in the same
run (best of 3 alternating rounds on 96 images).

- `--per-layer`: one convolution of the first member quantized at a time (the rest float): the
  sensitivity table of the model card (slow: one quantization per layer).
- `--keep`: the first k convolutions of every member kept in float (mixed precision), the rest int8;
  with `--method` minmax (default), percentile or entropy calibration, and `--activations` int8 or
  uint8.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.data.images import load_image  # noqa: E402
from skinclf.data.layout import list_labelled_images  # noqa: E402
from skinclf.engines.export import float_onnx, quantize, sample_images  # noqa: E402
from skinclf.engines.int8 import float_nodes  # noqa: E402
from skinclf.engines.onnx import session  # noqa: E402
from skinclf.metrics import balanced_accuracy  # noqa: E402
from skinclf.model.head import HEAD_KEY, LinearHead  # noqa: E402


def logits(sess, head: LinearHead, x: np.ndarray) -> np.ndarray:
    return np.concatenate([head(sess.run(["features"], {"image": x[i : i + 32]})[0]) for i in range(0, len(x), 32)])


def speed(sessions: dict, x: np.ndarray) -> dict[str, float]:
    best = dict.fromkeys(sessions, float("inf"))
    for _ in range(3):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            for i in range(0, len(x), 32):
                sess.run(["features"], {"image": x[i : i + 32]})
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def conv_names(data: bytes) -> list[str]:
    import onnx

    return [n.name for n in onnx.load_from_string(data).graph.node if n.op_type == "Conv"]


def main() -> None:
    import onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/skinclf-mobilenet.keras"))
    ap.add_argument("--train", type=Path, default=Path("data/prepared/train"))
    ap.add_argument("--val", type=Path, default=Path("data/prepared/val"))
    ap.add_argument("--calibration", type=int, default=144)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--keep", default="0,3,5,7,9", help="first-k-float variants to try")
    ap.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy"])
    ap.add_argument("--activations", default="int8", choices=["int8", "uint8"])
    args = ap.parse_args()
    from onnxruntime.quantization import CalibrationMethod, QuantType

    from skinclf.model.bundle import load_bundle

    bundle = load_bundle(args.model)
    data = float_onnx(bundle)
    head = LinearHead.from_json({p.key: p.value for p in onnx.load_from_string(data).metadata_props}[HEAD_KEY])
    size, classes = bundle.image_size, list(bundle.classes)
    calib = np.stack([load_image(p, size) for p in sample_images(args.train, classes, args.calibration)])
    val = list_labelled_images(args.val, classes=tuple(classes))
    paths, labels = val.paths[:: args.every], np.asarray(val.labels)[:: args.every]
    x = np.stack([load_image(p, size) for p in paths]).astype("float32")
    ref_sess = session(data)
    ref = logits(ref_sess, head, x).argmax(1)
    mel = classes.index("mel")

    def figures(pred: np.ndarray) -> str:
        return (f"agreement {np.mean(pred == ref):.3f}, balanced accuracy {balanced_accuracy(labels, pred):.4f}, "
                f"melanoma recall {np.mean(pred[labels == mel] == mel):.3f}")

    print(f"{len(x)} validation images, {len(calib)} calibration images; float: {figures(ref)}", flush=True)
    options = {"calibrate_method": {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                    "entropy": CalibrationMethod.Entropy}[args.method],
               "activation_type": QuantType.QUInt8 if args.activations == "uint8" else QuantType.QInt8}
    sessions = {"float": ref_sess}
    convs = conv_names(data)
    if args.per_layer:
        first_member = convs[: len(convs) // max(1, len(bundle.meta.get("members", [])) or 2)]
        print("| layer | agreement | balanced accuracy | melanoma recall |\n|---|---:|---:|---:|")
        for name in first_member:
            q = quantize(data, calib, nodes_to_quantize=[name], **options)
            pred = logits(session(q), head, x).argmax(1)
            print(f"| {name.split('/')[0]} | {np.mean(pred == ref):.3f} | {balanced_accuracy(labels, pred):.4f} | "
                  f"{np.mean(pred[labels == mel] == mel):.3f} |", flush=True)
    for k in [int(v) for v in args.keep.split(",") if v != ""]:
        q = quantize(data, calib, nodes_to_exclude=float_nodes(data, k), **options)
        sess = session(q)
        sessions[f"first {k} float"] = sess
        print(f"- first {k} convolutions of each member float, {args.method}, {args.activations}: "
              f"{figures(logits(sess, head, x).argmax(1))}", flush=True)
    times = speed(sessions, x[:96])
    print("speed vs float (same run, best of 3): " + "; ".join(
        f"{name} {times['float'] / t:.2f}x" for name, t in times.items() if name != "float"))


if __name__ == "__main__":
    main()
