"""Defaults for every command, in one place.

The CLI reads its option defaults from these frozen dataclasses and the library functions take
the same values as keyword-only arguments, so a default changes here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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


@dataclass(frozen=True)
class TrainDefaults:
    data: Path = Path("data/prepared")
    # A new run goes to runs/, never over the bundled model in the package's models/ (whose
    # ONNX form would then be stale); bundling a run is a deliberate copy (tools/train_bundled.sh).
    out: Path = Path("runs/skinclf-mobilenet.keras")
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weights: str = "imagenet"
    # Layers of the MobileNet base trained from the top; 43 = blocks 7-13 (see `skinclf.model`).
    trainable_layers: int = 43
    class_weight: str = "balanced"
    # Post-hoc multipliers of class probabilities, built into the final layer after training
    # (e.g. "mel=1.5"); "none" leaves the trained model as it is.
    decision_weight: str = "none"
    loss: str = "crossentropy"
    focal_gamma: float = 2.0
    monitor: str = "val_top2_accuracy"
    patience: int = 8
    dropout: float = 0.25
    label_smoothing: float = 0.0
    seed: int = 42
    image_size: int = 224
    alpha: float = 1.0
    # Cache the frozen part's outputs for this many augmented views of each training image
    # (0: no cache, augment every epoch afresh). Makes CPU training several times faster.
    cache_views: int = 0
    # Brightness/contrast/saturation jitter on top of the seed recipe (0: the recipe alone).
    color_jitter: float = 0.0
    # Random resized crops of this minimum share of the image's area (0: the seed's zoom/shift).
    crop_scale: float = 0.0
    # Decoupled weight decay (AdamW); 0 trains with Adam.
    weight_decay: float = 0.0
    # "plateau": halve the rate when the monitor stalls; "cosine": warm-up, then cosine decay to 0.
    schedule: str = "plateau"
    warmup_epochs: int = 1
    # Train small, test large (FixRes): epochs at this side, the last `fixres_epochs` at image_size
    # (0: every epoch at image_size).
    train_size: int = 0
    fixres_epochs: int = 0
    # Shades of Gray colour constancy as the model's first layer.
    colour_constancy: bool = False
    # The base network: "mobilenet" (v1 1.0/224) or "mobilenetv2" (1.0/224, batch norms frozen).
    arch: str = "mobilenet"
    # Post-hoc prior correction of the logits, -tau * log(class prior): "none", "fit" (tau chosen
    # on validation balanced accuracy) or a number.
    prior_correction: str = "none"
    # Temperature scaling fitted on validation NLL, built into the final layer.
    calibrate: bool = True
    workers: int = 4


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
    calibration_images: int = 200
    # int8: validation folder for the balanced accuracy / melanoma recall printed after export.
    validation: Path = Path("data/prepared/val")
    # int8 is refused below this top-1 agreement with Keras on the check images.
    min_agreement: float = 0.9


# Test-time augmentation: how many flips/rotations may be averaged (see `skinclf.engines.runner`).
TTA_CHOICES = (1, 2, 4, 8)


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
TRAIN = TrainDefaults()
EVALUATE = EvaluateDefaults()
PREDICT = PredictDefaults()
EXPORT = ExportDefaults()
SERVE = ServeDefaults()
CALIBRATE = CalibrateDefaults()
EXPLAIN = ExplainDefaults()
ENSEMBLE = EnsembleDefaults()
