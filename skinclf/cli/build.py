"""Commands that make or change a model: `train`, `ensemble`, `export`, `calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from skinclf.cli import options
from skinclf.cli.app import Command, app, examples, out, user_errors
from skinclf.cli.render import fmt
from skinclf.config import CALIBRATE, ENSEMBLE, EXPORT, TRAIN


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
def train(
    data: Path = typer.Option(TRAIN.data, "--data", metavar="PATH", help="Prepared data with train/ and val/ class folders."),
    out_model: Path = typer.Option(TRAIN.out, "--out", metavar="PATH", help="Model bundle to write (.keras); an "
                                   "existing one is replaced only with --overwrite."),
    epochs: int = typer.Option(TRAIN.epochs, "--epochs", metavar="N", help="Maximum number of epochs."),
    batch_size: int = typer.Option(TRAIN.batch_size, "--batch-size", metavar="N", help="Images per training step."),
    lr: float = typer.Option(TRAIN.lr, "--lr", metavar="X", help="Initial learning rate (Adam); halved on plateaus down to 1e-5."),
    weights: str = typer.Option(
        TRAIN.weights, "--weights", metavar="TEXT", help="Initial base weights: imagenet (downloads), none, or a local weights file."
    ),
    trainable_layers: int = typer.Option(
        TRAIN.trainable_layers, "--trainable-layers",
        metavar="N", help="MobileNet layers trained from the top (3..85): 6 = block 13, 13 = blocks 12-13, 43 = blocks 7-13, 85 = all.",
    ),
    class_weight: str = typer.Option(
        TRAIN.class_weight, "--class-weight",
        metavar="TEXT", help="balanced, sqrt or none, optionally followed by NAME=WEIGHT or NAME*FACTOR changes "
        "(e.g. `balanced,mel*2`); `NAME=WEIGHT,...` alone leaves other classes at 1."
    ),
    decision_weight: str = typer.Option(
        TRAIN.decision_weight, "--decision-weight",
        metavar="TEXT", help="Multiply class probabilities after training, e.g. mel=1.5 (more melanomas flagged, at a cost to other "
        "classes); built into the model. Choose it on validation; with --resume it re-bundles a finished run.",
    ),
    loss: str = typer.Option(TRAIN.loss, "--loss", metavar="TEXT", help="crossentropy or focal."),
    focal_gamma: float = typer.Option(TRAIN.focal_gamma, "--focal-gamma", metavar="X", help="Focusing parameter of --loss focal."),
    monitor: str = typer.Option(
        TRAIN.monitor, "--monitor",
        metavar="TEXT", help="Validation metric that picks the best epoch: val_top2_accuracy, val_top1_accuracy, val_top3_accuracy, "
        "val_balanced_accuracy or val_loss.",
    ),
    patience: int = typer.Option(TRAIN.patience, "--patience", metavar="N", help="Epochs without improvement before stopping early."),
    dropout: float = typer.Option(TRAIN.dropout, "--dropout", metavar="X", help="Dropout before the classifier."),
    label_smoothing: float = typer.Option(TRAIN.label_smoothing, "--label-smoothing", metavar="X", help="Label smoothing of the loss."),
    seed: int = typer.Option(TRAIN.seed, "--seed", metavar="N", help="Seed for initialisation, shuffling and augmentation."),
    image_size: int = typer.Option(TRAIN.image_size, "--image-size", metavar="N", help="Input side in pixels."),
    alpha: float = typer.Option(TRAIN.alpha, "--alpha", metavar="X", help="MobileNet width multiplier (0.25, 0.5, 0.75, 1.0)."),
    arch: str = typer.Option(TRAIN.arch, "--arch", metavar="NAME",
                             help="Base network: mobilenet (v1) or mobilenetv2 (batch norms frozen; --trainable-layers 3..153)."),
    cache_views: int = typer.Option(
        TRAIN.cache_views, "--cache-views",
        metavar="N", help="Cache the frozen layers' outputs for N augmented views per training image (0: augment afresh each epoch).",
    ),
    color_jitter: float = typer.Option(
        TRAIN.color_jitter, "--color-jitter", metavar="X", help="Also jitter brightness, contrast and saturation by up to this share."
    ),
    crop_scale: float = typer.Option(
        TRAIN.crop_scale, "--crop-scale",
        metavar="X", help="Random resized crops covering at least this share of the image (e.g. 0.3; 0: the seed's zoom/shift).",
    ),
    weight_decay: float = typer.Option(
        TRAIN.weight_decay, "--weight-decay", metavar="X", help="Decoupled weight decay: AdamW when positive (e.g. 0.05), else Adam."
    ),
    schedule: str = typer.Option(
        TRAIN.schedule, "--schedule",
        metavar="TEXT", help="Learning rate: plateau (halve when the monitor stalls) or cosine (warm-up, then cosine decay).",
    ),
    warmup_epochs: int = typer.Option(TRAIN.warmup_epochs, "--warmup-epochs", metavar="N", help="Warm-up epochs of --schedule cosine."),
    train_size: int = typer.Option(
        TRAIN.train_size, "--train-size",
        metavar="N", help="Train small, test large (FixRes): epochs at this side in pixels, the last --fixres-epochs at --image-size "
        "(0: all at --image-size).",
    ),
    fixres_epochs: int = typer.Option(TRAIN.fixres_epochs, "--fixres-epochs", metavar="N", help="Final epochs at --image-size."),
    colour_constancy: bool = typer.Option(
        TRAIN.colour_constancy, "--colour-constancy/--no-colour-constancy",
        metavar="", help="Shades of Gray colour constancy as the model's first layer (applied by predict and every export too).",
    ),
    prior_correction: str = typer.Option(
        TRAIN.prior_correction, "--prior-correction",
        metavar="TEXT", help="Subtract tau x log(training class share) from the logits after training: none, fit (tau chosen on "
        "validation balanced accuracy) or a number.",
    ),
    calibrate: bool = typer.Option(
        TRAIN.calibrate, "--calibrate/--no-calibrate",
        metavar="", help="Fit a temperature on validation after training, so probabilities mean what they say.",
    ),
    workers: int = typer.Option(TRAIN.workers, "--workers", metavar="N", help="Threads decoding and augmenting images."),
    run_dir: Optional[Path] = typer.Option(
        None, "--run-dir", metavar="PATH", help="Checkpoints, history and feature cache [default: runs/<model name>]."
    ),
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue the interrupted run in --run-dir."),
    overwrite: bool = typer.Option(
        False, "--overwrite", metavar="", help="Replace an existing --out model and start --run-dir's checkpoints over."
    ),
) -> None:
    """Fine-tune ImageNet MobileNet (1.0, 224) on the prepared images, class-weighted and augmented.

    Keeps the epoch with the best validation top-2 accuracy (see --monitor), halves the learning
    rate on plateaus and stops early. Uses a GPU when the Keras backend sees one (KERAS_BACKEND =
    tensorflow, torch or jax). The bundle carries its class names, input size, preprocessing,
    settings, data fingerprint and validation metrics.
    """
    with user_errors():
        from skinclf.training.train import train_model

        result = train_model(
            data=data, out=out_model, epochs=epochs, batch_size=batch_size, lr=lr, weights=weights,
            trainable_layers=trainable_layers, class_weight=class_weight, decision_weight=decision_weight, loss=loss,
            focal_gamma=focal_gamma, monitor=monitor, patience=patience, dropout=dropout, label_smoothing=label_smoothing, seed=seed,
            image_size=image_size, alpha=alpha, cache_views=cache_views, color_jitter=color_jitter,
            crop_scale=crop_scale, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
            train_size=train_size, fixres_epochs=fixres_epochs, colour_constancy=colour_constancy,
            prior_correction=prior_correction, calibrate=calibrate, workers=workers, arch=arch, run_dir=run_dir,
            resume=resume, overwrite=overwrite,
        )
    val = result.val_metrics
    mel = val.get("melanoma", {}).get("at_decision", {})
    out.print(
        f"Saved {result.model_path}: best epoch {result.best_epoch} of {result.epochs_run} "
        f"({result.monitor} {result.best_value:.4f}); validation balanced accuracy {val['balanced_accuracy']:.3f}, "
        f"accuracy {val['accuracy']:.3f}"
        + (f", melanoma recall {mel['sensitivity']:.3f}" if mel else "")
        + (f"; {result.images_per_second:.1f} img/s training" if result.images_per_second else "")
        + f". Checkpoints in {result.run_dir}"
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
    fmt: Optional[str] = typer.Option(
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
        "float16", "--weights", metavar="FORM",
        help="web: the model's weights: float16 (stored as float16, computed in float32; fits the 30 MB budget), "
        "float32, or int8 (the .int8.onnx export).",
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
    if fmt == "web":  # a static site for the browser: skinclf/web/static_site.py
        with user_errors():
            from skinclf.web.static_site import export_web, report_line

            out.print(report_line(export_web(model=model, out=out_path, weights=weights, runtime=runtime,
                                             overwrite=overwrite)), markup=False, highlight=False)
        return
    with user_errors():
        from skinclf.engines.export import export_model

        result = export_model(model=model, format=fmt, out=out_path, probes=probes, calibration=calibration,
                              calibration_images=calibration_images, validation=validation, overwrite=overwrite)
    line = (f"Wrote {result.out} ({result.format}, {result.size_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s; "
            f"max abs difference of probabilities from Keras {result.max_abs_diff:.2g} on {result.probes} probe images")
    if result.top1_agreement is not None:
        line += f"; top-1 agreement {result.top1_agreement:.2%}"
    out.print(line)
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
    out.print(f"Wrote {out_model}: the mean of {len(meta['members'])} models over {', '.join(meta['classes'])}"
              f"{summary}. "
              f"Next: skinclf calibrate {out_model} --data data/prepared/val")


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
    out.print("Wrote " + ", ".join(str(p) for p in result.files))
