"""Where does int8 lose the bundled model's accuracy? Quantization variants side by side, one run.

    python bench/int8_probe.py [--onnx models/skinclf-mobilenet.onnx] [--train data/prepared/train]
        [--val data/prepared/val] [--calibration 200] [--every 3]

Each variant is ONNX Runtime's static QDQ quantization (per-channel int8 weights) of the bundled
float ONNX form, calibrated on the same training images, then scored against the float model on
every `--every`-th validation image (the validation split chose the model; no test image is read):
top-1 agreement, balanced accuracy, melanoma recall, and the speed ratio to float measured in the
same run (best of 3 alternating rounds on 64 images). The variants isolate the suspects: the Shades
of Gray colour-constancy block (Pow 6, a mean, Pow 1/6) and the preprocessing in front of the first
convolution, the first convolution, and the dense heads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.data.images import load_image
from skinclf.data.layout import list_labelled_images
from skinclf.engines.export import quantize
from skinclf.metrics import balanced_accuracy
from skinclf.engines.onnx import read_model_meta, session


def variants(model) -> dict[str, dict]:
    """quantize_static keyword arguments per variant."""
    nodes = list(model.graph.node)
    before_first_conv = []
    for node in nodes:
        if node.op_type == "Conv":
            break
        before_first_conv.append(node.name)
    first_convs = [n.name for n in nodes if n.op_type == "Conv" and n.input[0] == nodes[len(before_first_conv)].input[0]]
    heads = [n.name for n in nodes if n.op_type == "Gemm"]
    return {
        "everything (today's export)": {},
        "convolutions only": {"op_types_to_quantize": ["Conv"]},
        "convolutions and heads, colour constancy float": {"op_types_to_quantize": ["Conv", "Gemm"],
                                                           "nodes_to_exclude": before_first_conv},
        "convolutions only, first convolution float": {"op_types_to_quantize": ["Conv"],
                                                       "nodes_to_exclude": before_first_conv + first_convs},
        "everything but colour constancy and heads": {"nodes_to_exclude": before_first_conv + heads},
    }


def run(sess, x: np.ndarray) -> np.ndarray:
    return np.concatenate([sess.run(["probabilities"], {"image": x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def speed(sessions: dict, x: np.ndarray) -> dict[str, float]:
    best = dict.fromkeys(sessions, float("inf"))
    for _ in range(3):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            run(sess, x)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    import onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, default=Path("models/skinclf-mobilenet.onnx"))
    ap.add_argument("--train", type=Path, default=Path("data/prepared/train"))
    ap.add_argument("--val", type=Path, default=Path("data/prepared/val"))
    ap.add_argument("--calibration", type=int, default=200)
    ap.add_argument("--every", type=int, default=3)
    args = ap.parse_args()
    meta = read_model_meta(args.onnx)
    classes, size = list(meta["classes"]), int(meta["input_size"][0])
    train = list_labelled_images(args.train, classes=tuple(classes)).paths
    calib = np.stack([load_image(p, size) for p in train[:: max(1, len(train) // args.calibration)][: args.calibration]])
    val = list_labelled_images(args.val, classes=tuple(classes))
    paths, labels = val.paths[:: args.every], np.asarray(val.labels)[:: args.every]
    x = np.stack([load_image(p, size) for p in paths]).astype("float32")
    ref_sess = session(args.onnx.read_bytes())
    ref = run(ref_sess, x)
    mel = classes.index("mel")

    def figures(p: np.ndarray) -> str:
        pred = p.argmax(1)
        return (f"agreement {np.mean(pred == ref.argmax(1)):.1%}, balanced accuracy {balanced_accuracy(labels, pred):.3f}, "
                f"melanoma recall {np.mean(pred[labels == mel] == mel):.3f}")

    print(f"{len(x)} validation images, {len(calib)} calibration images; float: {figures(ref)}")
    sessions = {"float": ref_sess}
    model = onnx.load(str(args.onnx))
    for name, kwargs in variants(model).items():
        sess = session(quantize(args.onnx.read_bytes(), calib.astype("float32"), **kwargs))
        sessions[name] = sess
        print(f"- {name}: {figures(run(sess, x))}", flush=True)
    times = speed(sessions, x[:64])
    print("speed vs float (same run, best of 3): " + "; ".join(
        f"{name} {times['float'] / t:.2f}x" for name, t in times.items() if name != "float"))


if __name__ == "__main__":
    main()
