"""Add a network to the bundled ensemble: its members as they are in the bundle, plus a new one.

    python tools/add_member.py runs/member3-v2.keras --decision-weight mel=2.5 [--val data/prepared/val]
        [--model models/skinclf-mobilenet.keras] [--out models/skinclf-mobilenet.keras]

The bundle's members are written out as bundles of their own (runs/member-<i>-<name>.keras: each
member's logits network, its own post-hoc steps included, with its recorded metadata), then
`skinclf ensemble` averages them with the new network and fits the ensemble's prior correction,
the melanoma weight given (chosen on validation: model card, "Runs") and the temperature on
`--val`. Run by hand when a member is added; `tools/refresh_bundle.sh --from-bundled` then
regenerates everything derived from the bundle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from skinclf.model.bundle import load_bundle, save_bundle  # noqa: E402
from skinclf.model.ensemble_graph import members  # noqa: E402
from skinclf.training.ensemble import ensemble_bundles  # noqa: E402


def write_members(bundle, folder: Path) -> list[Path]:
    """Each member of `bundle` as a bundle of its own in `folder`."""
    paths = []
    for i, (model, record) in enumerate(zip(members(bundle.model), bundle.meta["members"])):
        path = folder / f"member-{i}-{record.get('name') or i}.keras"
        meta = {"name": record.get("name") or f"member-{i}", "classes": bundle.meta["classes"],
                "input_size": bundle.meta["input_size"], "data": bundle.meta["data"],
                "architecture": record.get("architecture"), "preprocessing": record.get("preprocessing"),
                "post_hoc": record.get("post_hoc"), "training": record.get("training"),
                "history": record.get("history", []),
                "metrics": {"validation": {"balanced_accuracy": record.get("validation")}},
                "extracted_from": {"bundle": bundle.path.name, "sha256": bundle.sha256, "member": i,
                                   "original_sha256": record.get("sha256")}}
        save_bundle(model, path, meta)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", type=Path, help="the network to add (.keras bundle)")
    parser.add_argument("--model", type=Path, default=REPO / "models/skinclf-mobilenet.keras")
    parser.add_argument("--out", type=Path, default=REPO / "models/skinclf-mobilenet.keras")
    parser.add_argument("--val", type=Path, default=REPO / "data/prepared/val")
    parser.add_argument("--decision-weight", default="mel=1.75")
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    args.runs.mkdir(parents=True, exist_ok=True)
    parts = write_members(bundle, args.runs)
    meta = ensemble_bundles(members=[*parts, args.new], out=args.out, val=args.val, prior_correction="fit",
                            decision_weight=args.decision_weight, calibrate=True, workers=2, overwrite=True)
    v = meta["metrics"]["validation"]
    print(f"wrote {args.out}: {len(meta['members'])} members, validation balanced accuracy "
          f"{v['balanced_accuracy']:.4f}, melanoma recall {v['melanoma']['at_decision']['sensitivity']:.3f}")


if __name__ == "__main__":
    main()
