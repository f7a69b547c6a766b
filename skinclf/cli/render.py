"""How the CLI shows results: the evaluation report, the held-out note, the predict summary line."""

from __future__ import annotations

from collections import Counter

from rich.table import Table

from skinclf.cli.app import out


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_report(report: dict) -> None:
    """Confusion matrix, per-class table and headline figures, on the terminal."""
    classes = report["classes"]
    matrix = Table(title="Confusion matrix (rows: true class; count and share of the row)")
    matrix.add_column("true \\ predicted")
    for name in classes:
        matrix.add_column(name, justify="right")
    for name, counts, shares in zip(classes, report["confusion_matrix"], report["confusion_matrix_normalized"]):
        cells = [f"{c} ({s:.0%})" if c else "." for c, s in zip(counts, shares)]
        matrix.add_row(name, *cells)
    out.print(matrix)
    per_class = Table(title="Per class")
    for column in ("class", "precision", "recall", "F1", "AUC", "support"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for name, row in report["per_class"].items():
        style = "bold" if name == "mel" else None
        per_class.add_row(name, fmt(row["precision"]), fmt(row["recall"]), fmt(row["f1"]), fmt(row["auc"]),
                          str(row["support"]), style=style)
    out.print(per_class)
    topk = ", ".join(f"top-{k} {fmt(v)}" for k, v in report["top_k_accuracy"].items())
    out.print(f"Images scored: {report['n']}")
    out.print(f"[bold]Balanced accuracy {fmt(report['balanced_accuracy'])}[/bold] (mean per-class recall); "
              f"accuracy {fmt(report['accuracy'])}; {topk}; macro ROC-AUC {fmt(report['macro_auc'])}")
    mel = report.get("melanoma", {})
    if mel.get("at_decision"):
        d, t = mel["at_decision"], mel["at_target"]
        out.print(f"Melanoma: sensitivity {fmt(d['sensitivity'])}, specificity {fmt(d['specificity'])} at the "
                  f"model's decision; sensitivity {fmt(t['sensitivity'])} with specificity {fmt(t['specificity'])} "
                  f"when flagging p(mel) >= {fmt(t['threshold'], 4)}")
    meta = report.get("metadata")
    if meta:
        a, b = meta["image_only"], meta["with_metadata"]
        out.print(f"[bold]With patient metadata[/bold] ({meta['images_scored_with_metadata']} of {a['n']} images had "
                  f"some): balanced accuracy {fmt(b['balanced_accuracy'])} (image only {fmt(a['balanced_accuracy'])}); "
                  f"melanoma sensitivity {fmt(b.get('melanoma', {}).get('sensitivity'))} (image only "
                  f"{fmt(a.get('melanoma', {}).get('sensitivity'))}); recall per class: "
                  + ", ".join(f"{c} {fmt(a['recall'][c])} -> {fmt(b['recall'][c])}" for c in a["recall"]))
    cal = report.get("calibration")
    if cal:
        out.print(f"Calibration: ECE {fmt(cal['ece'])} (15 bins), Brier {fmt(cal['brier'])}, NLL {fmt(cal['nll'])}"
                  + ("" if cal["exact"] else " (approximate: top-k columns only; predict --all-probs for exact)"))
    if "provenance" in report:
        known = (report.get("seen") or {}).get("known")
        if report["provenance"].get("held_out") is None and known:
            # No split fingerprint, but the model's image ids tell image by image (next line):
            # "unknown provenance" would contradict it.
            out.print("Data: no split fingerprint for this folder; which images the model has seen is checked "
                      "image by image:")
        else:
            out.print(f"Data: {report['provenance']['note']}")
    render_seen(report.get("seen"))
    if report.get("data", {}).get("unreadable"):
        out.print(f"[yellow]{len(report['data']['unreadable'])} unreadable image(s) skipped (listed in report.json)[/yellow]")
    if "matching" in report:
        m = report["matching"]
        out.print(f"Matched {m['scored']} of {m['predictions']} predictions to {m['truth']} truths ({m['truth_format']}); "
                  f"{m['prediction_errors']} prediction errors, {m['no_truth']} without truth, "
                  f"{m['no_prediction']} truths without prediction. Probabilities: {report['probabilities']}")


def render_seen(seen: dict | None) -> None:
    """Say how many scored images the model has seen, and score the held-out rest on its own."""
    if not seen or (seen["known"] and not seen["train"] and not seen["val"]):
        return
    out.print(f"[yellow]Caution: {seen['note']}.[/yellow]")
    rest = seen.get("held_out_report")
    if rest:
        mel = rest.get("melanoma", {}).get("at_decision")
        out.print(f"[bold]Held-out rest ({rest['n']} images): balanced accuracy {fmt(rest['balanced_accuracy'])}"
                  f"[/bold], accuracy {fmt(rest['accuracy'])}"
                  + (f", melanoma sensitivity {fmt(mel['sensitivity'])}" if mel else ""))
    elif seen["known"]:
        out.print("[yellow]No scored image is held out: these figures say little about new patients.[/yellow]")


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 error', '2 errors', '1 folder or link' ..."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"


def predict_summary(summary) -> str:
    """One line: what was classified, what failed, what deserves caution, what was kept or dropped."""
    from skinclf.batch.resume import redone_text

    failed = summary.errors - summary.unreadable
    parts = [f"{plural(summary.files, 'file')}: {summary.files - failed} classified, {plural(failed, 'error')}"]
    if summary.unreadable:
        parts.append(f"{plural(summary.unreadable, 'folder or link', 'folders or links')} could not be read (rows "
                     "with an error; their images are missing)")
    if summary.warnings:
        parts.append(f"{summary.warnings} with warnings (see the warning column)")
    very = getattr(summary, "very_unlike", 0)
    if summary.unlike_training - very:
        parts.append(f"{summary.unlike_training - very} unusual (less reliable results)")
    if very:
        parts.append(f"{very} very unlike the training images (check they are dermoscopic images)")
    if summary.resumed:
        check = f" (checked: {summary.check})" if getattr(summary, "check", "") else ""
        parts.append(f"{plural(summary.resumed, 'row')} kept from the earlier run{check}")
    if getattr(summary, "redone", None):
        parts.append(redone_text(Counter(summary.redone)))
    if summary.dropped:
        parts.append(f"{plural(summary.dropped, 'row')} dropped: their files are no longer in the folder")
    if getattr(summary, "skipped", 0):
        examples = ", ".join(summary.skipped_examples)
        parts.append(f"{plural(summary.skipped, 'other file')} passed over (hidden, skinclf's own heat maps, or not .jpg, .jpeg, .png, .bmp, "
                     f".tif or .tiff: e.g. {examples})")
    meta = getattr(summary, "metadata", None)
    if meta:
        parts.append(f"{meta['images_with_metadata']} with patient metadata (the rest from the image alone; "
                     "see the metadata column)")
    cluster = getattr(summary, "cluster", None)
    where = f" on {plural(cluster['workers'], 'Ray worker')}" if cluster else ""
    speed = (f"{summary.images_per_second:.1f} img/s" if summary.classified else "nothing left to classify")
    return (", ".join(parts) + f"; {speed} ({summary.model.get('engine', 'keras')} "
            f"engine{where}) after {summary.startup_seconds:.1f} s start-up"
            + (f"; wrote {summary.out}" if summary.out else "") + ". Decision support, not a diagnosis.")
