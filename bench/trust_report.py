"""Trust figures of a bundle for the README and the model card, in one command.

    python bench/trust_report.py --model models/skinclf-mobilenet.keras \
        --val data/prepared/val --out reports/trust --docs docs

1. `skinclf calibrate` on the validation split (temperature refit + OOD flag), writing the
   calibrated bundle to `--calibrated` (default `<out>/calibrated.keras`; `--in-place` replaces
   `--model`, as the bundled model should be shipped);
2. the images from the issue (flat blue, a landscape photograph, a page of text) before and after;
3. heat maps (`skinclf explain`) of two validation images, the first melanoma and the first
   nevus by file name (not chosen by result), as small PNGs in `--docs`;
4. `trust.json` (everything) and `trust.md` (tables to paste) in `--out`, the reliability
   diagram copied to `--docs`.

Only the validation split is used: the test split chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.engines.load import load_engine  # noqa: E402
from skinclf.files import atomic_write, atomic_write_json  # noqa: E402
from skinclf.model.outlier import flag  # noqa: E402
from skinclf.model.posthoc import softmax  # noqa: E402
from skinclf.trust.calibrate import calibrate_model  # noqa: E402
from skinclf.trust.explain import explain_files  # noqa: E402
from skinclf.trust.reference_images import _text_page

MAX_PNG_BYTES = 200_000


def issue_images(size: int) -> dict[str, np.ndarray]:
    """The three inputs the issue quotes: a flat blue picture, a landscape photograph, a page of text."""
    from sklearn.datasets import load_sample_images

    china = Image.fromarray(load_sample_images().images[0]).resize((size, size), Image.Resampling.BILINEAR)
    page = _text_page(np.random.default_rng(7), size).resize((size, size), Image.Resampling.BILINEAR)
    return {"flat blue picture": np.full((size, size, 3), (0, 0, 255), dtype="float32"),
            "landscape photograph (scikit-learn china.jpg)": np.asarray(china, dtype="float32"),
            "page of text (generated)": np.asarray(page.convert("RGB"), dtype="float32")}


def describe(engine, images: dict[str, np.ndarray], ood: dict | None) -> list[dict]:
    names, x = list(images), np.stack(list(images.values()))
    logits, features = engine.forward(x)  # one pass: the flag may score the pooled features
    probs = softmax(logits)
    scores, flagged = flag(logits, ood, features)
    return [{"image": n, "top1": engine.classes[int(p.argmax())], "top1_prob": round(float(p.max()), 4),
             "ood_score": round(float(s), 4), "flagged": bool(f)}
            for n, p, s, f in zip(names, probs, scores, flagged)]


def small_png(path: Path) -> Path:
    """Re-save as a 256-colour PNG when over the size limit for docs/."""
    if path.stat().st_size > MAX_PNG_BYTES:
        with Image.open(path) as im:
            im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def markdown(report: dict) -> str:
    cal, ood = report["calibration"], report["ood"]
    lines = [f"### Trust figures: `{Path(report['model']['path']).name}` (validation split, {cal['images']} images)", "",
             "| calibration on the validation split | ECE (15 bins) | NLL | Brier |", "|---|---:|---:|---:|"]
    for label, key in ((f"before (temperature {cal['refit']['previous_temperature']:.3g})", "validation_before"),
                       (f"after (temperature {cal['temperature']:.3g}), fitted and measured on validation",
                        "validation_after"),
                       ("after, two-fold cross-fitted (honest estimate)", "validation_after_cross_fitted")):
        r = cal[key]
        lines.append(f"| {label} | {r['ece']:.4f} | {r['nll']:.4f} | {r['brier']:.4f} |")
    lines += ["", "| confidence bin | images before | accuracy before | images after | accuracy after |",
              "|---|---:|---:|---:|---:|"]
    for b, a in zip(report["reliability"]["before"], report["reliability"]["after"]):
        if b["count"] or a["count"]:
            acc = [f"{r['accuracy']:.2f}" if r["count"] else "-" for r in (b, a)]
            lines.append(f"| {b['low']:.2f}-{b['high']:.2f} | {b['count']} | {acc[0]} | {a['count']} | {acc[1]} |")
    lines += ["", f"Out-of-distribution score: **{ood['score']}** ({ood['formula']}), flagged above "
              f"{ood['threshold']:.4g}, the threshold that {ood['pass_rate']:.0%} of the validation images pass. "
              "Separation (ROC-AUC, validation vs each set; mean over sets): "
              + ", ".join(f"{k} {v['mean_auroc']:.3f}" for k, v in ood["separation"].items()) + ".", "",
              "| images | n | flagged | ROC-AUC |", "|---|---:|---:|---:|"]
    aucs = ood["separation"][ood["score"]]["auroc"]
    for name, rate in ood["flag_rates"].items():
        auc = f"{aucs[name]:.3f}" if name in aucs else "-"
        lines.append(f"| {name} | {ood['counts'][name]} | {rate:.1%} | {auc} |")
    lines += ["", "| input from the issue | before: top class | after: top class | flagged after |",
              "|---|---|---|---|"]
    for b, a in zip(report["issue_examples"]["before"], report["issue_examples"]["after"]):
        lines.append(f"| {b['image']} | {b['top1']} {b['top1_prob']:.4f} | {a['top1']} {a['top1_prob']:.4f} | "
                     f"{'yes' if a['flagged'] else 'no'} |")
    lines += ["", "Heat maps (occlusion sensitivity, validation images): "
              + ", ".join(f"`{h['png']}` ({h['path']}: {h['top'][0][0]} {h['top'][0][1]:.2f})"
                          for h in report["heatmaps"]), "",
              f"Generated by `python bench/trust_report.py` in {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/skinclf-mobilenet.keras"))
    parser.add_argument("--val", type=Path, default=Path("data/prepared/val"))
    parser.add_argument("--train", type=Path, default=Path("data/prepared/train"),
                        help="training split: the features' statistics for the Mahalanobis flag")
    parser.add_argument("--out", type=Path, default=Path("reports/trust"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--calibrated", type=Path, default=None, help="calibrated bundle [default: <out>/calibrated.keras]")
    parser.add_argument("--in-place", action="store_true", help="replace --model with the calibrated bundle")
    parser.add_argument("--max-side", type=int, default=224, help="panel size of the heat-map pictures")
    args = parser.parse_args()

    started = time.perf_counter()
    target = args.model if args.in_place else (args.calibrated or args.out / "calibrated.keras")
    before_engine = load_engine(args.model)
    issue = issue_images(before_engine.image_size)
    before = describe(before_engine, issue, before_engine.meta.get("ood"))
    identity = before_engine.identity()
    del before_engine

    # The report's own calibrated bundle: regenerated on every run.
    result = calibrate_model(model=args.model, data=args.val, out=target, report=args.out, train=args.train,
                             overwrite=True)
    engine = load_engine(target)
    after = describe(engine, issue, engine.meta.get("ood"))

    examples = []
    for cls in ("mel", "nv"):
        first = sorted((args.val / cls).glob("*.jpg"))[:1]
        examples += [(f"{cls}/{p.name}", p) for p in first]
    maps = explain_files(engine, examples, args.out / "heatmaps", top_k=3, max_side=args.max_side, show_progress=False)
    heatmaps = []
    args.docs.mkdir(parents=True, exist_ok=True)
    for item in maps.explained:
        doc = args.docs / f"heatmap_{Path(item.path).parent.name}.png"
        shutil.copyfile(item.png, doc)
        small_png(doc)
        heatmaps.append({"path": item.path, "png": doc.as_posix(), "top": item.top, "peak": item.peak,
                         "max_drop": item.max_drop, "unlike_training": item.unlike_training,
                         "bytes": doc.stat().st_size})
    reliability = args.docs / "reliability_validation.png"
    shutil.copyfile(args.out / "reliability.png", reliability)
    small_png(reliability)

    tables = json.loads((args.out / "calibration.json").read_text(encoding="utf-8"))["reliability"]
    report = {"model": identity, "calibrated_model": str(target), "validation": str(args.val),
              "calibration": result.calibration, "reliability": tables, "ood": result.ood,
              "issue_examples": {"before": before, "after": after}, "heatmaps": heatmaps,
              "reliability_png": reliability.as_posix(), "unreadable": result.unreadable,
              "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(args.out / "trust.json", report)
    text = markdown(report)
    atomic_write(args.out / "trust.md", text)
    print(text)
    print(f"Wrote {args.out / 'trust.json'}, {args.out / 'trust.md'}, {target}, "
          + ", ".join(h["png"] for h in heatmaps) + f", {reliability}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
