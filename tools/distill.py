"""Distil the bundled ensemble into one MobileNetV2 (issue 23): teacher views once, then the student.

    python tools/distill.py --run-dir runs/distill-v2 --out runs/distill-v2.keras [--resume]

Builds (or finishes) the view cache in --views-dir, then trains; `--resume` continues both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

V2_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_1.0_224_imagenet_dequant_no_top.weights.h5"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/prepared"))
    p.add_argument("--teacher", type=Path, default=REPO / "models" / "skinclf-mobilenet.keras")
    p.add_argument("--views-dir", type=Path, default=Path("runs/teacher-views"))
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--size", type=int, default=160, help="student training side (train small)")
    p.add_argument("--image-size", type=int, default=224, help="validation and bundle side (test large)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--views-only", action="store_true", help="build the view cache and stop")
    p.add_argument("--run-dir", type=Path, default=Path("runs/distill-v2"))
    p.add_argument("--out", type=Path, default=Path("runs/distill-v2.keras"))
    p.add_argument("--weights", default=str(V2_WEIGHTS))
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--kd-alpha", type=float, default=0.7, help="share of the distillation term (rest: labels)")
    p.add_argument("--class-weight", default="sqrt")
    p.add_argument("--ema-momentum", type=float, default=0.998)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--colour-constancy", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--decision-weight", default="none", help="e.g. mel=1.75 (the bundle's melanoma rule)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resume", action="store_true",
                   help="continue the views and the run (from scratch if no epoch ended)")
    args = p.parse_args(argv)

    from skinclf.data.layout import list_labelled_images
    from skinclf.engines.load import load_engine
    from skinclf.training.augment import WINNERS
    from skinclf.training.views import ViewSpec, build_views, engine_teacher

    train_set = list_labelled_images(args.data / "train")
    spec = ViewSpec(size=args.size, teacher_size=args.image_size, seed=args.seed, augment=WINNERS)
    engine = load_engine(args.teacher, engine="auto", batch_size=args.batch_size)
    teacher, record = engine_teacher(engine)
    build_views(train_set.paths, args.views_dir, spec, teacher, views=args.views, teacher_record=record,
                num_classes=len(train_set.classes), batch_size=args.batch_size, workers=args.workers,
                show_progress=False)
    del engine, teacher
    if args.views_only:
        return 0
    from skinclf.training.distill import DistillConfig, distill

    config = DistillConfig(epochs=args.epochs, views=args.views, batch_size=args.batch_size, lr=args.lr,
                           weight_decay=args.weight_decay,
                           warmup_epochs=args.warmup_epochs, kd_temperature=args.kd_temperature,
                           kd_alpha=args.kd_alpha, class_weight=args.class_weight, ema_momentum=args.ema_momentum,
                           dropout=args.dropout, colour_constancy=args.colour_constancy, seed=args.seed,
                           image_size=args.image_size, decision_weight=args.decision_weight)
    distill(data=args.data, views_dir=args.views_dir, run_dir=args.run_dir, out=args.out, weights=args.weights,
            config=config, workers=args.workers,
            resume=args.resume and (args.run_dir / "state.json").is_file())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
