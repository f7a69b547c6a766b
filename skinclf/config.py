"""Defaults for every command, in one place.

The CLI reads its option defaults from these frozen dataclasses and the library functions take
the same values as keyword-only arguments, so a default changes here and nowhere else. Training's
settings are one object (`TrainConfig`): each field is default, flag and help at once (`option`),
checked by its own `validate`, built by the CLI and passed whole to `train_model`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from skinclf.checks import at_least, one_of, positive
from skinclf.errors import SkinclfError


@dataclass(frozen=True)
class FetchDefaults:
    dest: Path = Path("data/ham10000")
    dataset: str = "kmader/skin-cancer-mnist-ham10000"


@dataclass(frozen=True)
class PrepareDefaults:
    src: Path = Path("data/ham10000")
    out: Path = Path("data/prepared")
    val: float = 0.15
    test: float = 0.15
    seed: int = 42


def option(default: Any, *flags: str, metavar: str | None = None, help: str = "",  # noqa: A002
           argument: bool = False) -> Any:
    """A settings field that is also a command-line option (or, with `argument`, the positional
    argument): its default, flags, metavar and help in one place (`cli.app.with_settings` turns
    the fields of a settings class into a command's parameters)."""
    meta = {"flags": flags, "metavar": metavar, "help": help, "argument": argument}
    return field(metadata=meta) if default is REQUIRED else field(default=default, metadata=meta)


REQUIRED = MISSING  # `option(REQUIRED, ...)`: a field (and argument) without a default


MONITORS = ("val_top2_accuracy", "val_top1_accuracy", "val_top3_accuracy", "val_balanced_accuracy", "val_loss")
LOSSES = ("crossentropy", "focal")
SCHEDULES = ("plateau", "cosine")
# Settings a run's checkpoints depend on: recorded in its state.json and its bundle, and --resume
# refuses to continue with other values (with data, weights, fingerprint, classes, epochs_planned).
TRAIN_SETTINGS = ("batch_size", "lr", "trainable_layers", "class_weight", "loss", "focal_gamma", "monitor", "patience",
                  "dropout", "label_smoothing", "seed", "image_size", "alpha", "cache_views", "color_jitter",
                  "crop_scale", "weight_decay", "schedule", "warmup_epochs", "train_size", "fixres_epochs",
                  "colour_constancy", "arch")


@dataclass(frozen=True)
class TrainConfig:
    """Every `skinclf train` setting: the CLI builds one, `training.train.train_model` takes it whole."""

    data: Path = option(Path("data/prepared"), "--data", metavar="PATH",
        help="Prepared data with train/ and val/ class folders.")
    # A new run goes to runs/, never over the bundled model in the package's models/ (whose
    # ONNX form would then be stale); bundling a run is a deliberate copy (tools/train_bundled.sh).
    out: Path = option(Path("runs/skinclf-mobilenet.keras"), "--out", metavar="PATH",
        help="Model bundle to write (.keras); an existing one is replaced only with --overwrite.")
    epochs: int = option(30, "--epochs", metavar="N",
        help="Maximum number of epochs.")
    batch_size: int = option(32, "--batch-size", metavar="N",
        help="Images per training step.")
    lr: float = option(1e-3, "--lr", metavar="X",
        help="Initial learning rate (Adam); halved on plateaus down to 1e-5.")
    weights: str = option("imagenet", "--weights", metavar="TEXT",
        help="Initial base weights: imagenet (downloads), none, or a local weights file.")
    # Layers of the MobileNet base trained from the top; 43 = blocks 7-13 (see `skinclf.model`).
    trainable_layers: int = option(43, "--trainable-layers", metavar="N",
        help="MobileNet layers trained from the top (3..85): 6 = block 13, 13 = blocks 12-13, 43 = blocks 7-13, 85"
        " = all.")
    class_weight: str = option("balanced", "--class-weight", metavar="TEXT",
        help="balanced, sqrt or none, optionally followed by NAME=WEIGHT or NAME*FACTOR changes (e.g. "
        "`balanced,mel*2`); `NAME=WEIGHT,...` alone leaves other classes at 1.")
    # Post-hoc multipliers of class probabilities, built into the final layer after training
    # (e.g. "mel=1.5"); "none" leaves the trained model as it is.
    decision_weight: str = option("none", "--decision-weight", metavar="TEXT",
        help="Multiply class probabilities after training, e.g. mel=1.5 (more melanomas flagged, at a cost to "
        "other classes); built into the model. Choose it on validation; with --resume it re-bundles a "
        "finished run.")
    loss: str = option("crossentropy", "--loss", metavar="TEXT",
        help="crossentropy or focal.")
    focal_gamma: float = option(2.0, "--focal-gamma", metavar="X",
        help="Focusing parameter of --loss focal.")
    monitor: str = option("val_top2_accuracy", "--monitor", metavar="TEXT",
        help="Validation metric that picks the best epoch: val_top2_accuracy, val_top1_accuracy, "
        "val_top3_accuracy, val_balanced_accuracy or val_loss.")
    patience: int = option(8, "--patience", metavar="N",
        help="Epochs without improvement before stopping early.")
    dropout: float = option(0.25, "--dropout", metavar="X",
        help="Dropout before the classifier.")
    label_smoothing: float = option(0.0, "--label-smoothing", metavar="X",
        help="Label smoothing of the loss.")
    seed: int = option(42, "--seed", metavar="N",
        help="Seed for initialisation, shuffling and augmentation.")
    image_size: int = option(224, "--image-size", metavar="N",
        help="Input side in pixels.")
    alpha: float = option(1.0, "--alpha", metavar="X",
        help="MobileNet width multiplier (0.25, 0.5, 0.75, 1.0).")
    # The base network: "mobilenet" (v1 1.0/224) or "mobilenetv2" (1.0/224, batch norms frozen).
    arch: str = option("mobilenet", "--arch", metavar="NAME",
        help="Base network: mobilenet (v1) or mobilenetv2 (batch norms frozen; --trainable-layers 3..153).")
    # Cache the frozen part's outputs for this many augmented views of each training image
    # (0: no cache, augment every epoch afresh). Makes CPU training several times faster.
    cache_views: int = option(0, "--cache-views", metavar="N",
        help="Cache the frozen layers' outputs for N augmented views per training image (0: augment afresh each "
        "epoch).")
    # Brightness/contrast/saturation jitter on top of the seed recipe (0: the recipe alone).
    color_jitter: float = option(0.0, "--color-jitter", metavar="X",
        help="Also jitter brightness, contrast and saturation by up to this share.")
    # Random resized crops of this minimum share of the image's area (0: the seed's zoom/shift).
    crop_scale: float = option(0.0, "--crop-scale", metavar="X",
        help="Random resized crops covering at least this share of the image (e.g. 0.3; 0: the seed's zoom/shift).")
    # Decoupled weight decay (AdamW); 0 trains with Adam.
    weight_decay: float = option(0.0, "--weight-decay", metavar="X",
        help="Decoupled weight decay: AdamW when positive (e.g. 0.05), else Adam.")
    # "plateau": halve the rate when the monitor stalls; "cosine": warm-up, then cosine decay to 0.
    schedule: str = option("plateau", "--schedule", metavar="TEXT",
        help="Learning rate: plateau (halve when the monitor stalls) or cosine (warm-up, then cosine decay).")
    warmup_epochs: int = option(1, "--warmup-epochs", metavar="N",
        help="Warm-up epochs of --schedule cosine.")
    # Train small, test large (FixRes): epochs at this side, the last `fixres_epochs` at image_size
    # (0: every epoch at image_size).
    train_size: int = option(0, "--train-size", metavar="N",
        help="Train small, test large (FixRes): epochs at this side in pixels, the last --fixres-epochs at "
        "--image-size (0: all at --image-size).")
    fixres_epochs: int = option(0, "--fixres-epochs", metavar="N",
        help="Final epochs at --image-size.")
    # Shades of Gray colour constancy as the model's first layer.
    colour_constancy: bool = option(False, "--colour-constancy/--no-colour-constancy", metavar="",
        help="Shades of Gray colour constancy as the model's first layer (applied by predict and every export "
        "too).")
    # Post-hoc prior correction of the logits, -tau * log(class prior): "none", "fit" (tau chosen
    # on validation balanced accuracy) or a number.
    prior_correction: str = option("none", "--prior-correction", metavar="TEXT",
        help="Subtract tau x log(training class share) from the logits after training: none, fit (tau chosen on "
        "validation balanced accuracy) or a number.")
    # Temperature scaling fitted on validation NLL, built into the final layer.
    calibrate: bool = option(True, "--calibrate/--no-calibrate", metavar="",
        help="Fit a temperature on validation after training, so probabilities mean what they say.")
    workers: int = option(4, "--workers", metavar="N",
        help="Threads decoding and augmenting images.")
    run_dir: Path | None = option(None, "--run-dir", metavar="PATH",
        help="Checkpoints, history and feature cache [default: runs/<model name>].")
    resume: bool = option(False, "--resume", metavar="",
        help="Continue the interrupted run in --run-dir.")
    overwrite: bool = option(False, "--overwrite", metavar="",
        help="Replace an existing --out model and start --run-dir's checkpoints over.")

    def validate(self) -> None:
        """Refuse, in one line, any setting that cannot train (before any data is read). The checks
        that need the network (`--arch`, `--trainable-layers`) and `--prior-correction` run in
        `train_model`."""
        at_least("--epochs", self.epochs, 1)
        at_least("--batch-size", self.batch_size, 1)
        at_least("--workers", self.workers, 1)
        at_least("--focal-gamma", self.focal_gamma, 0, example=2.0)
        at_least("--seed", self.seed, 0, example=42)
        at_least("--patience", self.patience, 1)
        positive("--lr", self.lr)
        for flag, value, choices in (("--loss", self.loss, LOSSES), ("--monitor", self.monitor, MONITORS),
                                     ("--schedule", self.schedule, SCHEDULES)):
            if value not in choices:
                raise SkinclfError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        self._check_sizes()
        self._check_augmentation()

    def _check_sizes(self) -> None:
        warmup = self.warmup_epochs if self.schedule == "cosine" else 0
        if not 0 <= warmup < self.epochs:
            raise SkinclfError(f"--warmup-epochs {warmup}: must be 0 or more and below --epochs {self.epochs}")
        if self.cache_views < 0:
            raise SkinclfError(f"--cache-views {self.cache_views}: must be 0 (no cache) or more")
        at_least("--image-size", self.image_size, 32)
        if self.train_size and not 32 <= self.train_size <= self.image_size:
            raise SkinclfError(f"--train-size {self.train_size}: must be 0 (off) or 32..{self.image_size} (the "
                               "--image-size)")
        if not 0 <= self.fixres_epochs <= self.epochs:
            raise SkinclfError(f"--fixres-epochs {self.fixres_epochs}: must be 0..{self.epochs} (the --epochs)")
        if self.cache_views and self.train_size and self.train_size != self.image_size:
            raise SkinclfError("--train-size needs training from images: drop --cache-views")

    def _check_augmentation(self) -> None:
        if self.alpha not in (0.25, 0.5, 0.75, 1.0):
            raise SkinclfError(f"--alpha {self.alpha}: MobileNet comes in 0.25, 0.5, 0.75 and 1.0")
        if not 0 <= self.color_jitter < 1:
            raise SkinclfError(f"--color-jitter {self.color_jitter}: must be in [0, 1), e.g. 0.1")
        if not 0 <= self.crop_scale < 1:
            raise SkinclfError(f"--crop-scale {self.crop_scale}: must be in [0, 1), e.g. 0.3 (0: no random crops)")
        if self.weight_decay < 0:
            raise SkinclfError(f"--weight-decay {self.weight_decay}: must be 0 (Adam) or positive (AdamW), e.g. 0.05")
        if not 0 <= self.dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise SkinclfError("dropout and label smoothing must be in [0, 1)")

    def settings(self) -> dict[str, Any]:
        """The settings a run's checkpoints depend on (`TRAIN_SETTINGS`), by name."""
        return {key: getattr(self, key) for key in TRAIN_SETTINGS}


@dataclass(frozen=True)
class EvaluateDefaults:
    data: Path = Path("data/prepared/test")
    out: Path = Path("reports/eval")
    mel_sensitivity: float = 0.9
    batch_size: int = 16
    engine: str = "auto"
    threads: int = 0
    workers: int = 0


@dataclass(frozen=True)
class PredictDefaults:
    # Fewer when the model has fewer classes.
    top_k: int = 3
    # Fastest on the 2-core CPU measured by bench/predict_throughput.py (batch 16 beat 8 and 32).
    batch_size: int = 16
    # Decode threads; 0: one per CPU this process may use (affinity mask and cgroup quota).
    workers: int = 0
    # auto: ONNX Runtime when the model has an up-to-date .onnx form beside it, else Keras.
    engine: str = "auto"
    # ONNX Runtime intra-op threads; 0: one per usable CPU.
    threads: int = 0


@dataclass(frozen=True)
class ExportDefaults:
    format: str = "onnx"
    # Probe images every export is checked on (half seeded noise, half colour-cast blobs).
    probes: int = 16
    # Max abs difference of probabilities allowed between a float export and Keras.
    tolerance: float = 1e-4
    # int8: calibration images, drawn evenly from this labelled folder.
    calibration: Path = Path("data/prepared/train")
    # (a multiple of the calibration batch, 8: percentile/entropy calibration need equal batches)
    calibration_images: int = 144
    # int8: the first convolutions of every member kept in float (mixed precision): where the
    # accuracy goes (bench/int8_probe.py, model card "int8").
    int8_float_convs: int = 9
    # int8: validation folder for the balanced accuracy / melanoma recall printed after export.
    validation: Path = Path("data/prepared/val")
    # int8 is refused below this top-1 agreement with the float model on the check images.
    min_agreement: float = 0.97


# Test-time augmentation: how many flips/rotations may be averaged (see `skinclf.engines.runner`).
# Only settings that raised validation balanced accuracy with the bundled model (mean of the views'
# logits; the post-hoc steps were fitted without TTA): 1 0.828, 2 0.826, 4 0.832, 8 0.828
# (README "Test-time augmentation"); 2 and 8 were removed.
TTA_CHOICES = (1, 4)


@dataclass(frozen=True)
class ServeDefaults:
    # Loopback only: the page has no authentication, so other machines must be let in on purpose.
    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = "auto"
    batch_size: int = PredictDefaults.batch_size
    top_k: int = PredictDefaults.top_k
    # Limits of one POST /api/predict (answered 413 when exceeded). A full-size dermoscopic JPEG
    # is 0.2-5 MB; the page splits a folder into requests that stay within these.
    max_file_mb: float = 25.0
    max_files: int = 64
    max_request_mb: float = 256.0
    # Decoding is where a small upload can claim gigabytes (a 175 KB PNG of 8900x8900 16-bit
    # pixels peaks near 1 GB while it decodes): at most this many images decode at once, holding
    # at most this many pixels between them; one image over max_image_pixels is a row with an
    # error (the same limit `predict` applies, data.images.MAX_PIXELS), a decode that does not fit
    # waits up to decode_wait_s, then the request is answered 503 with Retry-After.
    max_decodes: int = 2
    max_image_pixels: int = 80_000_000
    max_decode_pixels: int = 100_000_000
    decode_wait_s: float = 30.0
    # On Ctrl-C/SIGTERM, requests still running get this long before the server stops anyway.
    shutdown_s: int = 10


@dataclass(frozen=True)
class CalibrateDefaults:
    data: Path = Path("data/prepared/val")
    batch_size: int = 16
    workers: int = 2
    # Share of the held-out dermoscopic images that pass the out-of-distribution flag.
    pass_rate: float = 0.95


@dataclass(frozen=True)
class ExplainDefaults:
    out: Path = Path("reports/explain")
    top_k: int = 3
    # Occlusion sensitivity: a patch of `patch` pixels (at the model's input size) slid by `stride`.
    patch: int = 32
    stride: int = 16
    fill: str = "blur"
    batch_size: int = 16
    # Longest side of each panel of the written picture (the input's size when smaller).
    max_side: int = 512


@dataclass(frozen=True)
class EnsembleDefaults:
    prior_correction: str = "none"
    decision_weight: str = "none"
    calibrate: bool = False
    workers: int = 2


FETCH = FetchDefaults()
PREPARE = PrepareDefaults()
TRAIN = TrainConfig()
EVALUATE = EvaluateDefaults()
PREDICT = PredictDefaults()
EXPORT = ExportDefaults()
SERVE = ServeDefaults()
CALIBRATE = CalibrateDefaults()
EXPLAIN = ExplainDefaults()
ENSEMBLE = EnsembleDefaults()


@dataclass(frozen=True)
class PredictConfig:
    """Every `skinclf predict` setting: the CLI builds one, `batch.predict.predict` takes it whole.
    Fields without help here are the options several commands share (`cli.options`)."""

    directory: Path = option(REQUIRED, metavar="DIR", help="Folder of images (JPEG, PNG, BMP, TIFF, DICOM) to classify.",
                             argument=True)
    out: str = option("results.csv", "--out", metavar="CSV", help="CSV to write, or - for stdout.")
    model: Path | None = None
    top_k: int | None = option(
        None, "--top-k", metavar="N",
        help=f"How many most-probable classes per image [default: {PREDICT.top_k}, or all the model's classes if fewer].")
    batch_size: int = PREDICT.batch_size
    recursive: bool = option(True, "--recursive/--no-recursive", metavar="", help="Include sub-folders.")
    all_probs: bool = option(False, "--all-probs", metavar="", help="Add a `prob_<class>` column for every class.")
    resume: bool = option(
        False, "--resume", metavar="", help="Continue an interrupted run (same options): skip files already in the CSV.")
    overwrite: bool = option(
        False, "--overwrite", metavar="",
        help="Start over, discarding the rows of an interrupted run (`CSV.partial`); also needed to replace a file "
        "that is not an earlier predict CSV.")
    verify: bool = option(
        False, "--verify", metavar="",
        help="With --resume: keep a row only if its file's SHA-256 is the one recorded with it (catches an edit "
        "in place that kept size and modification time, e.g. cp -p or rsync -t).")
    strict: bool = False
    tta: int = 1
    workers: int = PREDICT.workers
    engine: str = PREDICT.engine
    threads: int = PREDICT.threads
    metadata: Path | None = option(
        None, "--metadata", metavar="CSV",
        help="Patient metadata per image (image_id or path; age, sex, body site; HAM10000 and ISIC column names "
        "work as they are), added by the model's metadata head. Images without a row: image only.")
    ray: str | None = option(
        None, "--ray", metavar="ADDRESS",
        help="Classify on a Ray cluster: local (a Ray on this machine, loopback only), auto (the cluster in "
        "$RAY_ADDRESS or running here) or ray://HOST:PORT. The folder must be readable by every worker at the same "
        'path. Needs pip install "skinclf[ray]".')
    ray_workers: int = option(
        0, "--ray-workers", metavar="N", help="With --ray: model actors on the cluster (0: one per CPU of the cluster).")
    sr: Path | None = option(
        None, "--sr", metavar="DIR",
        help="DICOM images: write one DICOM Comprehensive SR per classified image into DIR (never over a file). "
        'Needs pip install "skinclf[dicom]".')
    dicom_metadata: bool = option(
        True, "--dicom-metadata/--no-dicom-metadata", metavar="",
        help="Use DICOM files' PatientAge, PatientSex and anatomic region for the metadata head (a --metadata row wins).")

    def validate(self) -> None:
        """The numeric options and the combinations refused before any work (the output paths are
        checked by `batch.predict`, which knows every file a run writes)."""
        if self.top_k is not None:
            at_least("--top-k", self.top_k, 1, example=3)
        at_least("--batch-size", self.batch_size, 1, example=PREDICT.batch_size)
        at_least("--threads", self.threads, 0, example=2)  # 0: one per usable CPU
        at_least("--workers", self.workers, 0, example=2)  # 0: one per usable CPU
        one_of("--tta", self.tta, TTA_CHOICES)
        if self.resume and self.overwrite:
            raise SkinclfError("--resume continues an interrupted run and --overwrite starts over: choose one")
        if self.verify and not self.resume:
            raise SkinclfError("--verify checks the files of the rows --resume keeps: add --resume")
        if self.ray is None and self.ray_workers:
            raise SkinclfError("--ray-workers sets the number of workers on a Ray cluster: add --ray local, auto or "
                               "ray://HOST:PORT")


@dataclass(frozen=True)
class EvaluateConfig:
    """Every `skinclf evaluate` setting: the CLI builds one, `evaluation.evaluate.run_evaluation` takes it."""

    model: Path | None = None
    data: Path = option(EVALUATE.data, "--data", metavar="PATH", help="Labelled folder: one sub-folder per class.")
    out: Path = option(EVALUATE.out, "--out", metavar="PATH", help="Folder for report.json and the PNGs.")
    predictions: Path | None = option(
        None, "--predictions", metavar="PATH", help="Score this predict CSV instead of running a model (needs --truth).")
    truth: Path | None = option(
        None, "--truth", metavar="PATH",
        help="Ground truth: HAM10000 metadata (image_id,dx) or ISIC one-hot (image,MEL,NV,...).")
    mel_sensitivity: float = option(EVALUATE.mel_sensitivity, "--mel-sensitivity", metavar="X",
                                    help="Melanoma sensitivity for which to report the threshold.")
    history: bool = option(False, "--history", metavar="", help="Only plot the model's training curves (history.png).")
    tta: int = 1
    batch_size: int = EVALUATE.batch_size
    split: Path | None = option(
        None, "--split", metavar="PATH",
        help="split.csv (or its folder) of the `skinclf prepare` run the model was trained on, for models that do not "
        "record their training images [default: where the model was trained, if found].")
    engine: str = EVALUATE.engine
    threads: int = EVALUATE.threads
    as_json: bool = option(False, "--json", metavar="", help="Print the report as JSON on stdout (no tables).")
    overwrite: bool = False
    metadata: Path | None = option(
        None, "--metadata", metavar="CSV",
        help="Patient metadata (as predict --metadata): also report the figures with the model's metadata head.")

    def validate(self) -> None:
        """The options and combinations refused before any work."""
        at_least("--batch-size", self.batch_size, 1, example=EVALUATE.batch_size)
        one_of("--tta", self.tta, TTA_CHOICES)
        if self.history:
            return
        if (self.predictions is None) != (self.truth is None):
            raise SkinclfError("--predictions and --truth go together")
        if self.metadata is not None and self.predictions is not None:
            raise SkinclfError("--metadata goes with a model run over --data (a predict CSV already has its answers: "
                               "run predict with --metadata)")


@dataclass(frozen=True)
class ExplainConfig:
    """Every `skinclf explain` setting: the CLI builds one, `trust.explain.explain_images` takes it."""

    source: Path = option(REQUIRED, help="An image file, or a folder of images (searched recursively).", argument=True)
    out: Path = option(EXPLAIN.out, "--out", help="Folder for one PNG per image and explain.json.")
    model: Path | None = None
    top_k: int = option(EXPLAIN.top_k, "--top-k", help="How many most-probable classes to show.")
    patch: int = option(EXPLAIN.patch, "--patch", help="Side of the occluding patch, in model-input pixels.")
    stride: int = option(EXPLAIN.stride, "--stride", help="Step of the sliding patch (smaller: finer, slower).")
    fill: str = option(EXPLAIN.fill, "--fill", metavar="FILL", help="What covers the patch: blur, grey or mean (colour).")
    max_side: int = option(EXPLAIN.max_side, "--max-side", help="Longest side of the picture's panels.")
    batch_size: int = EXPLAIN.batch_size
    strict: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class ListenSettings:
    """Every `skinclf listen` setting (a DICOM Storage SCP classifying what it receives): the CLI
    builds one, `batch.received.run_listener` takes it whole."""

    out: Path = Path("received.csv")
    allow: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "SKINCLF"
    max_associations: int = 4
    max_mb: float = 64.0
    sr: Path | None = None
    dicom_metadata: bool = True
    model: Path | None = None
    top_k: int | None = None
    engine: str = "auto"
    threads: int = 0
    max_objects: int = 0
