"""Write the bundled model's figures into README.md and models/README.md.

    python tools/card_figures.py

Run by tools/refresh_bundle.sh after it has written reports/val.json, reports/test.json,
reports/test_calibration.json and reports/trust/trust.json: every table between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`
is regenerated from those files, so the docs can never quote another model's numbers. Prose
around the markers is the author's and is checked by hand. Exits non-zero when a report or a
marker is missing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports"
DOCS = (REPO / "README.md", REPO / "models" / "README.md")


def load(name: str) -> dict:
    path = REPORTS / name
    if not path.is_file():
        sys.exit(f"{path} is missing: run bash tools/refresh_bundle.sh")
    return json.loads(path.read_text(encoding="utf-8"))


def metrics_table(val: dict, test: dict) -> str:
    """Headline metrics on validation (chose everything) and test (a second look)."""

    def row(label: str, get) -> str:
        return f"| {label} | {get(val)} | {get(test)} |"

    mel = lambda r: r["melanoma"]  # noqa: E731
    return "\n".join([
        "| bundled model | validation (chose every setting) | test (second look) |",
        "|---|---:|---:|",
        row("images (lesions never in training)", lambda r: f"{r['n']}"),
        row("**balanced accuracy** (mean per-class recall, the ISIC 2018 Task 3 metric)",
            lambda r: f"**{r['balanced_accuracy']:.3f}**"),
        row("accuracy", lambda r: f"{r['accuracy']:.3f}"),
        row("top-2 / top-3 accuracy", lambda r: f"{r['top_k_accuracy']['2']:.3f} / {r['top_k_accuracy']['3']:.3f}"),
        row("macro ROC-AUC (one-vs-rest)", lambda r: f"{r['macro_auc']:.3f}"),
        row("**melanoma sensitivity** / specificity at the model's decision",
            lambda r: f"**{mel(r)['at_decision']['sensitivity']:.3f}** / {mel(r)['at_decision']['specificity']:.3f}"),
        row("melanoma ROC-AUC", lambda r: f"{mel(r)['auc']:.3f}"),
    ])


def per_class_table(val: dict, test: dict) -> str:
    lines = ["| class | val recall | test precision | test recall | test F1 | test AUC | test support |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in test["per_class"].items():
        lines.append(f"| {name} | {val['per_class'][name]['recall']:.3f} | {t['precision']:.3f} | {t['recall']:.3f} "
                     f"| {t['f1']:.3f} | {t['auc']:.3f} | {t['support']} |")
    return "\n".join(lines)


def trust_tables(trust: dict, test: dict) -> str:
    cal, ood = trust["calibration"], trust["ood"]
    first = cal  # each refit keeps the record it replaced: the oldest has the figures as trained
    while "previous" in first:
        first = first["previous"]
    first = first["validation_before"]
    lines = ["| split | ECE (15 bins) | NLL | Brier |", "|---|---:|---:|---:|",
             f"| validation, as trained, no temperature | {first['ece']:.3f} | {first['nll']:.3f} | {first['brier']:.3f} |"]
    for label, r in ((f"validation, temperature {cal['temperature']:.2f}, fitted and measured there", cal["validation_after"]),
                     ("validation, temperature fitted on one half, measured on the other (two-fold)",
                      cal["validation_after_cross_fitted"])):
        lines.append(f"| {label} | {r['ece']:.3f} | {r['nll']:.3f} | {r['brier']:.3f} |")
    for label, r in (("test split (second look), no temperature", test["test_before"]),
                     (f"test split (second look), temperature {test['temperature']:.2f} from validation",
                      test["test_after"])):
        lines.append(f"| {label} | {r['ece']:.3f} | {r['nll']:.3f} | {r['brier']:.3f} |")
    aucs = ood["separation"][ood["score"]]["auroc"]
    lines += ["", f"\"Unlike the training images\" flag: score **{ood['score']}** (`{ood['formula']}`, best mean "
              "ROC-AUC of " + ", ".join(f"{k} {v['mean_auroc']:.3f}" for k, v in ood["separation"].items())
              + f"), threshold {ood['threshold']:.3f}, which {ood['pass_rate']:.0%} of validation images pass.", "",
              "| images | n | flagged | ROC-AUC vs validation |", "|---|---:|---:|---:|"]
    for name, rate in ood["flag_rates"].items():
        auc = f"{aucs[name]:.3f}" if name in aucs else "–"
        lines.append(f"| {name} | {ood['counts'][name]} | {rate:.0%} | {auc} |")
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str, path: Path) -> str:
    pattern = re.compile(rf"(<!-- figures:{name} -->\n).*?(<!-- /figures:{name} -->)", re.S)
    if not pattern.search(text):
        sys.exit(f"{path}: no <!-- figures:{name} --> ... <!-- /figures:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main() -> None:
    val, test, trust = load("val.json"), load("test.json"), load("trust/trust.json")
    test_calibration = load("test_calibration.json")
    blocks = {"metrics": metrics_table(val, test), "per-class": per_class_table(val, test),
              "trust": trust_tables(trust, test_calibration)}
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"<!-- figures:([\w-]+) -->", text):
            if name not in blocks:
                sys.exit(f"{path}: unknown figures block {name!r} (known: {', '.join(blocks)})")
            text = replace_block(text, name, blocks[name], path)
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        print(f"updated {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
