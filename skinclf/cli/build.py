"""Commands that make or change a model: `train`, `ensemble`, `export`, `calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from skinclf.cli import options
from skinclf.cli.app import Command, app, examples, out, say, user_errors, with_settings
from skinclf.cli.render import fmt
from skinclf.config import CALIBRATE, ENSEMBLE, EXPORT, TrainConfig


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf train --epochs 30",
        "skinclf train --data data/prepared --weights ~/weights/mobilenet_1_0_224_tf_no_top.h5",
        "skinclf train --cache-views 10 --trainable-layers 43   # several times faster on a CPU",
        "skinclf train --class-weight mel=4,nv=1.25 --loss focal --monitor val_balanced_accuracy",
        "skinclf train --resume                                 # continue an interrupted run",
        "skinclf train --resume --decision-weight mel=1.5       # re-bundle a finished run, flagging more melanomas",
    )
)
@with_settings(TrainConfig)
def train(config: TrainConfig) -> None:
    """Fine-tune ImageNet MobileNet (1.0, 224) on the prepared images, class-weighted and augmented.

    Keeps the epoch with the best validation top-2 accuracy (see --monitor), halves the learning
    rate on plateaus and stops early. Uses a GPU when the Keras backend sees one (KERAS_BACKEND =
    tensorflow, torch or jax). The bundle carries its class names, input size, preprocessing,
    settings, data fingerprint and validation metrics.
    """
    with user_errors():
        from skinclf.training.train import train_model

        result = train_model(config)
    val = result.val_metrics
    mel = val.get("melanoma", {}).get("at_decision", {})
    say(
        f"Saved {result.model_path}: best epoch {result.best_epoch} of {result.epochs_run} "
        f"({result.monitor} {result.best_value:.4f}); validation balanced accuracy {val['balanced_accuracy']:.3f}, "
        f"accuracy {val['accuracy']:.3f}"
        + (f", melanoma recall {mel['sensitivity']:.3f}" if mel else "")
        + (f"; {result.images_per_second:.1f} img/s training" if result.images_per_second else "")
        + f". Checkpoints in {result.run_dir}", err=False,
    )


@app.command(
    "export",
    cls=Command,
    epilog=examples(
        "skinclf export models/skinclf-mobilenet.keras --format onnx --out models/skinclf-mobilenet.onnx",
        "skinclf export runs/exp02.keras                              # writes runs/exp02.onnx",
        "skinclf export --format onnx-int8 --calibration data/prepared/train --validation data/prepared/val",
        "skinclf export --format tflite --out skinclf.tflite",
        "skinclf export --format web --out site/          # a static site: classify in the browser",
    ),
)
def export(
    model: Optional[Path] = typer.Argument(None, help="Model bundle (.keras) [default: the bundled model]."),
    format_name: Optional[str] = typer.Option(
        None, "--format", metavar="FORMAT",
        help="onnx (float32), onnx-int8 (static int8, calibrated), tflite (float32), web (a static site running the "
        "ONNX form in the browser: --out is a folder) or tfjs (not available: its "
        "converter cannot be installed beside TensorFlow 2.21 / Keras 3) [default: what --out's suffix names, "
        f"else {EXPORT.format}].",
    ),
    out_path: Optional[Path] = typer.Option(
        None, "--out", help="File to write [default: beside the model: .onnx, .int8.onnx or .tflite]."
    ),
    probes: Optional[Path] = typer.Option(
        None, "--probes", help="Also check the export on the first images of this folder (besides synthetic probes)."
    ),
    calibration: Path = typer.Option(
        EXPORT.calibration, "--calibration", help="onnx-int8: labelled folder of training images to calibrate on."
    ),
    calibration_images: int = typer.Option(
        EXPORT.calibration_images, "--calibration-images", help="onnx-int8: how many calibration images."
    ),
    validation: Path = typer.Option(
        EXPORT.validation, "--validation",
        help="onnx-int8: labelled folder to compare int8 and float balanced accuracy on (skipped if absent).",
    ),
    runtime: Optional[Path] = typer.Option(
        None, "--runtime", help="web: a local onnxruntime-web-VERSION.tgz (npm pack) instead of the npm registry "
        "download; checked against the pinned hash either way."
    ),
    weights: str = typer.Option(
        "auto", "--weights", metavar="FORM",
        help="web: the model's weights: auto (the int8 form where the bundle has one, as predict runs it, else "
        "float16), float16 (stored as float16, computed in float32), float32, or int8 (the .int8.onnx export).",
    ),
    overwrite: options.Overwrite = False,
) -> None:
    """Convert a model bundle to ONNX (float32 or int8) or TensorFlow Lite, checked before it is written.

    The export's probabilities on probe images must match the Keras model's (max abs difference
    <= 1e-4 for float formats; int8 prints its top-1 agreement and validation figures) or nothing
    is written. The ONNX file carries the bundle's metadata, so `skinclf predict --model X.onnx`
    runs it with ONNX Runtime alone. Re-export whenever the .keras model changes: predict uses the
    .onnx beside a .keras only while its recorded SHA-256 matches.
    """
    if format_name == "web":  # a static site for the browser: skinclf/web/static_site.py
        with user_errors():
            from skinclf.web.static_site import export_web, report_line

            out.print(report_line(export_web(model=model, out=out_path, weights=weights, runtime=runtime,
                                             overwrite=overwrite)), markup=False, highlight=False)
        return
    with user_errors():
        from skinclf.engines.export import export_model

        result = export_model(model=model, format=format_name, out=out_path, probes=probes, calibration=calibration,
                              calibration_images=calibration_images, validation=validation, overwrite=overwrite)
    line = (f"Wrote {result.out} ({result.format}, {result.size_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s; "
            f"max abs difference of probabilities from Keras {result.max_abs_diff:.2g} on {result.probes} probe images")
    if result.top1_agreement is not None:
        line += f"; top-1 agreement {result.top1_agreement:.2%}"
    say(line, err=False)
    if result.validation:
        v = result.validation
        f, q = v["float"], v["int8"]
        out.print(f"Validation ({v['images']} images in {v['folder']}): balanced accuracy float {f['balanced_accuracy']:.4f}"
                  f" -> int8 {q['balanced_accuracy']:.4f}; melanoma recall {fmt(f.get('mel_recall'), 4)} -> "
                  f"{fmt(q.get('mel_recall'), 4)}")


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf ensemble runs/seed1.keras runs/seed2.keras runs/seed3.keras --out models/ensemble.keras",
        "skinclf ensemble a.keras b.keras --out ab.keras --val data/prepared/val --prior-correction fit --calibrate",
        "skinclf evaluate --model models/ensemble.keras --data data/prepared/val   # is it worth it?",
    )
)
def ensemble(
    members: list[Path] = typer.Argument(..., metavar="MODEL", help="Two or more model bundles (.keras) with the same classes."),
    out_model: Path = typer.Option(..., "--out", metavar="PATH", help="The ensemble bundle to write (.keras)."),
    val: Optional[Path] = typer.Option(None, "--val", metavar="PATH", help="Labelled folder (the validation split) on which the "
                                       "options below are fitted."),
    prior_correction: str = typer.Option(ENSEMBLE.prior_correction, "--prior-correction", metavar="TAU",
                                         help="none, fit (tau chosen on --val balanced accuracy) or a number."),
    decision_weight: str = typer.Option(ENSEMBLE.decision_weight, "--decision-weight", metavar="SPEC",
                                        help="Post-hoc probability multipliers, e.g. mel=1.75."),
    calibrate: bool = typer.Option(ENSEMBLE.calibrate, "--calibrate/--no-calibrate", metavar="",
                                   help="Fit a temperature on --val (changes no decision)."),
    workers: int = typer.Option(ENSEMBLE.workers, "--workers", metavar="N", help="Image-decoding threads for --val."),
    overwrite: options.Overwrite = False,
) -> None:
    """Average trained bundles (other seeds, crops or recipes) into one bundle: the softmax of the
    mean of their logits (a geometric mean of their probabilities).

    Every member adds a forward pass to predict: bundle an ensemble only if it beats the best
    single network on validation by a clear margin. With --val, the ensemble's own prior
    correction, decision weights and temperature are fitted there, as skinclf train does.
    """
    with user_errors():
        from skinclf.training.ensemble import ensemble_bundles

        meta = ensemble_bundles(members=members, out=out_model, val=val, prior_correction=prior_correction,
                                decision_weight=decision_weight, calibrate=calibrate, workers=workers,
                                overwrite=overwrite)
    fitted = meta.get("metrics", {}).get("validation")
    summary = f"; validation balanced accuracy {fitted['balanced_accuracy']:.3f}" if fitted else ""
    say(f"Wrote {out_model}: the mean of {len(meta['members'])} models over {', '.join(meta['classes'])}"
              f"{summary}. "
              f"Next: skinclf calibrate {out_model} --data {val or 'data/prepared/val'}", err=False)


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf calibrate runs/exp03.keras --data data/prepared/val",
        "skinclf calibrate models/skinclf-mobilenet.keras --data data/prepared/val --out models/calibrated.keras",
        "skinclf calibrate my.keras --data clinic-labelled/ --report reports/calibration --pass-rate 0.9",
    )
)
def calibrate(
    model: Path = typer.Argument(..., help="Model bundle (.keras) to calibrate."),
    data: Path = typer.Option(CALIBRATE.data, "--data", help="Labelled folder (one sub-folder per class): the "
                              "validation split, never the test split."),
    out_model: Optional[Path] = typer.Option(None, "--out", help="Where to write the calibrated bundle "
                                             "[default: replace MODEL]."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write calibration.json and reliability.png "
                                          "(before and after) into this folder."),
    pass_rate: float = typer.Option(CALIBRATE.pass_rate, "--pass-rate", help="Share of the folder's images that "
                                    "must pass the 'unlike the training images' flag."),
    ood_score: Optional[str] = typer.Option(None, "--ood-score", metavar="SCORE", help="Force the OOD score: energy, max_logit or "
                                            "max_prob, mahalanobis or relative_mahalanobis [default: the one "
                                            "separating best]."),
    train: Path = typer.Option(Path("data/prepared/train"), "--train", help="Labelled training split: the pooled "
                               "features' class means and covariance for the Mahalanobis scores."),
    batch_size: options.BatchSize = CALIBRATE.batch_size,
    workers: options.Workers = CALIBRATE.workers,
    overwrite: options.Overwrite = False,
) -> None:
    """Refit a bundle's temperature (confidence) and its 'unlike the training images' threshold on a
    labelled folder, so probabilities mean what they say and odd inputs are flagged.

    The temperature is folded into the final layer (composed with any earlier one; decisions do
    not change); the out-of-distribution score that best separates the folder from reference
    non-dermoscopic images (photographs, text, screenshots, flat colours, noise...) gets a
    threshold passing --pass-rate of the folder. ECE, NLL and Brier before and after, and the
    flag rate on every set, are stored in the bundle.
    """
    with user_errors():
        from skinclf.trust.calibrate import calibrate_model

        result = calibrate_model(model=model, data=data, out=out_model, report=report, pass_rate=pass_rate,
                                 ood_score=ood_score, train=train, batch_size=batch_size, workers=workers,
                                 overwrite=overwrite)
    cal, ood = result.calibration, result.ood
    table = Table(title=f"Calibration on {cal['fitted_on']} ({cal['images']} images)")
    for column in ("", "ECE (15 bins)", "NLL", "Brier"):
        table.add_column(column, justify="left" if not column else "right")
    for label, key in (("before", "validation_before"), ("after", "validation_after"),
                       ("after, cross-fitted", "validation_after_cross_fitted")):
        row = cal[key]
        table.add_row(label, fmt(row["ece"], 4), fmt(row["nll"], 4), fmt(row["brier"], 4))
    out.print(table)
    out.print(f"Temperature {cal['temperature']:.4g} (x{cal['refit']['factor']:.4g} on the previous "
              f"{cal['refit']['previous_temperature']:.4g}).")
    flags = Table(title=f"Unlike the training images: {ood['score']} > {ood['threshold']:.4g} "
                        f"({ood['pass_rate']:.0%} of {ood['fitted_on']} pass)")
    for column in ("images", "n", "flagged", "ROC-AUC"):
        flags.add_column(column, justify="left" if column == "images" else "right")
    aucs = ood["separation"][ood["score"]]["auroc"]
    for name, rate in ood["flag_rates"].items():
        flags.add_row(name, str(ood["counts"][name]), f"{rate:.1%}", fmt(aucs.get(name)))
    out.print(flags)
    if result.unreadable:
        out.print(f"[yellow]{len(result.unreadable)} unreadable image(s) skipped[/yellow]")
    say("Wrote " + ", ".join(str(p) for p in result.files), err=False)
