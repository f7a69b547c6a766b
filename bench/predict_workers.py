"""Decoding beside the model or between its batches? `skinclf predict` with 0 (inline), 1 and 2
decoding threads on the 300 full-size samples, alternating rounds, best of each, one run.

    python bench/predict_workers.py [--images ../shared/data/ham10000-fullres] [--rounds 3]

On a 2-core machine the engine's own threads use both cores; a decoding thread beside them preempts
one, and each parallel operator waits for the straggler. `--workers 0` (automatic) decodes inline
there (`skinclf.parallel.decode_workers`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from skinclf.batch.predict import predict_directory  # noqa: E402
from skinclf.parallel import usable_cpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared/data/ham10000-fullres")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for workers in (0, 1, 2):
                summary = predict_directory(directory=args.images, out=Path(tmp) / f"{workers}-{r}.csv",
                                            workers=workers if workers else 0, show_progress=False)
                best[workers] = max(best.get(workers, 0.0), summary.images_per_second)
    print(f"{usable_cpus()} usable CPUs; img/s, best of {args.rounds}: " + "; ".join(
        f"{'inline' if w == 0 else f'{w} thread(s)'} {rate:.1f}" for w, rate in best.items()))
    print(f"inline / 2 threads = {best[0] / best[2]:.2f}")


if __name__ == "__main__":
    main()
