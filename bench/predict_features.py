"""Does the pooled-features output cost predict anything? Throughput with and without it, one run.

    python bench/predict_features.py --model /work/runs/bundle-ood/skinclf-mobilenet.onnx \
        [--images ../shared/data/ham10000-fullres] [--rounds 3]

Two engines on the same model file: the engine as loaded (one forward pass gives logits and
features, which the runner carries and the Mahalanobis flag scores) and the same engine asked
for logits only (ONNX: `session.run(["logits"])`; Keras: the logits output alone). Each round
runs the batch runner (`predict_files`: threaded decoding, TTA 1) over every image in both modes,
in alternating order, so drift on a busy machine hits them alike; the best round of each is kept
and the ratio printed. The issue's floor: with / without >= 0.95.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.data.walk import walk_images
from skinclf.engines.load import load_engine
from skinclf.engines.runner import predict_files
from skinclf.model.outlier import active_record, flag
from skinclf.parallel import usable_cpus


def logits_only(engine):
    """A copy of `engine` whose forward pass asks for the logits alone."""
    plain = copy.copy(engine)
    if engine.name == "onnx":
        plain._outputs, plain._features_dim = ["logits"], 0
    else:
        from skinclf.backend import load_keras

        keras = load_keras()
        plain.model = keras.Model(engine.model.inputs, engine.model.outputs[0])
        plain._two = False
    return plain


def rate(engine, paths: list[Path], workers: int) -> float:
    ood = active_record(engine.meta.get("ood"), engine.features_dim > 0)
    started = time.perf_counter()
    for batch in predict_files(engine, paths, workers=workers):
        flag(batch.logits, ood, batch.features)  # what predict does with each batch
    return len(paths) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/skinclf-mobilenet.onnx"))
    parser.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                        / "ham10000-fullres")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    engine = load_engine(args.model, batch_size=args.batch_size)
    if not engine.features_dim:
        print(f"{args.model} gives no features output: nothing to compare", file=sys.stderr)
        return 1
    plain = logits_only(engine)
    paths = [args.images / f for f in walk_images(args.images, recursive=True).files]
    workers = usable_cpus()
    rate(engine, paths[: args.batch_size], workers)  # warm both up before the clock
    rate(plain, paths[: args.batch_size], workers)
    best = {"with features": 0.0, "logits only": 0.0}
    for r in range(args.rounds):
        order = [("with features", engine), ("logits only", plain)]
        for name, e in order if r % 2 == 0 else order[::-1]:
            best[name] = max(best[name], rate(e, paths, workers))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in best.items()), flush=True)
    ratio = best["with features"] / best["logits only"]
    print(f"{engine.name} engine, {len(paths)} images, batch {args.batch_size}, best of {args.rounds} rounds: "
          f"with features {best['with features']:.1f} img/s, logits only {best['logits only']:.1f} img/s, "
          f"ratio {ratio:.3f} (floor 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
