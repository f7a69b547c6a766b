"""`skinclf train`: class-weighted MobileNet transfer learning, resumable, on CPU or GPU.

The recipe of the seed projects, done properly: ImageNet MobileNet 1.0/224 with its top layers
fine-tuned and a new head, class weights, rotation/shift/zoom/flip augmentation on training
images only, top-1/2/3 accuracy, the best epoch kept by validation top-2 accuracy,
ReduceLROnPlateau and early stopping.

Frozen layers compute the same thing every epoch for a given input, so with `cache_views=N`
their outputs for N augmented views of each training image are computed once and stored
(float16, memory-mapped); every epoch then trains only the top layers, showing each image
through one of its views. On a CPU this makes an epoch several times faster. Without the cache
the images are augmented afresh every epoch.

After every epoch the run directory holds what `resume=True` needs: weights, optimizer state,
callback state and history, each written atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinclf import ui
from skinclf.backend import accelerator, load_keras, versions
from skinclf.config import TRAIN, TrainConfig
from skinclf.data.layout import LabelledImages, list_labelled_images
from skinclf.errors import Interrupted, SkinclfError
from skinclf.evaluation.seen import split_image_ids
from skinclf.files import atomic_path, check_output_file, new_folders, sha256_file, sha256_text
from skinclf.own_outputs import MODEL
from skinclf.metrics import classification_report
from skinclf.model.bundle import save_bundle
from skinclf.model.network import (
    ARCHITECTURES,
    PREPROCESSING,
    build_model,
    check_trainable_layers,
    set_trainable,
    split_model,
    with_input_size,
)
from skinclf.training.augment import AugmentSpec
from skinclf.training.callbacks import (
    BalancedAccuracy,
    is_out_of_memory,
    restore,
    resume_state,
    training_callbacks,
)
from skinclf.training.loader import FeatureBatches, ImageBatches, in_background
from skinclf.training.posthoc_fit import (
    class_weights,
    post_hoc,
    prior_tau,
    validation_probs,
)

keras = load_keras()
ops = keras.ops



@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    model_path: Path
    run_dir: Path
    epochs_run: int
    best_epoch: int
    monitor: str
    best_value: float
    val_metrics: dict[str, Any]
    seconds: float
    images_per_second: float


def _phase_sizes(*, epochs: int, image_size: int, train_size: int, fixres_epochs: int) -> list[tuple[int, int, int]]:
    """(first epoch, end epoch, image side) of each training phase: small first, then full size."""
    if not train_size or train_size == image_size:
        return [(0, epochs, image_size)]
    small_end = epochs - fixres_epochs
    phases = [(0, small_end, train_size), (small_end, epochs, image_size)]
    return [p for p in phases if p[1] > p[0]]


def _labelled(data: Path, split: str, classes: tuple[str, ...] | None = None) -> LabelledImages:
    folder = Path(data) / split
    if not folder.is_dir():
        raise SkinclfError(f"no prepared data at {folder}: run `skinclf prepare --out {data}` first (or pass --data)")
    return list_labelled_images(folder, classes=classes)


def _data_fingerprint(data: Path, train: LabelledImages, val: LabelledImages) -> str:
    manifest = Path(data) / "prepare.json"
    if manifest.is_file():
        return json.loads(manifest.read_text(encoding="utf-8"))["fingerprint"]
    listing = "\n".join(f"{p.parent.name}/{p.name}" for p in (*train.paths, *val.paths))
    return sha256_text(listing)


def _loss(loss: str, gamma: float, label_smoothing: float):
    if loss == "focal":
        # alpha=1: class balance comes from the class weights, not a second constant.
        return keras.losses.CategoricalFocalCrossentropy(alpha=1.0, gamma=gamma, label_smoothing=label_smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def _metrics(num_classes: int) -> list:
    return [
        keras.metrics.TopKCategoricalAccuracy(k=1, name="top1_accuracy"),
        keras.metrics.TopKCategoricalAccuracy(k=min(2, num_classes), name="top2_accuracy"),
        keras.metrics.TopKCategoricalAccuracy(k=min(3, num_classes), name="top3_accuracy"),
        BalancedAccuracy(num_classes),
    ]


def _optimizer(*, lr: float, weight_decay: float, schedule: str, warmup_epochs: int, epochs: int, steps: int):
    """Adam or AdamW at a fixed rate (ReduceLROnPlateau changes it) or on warm-up + cosine decay.

    The schedule reads the optimizer's step counter, which the checkpoint restores, so a resumed
    run continues on the same curve."""
    rate = lr
    if schedule == "cosine":
        warmup = warmup_epochs * steps
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=lr / 100 if warmup else lr, decay_steps=max(1, (epochs - warmup_epochs) * steps),
            warmup_target=lr if warmup else None, warmup_steps=warmup)
    if weight_decay:
        return keras.optimizers.AdamW(rate, weight_decay=weight_decay)
    return keras.optimizers.Adam(rate)


# --- the feature cache ---------------------------------------------------------------------


def _cache_views(prefix, batches: ImageBatches, folder: Path, name: str, views: int, *, show_progress) -> list[np.ndarray]:
    """Compute (or reuse) the prefix's outputs for `views` passes over `batches`' images.

    View v is exactly what epoch v of uncached training would feed the frozen layers. Each
    view is a float16 .npy written under a temporary name and renamed when complete, so an
    interrupted cache build resumes at the first missing view.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shape = (len(batches.paths), *tuple(int(d) for d in prefix.outputs[0].shape[1:]))
    todo = [v for v in range(views) if not (folder / f"{name}-view{v}.npy").is_file()]
    if todo:
        gigabytes = len(todo) * np.prod(shape) * 2 / 1e9
        ui.stderr.print(f"Caching frozen-layer outputs of {len(todo)} {name} view(s) x {shape[0]} images "
                        f"(~{gigabytes:.1f} GB) in {folder}", soft_wrap=True)
        with ui.progress(enabled=show_progress) as progress:
            task = progress.add_task(f"Caching {name} features", total=len(todo) * shape[0], rate="")
            t0, done = time.perf_counter(), 0
            for v in todo:
                target = folder / f"{name}-view{v}.npy"
                batches.epoch = v
                with atomic_path(target) as tmp:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype="float16", shape=shape)
                    tasks = [lambda b=b: batches[b] for b in range(len(batches))]
                    row = 0
                    for x, *_ in in_background(tasks, workers=batches.workers):
                        out[row : row + len(x)] = np.asarray(prefix.predict_on_batch(x), dtype="float16")
                        row += len(x)
                        done += len(x)
                        progress.update(task, advance=len(x), rate=ui.rate_text(done, time.perf_counter() - t0))
                    out.flush()
                    del out
    return [np.load(folder / f"{name}-view{v}.npy", mmap_mode="r") for v in range(views)]


# --- per-epoch state for --resume ---------------------------------------------------------


def _fit(trainable, phases, *, make_train, val_ds, initial_epoch, callbacks, batch_size) -> None:
    """Run the epochs left, phase by phase (train small, then at full size)."""
    try:
        for first, end, size in phases:
            if end <= initial_epoch or trainable.stop_training:
                continue
            trainable.fit(make_train(size, max(first, initial_epoch)), validation_data=val_ds, epochs=end,
                          initial_epoch=max(first, initial_epoch), callbacks=callbacks, verbose=0, shuffle=False)
    except SkinclfError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise SkinclfError(f"out of memory at batch size {batch_size}: try --batch-size {max(1, batch_size // 2)}") from None
        raise


def train_model(config: TrainConfig = TRAIN, *, show_progress: bool | None = None) -> TrainResult:
    """Train a model on `config.data/train`, select the best epoch on `data/val`, save a bundle at `config.out`.

    `weights` is 'imagenet' (Keras' download), 'none', or the path of a MobileNet weights file.
    `run_dir` (default `runs/<out stem>`) keeps the checkpoints and the feature cache; with
    `resume`, training continues from its last completed epoch. An existing `out`, or checkpoints
    in `run_dir`, are replaced only with `overwrite` (or `resume`). After training, the decision
    weights, the prior correction and the temperature are fitted on validation and folded in.
    """
    c = config
    c.validate()
    prior_tau(c.prior_correction)
    _check_arch(c)
    out, data = _check_out(Path(c.out), overwrite=c.overwrite, resume=c.resume), Path(c.data)
    train_set = _labelled(data, "train")
    val_set = _labelled(data, "val", classes=train_set.classes)
    decision_of = class_weights(c.decision_weight, dict.fromkeys(train_set.classes, 1), option="--decision-weight")
    weights_arg: str | Path | None = {"imagenet": "imagenet", "none": None}.get(c.weights, Path(c.weights))
    settings = _settings(c, data=data, weights_arg=weights_arg, train_set=train_set, val_set=val_set)
    run_dir = Path(c.run_dir) if c.run_dir is not None else Path("runs") / out.stem
    _check_run_dir(run_dir, overwrite=c.overwrite, resume=c.resume)
    state = resume_state(run_dir, settings, c.resume)
    with new_folders(run_dir), _interrupt_hint(run_dir):
        run = _train(settings, state, train_set=train_set, val_set=val_set, weights_arg=weights_arg, epochs=c.epochs,
                     run_dir=run_dir, workers=c.workers, show_progress=show_progress)
        return _finish(run, out=out, data=data, train_set=train_set, val_set=val_set, epochs=c.epochs,
                       workers=c.workers, decision_weight=c.decision_weight, decision_of=decision_of,
                       prior_correction=c.prior_correction, calibrate=c.calibrate)


def _check_arch(c: TrainConfig) -> None:
    if c.arch not in ARCHITECTURES:
        raise SkinclfError(f"--arch {c.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if c.arch != "mobilenet" and (c.cache_views or c.alpha != 1.0):
        raise SkinclfError(f"--arch {c.arch} trains from images at width 1.0: drop --cache-views and --alpha")
    check_trainable_layers(c.trainable_layers, ARCHITECTURES[c.arch][2])


def _settings(config: TrainConfig, *, data: Path, weights_arg, train_set: LabelledImages,
              val_set: LabelledImages) -> dict[str, Any]:
    """The run's settings, as recorded in its checkpoints and its bundle (the keys of
    `config.TRAIN_SETTINGS`, then data, weights, fingerprint, classes and, with --schedule cosine,
    epochs_planned): an older run's record compares equal, so --resume continues it."""
    weights_id = sha256_file(weights_arg) if isinstance(weights_arg, Path) and weights_arg.is_file() else config.weights
    settings = {"data": str(data.resolve()), **config.settings(), "weights": weights_id,
                "fingerprint": _data_fingerprint(data, train_set, val_set), "classes": list(train_set.classes)}
    if config.schedule == "cosine":
        settings["epochs_planned"] = config.epochs  # the curve depends on the total, so resume must keep it
    return settings


@dataclass
class _Run:
    """A finished fit: the model at its best epoch and what the bundle records about the run."""

    model: Any
    start: int
    phases: list[tuple[int, int, int]]
    augment: AugmentSpec
    weight_of: dict[str, float]
    state: dict[str, Any]
    initial_epoch: int
    device: str
    seconds: float
    settings: dict[str, Any]
    run_dir: Path


def _train(settings: dict, state: dict | None, *, train_set: LabelledImages, val_set: LabelledImages, weights_arg,
           epochs: int, run_dir: Path, workers: int, show_progress) -> _Run:
    """Build the network, run the epochs left (from the checkpoint with --resume), load the best."""
    classes, image_size, batch_size = train_set.classes, settings["image_size"], settings["batch_size"]
    weight_of = class_weights(settings["class_weight"], train_set.counts())
    augment = AugmentSpec(color=settings["color_jitter"],
                          crop_scale=(settings["crop_scale"], 1.0) if settings["crop_scale"] else None)
    phases = _phase_sizes(epochs=epochs, image_size=image_size, train_size=settings["train_size"],
                          fixres_epochs=settings["fixres_epochs"])
    keras.utils.set_random_seed(settings["seed"])
    model = build_model(num_classes=len(classes), image_size=image_size if len(phases) == 1 and phases[0][2] == image_size else None,
                        alpha=settings["alpha"], weights=weights_arg, dropout=settings["dropout"], seed=settings["seed"],
                        colour_constancy=settings["colour_constancy"], arch=settings.get("arch", "mobilenet"))
    start = set_trainable(model, settings["trainable_layers"])
    sample_weights = [weight_of[classes[label]] for label in train_set.labels]
    trainable, make_train, val_ds = _datasets(
        model, start, train_set, val_set, settings=settings, augment=augment, sample_weights=sample_weights,
        run_dir=run_dir, workers=workers, show_progress=show_progress)
    steps = math.ceil(len(train_set.paths) / batch_size)
    trainable.compile(optimizer=_optimizer(lr=settings["lr"], weight_decay=settings["weight_decay"], schedule=settings["schedule"],
                                           warmup_epochs=settings["warmup_epochs"], epochs=epochs, steps=steps),
                      loss=_loss(settings["loss"], settings["focal_gamma"], settings["label_smoothing"]),
                      metrics=_metrics(len(classes)))
    if state:
        restore(trainable, run_dir)
    callbacks, run_state = training_callbacks(schedule=settings["schedule"], monitor=settings["monitor"],
                                              patience=settings["patience"], run_dir=run_dir, settings=settings, state=state,
                                              epochs=epochs, steps=steps, images=len(train_set.paths),
                                              show_progress=show_progress)
    initial_epoch = state["epoch"] if state else 0
    device = _announce(trainable, phases, trainable_layers=settings["trainable_layers"], train=len(train_set.paths),
                       val=len(val_set.paths), initial_epoch=initial_epoch)
    t0 = time.perf_counter()
    if initial_epoch < epochs and not (state and state.get("stopped_early")):
        _fit(trainable, phases, make_train=make_train, val_ds=val_ds, initial_epoch=initial_epoch,
             callbacks=callbacks, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    trainable.load_weights(run_dir / "best.weights.h5")
    if model.inputs[0].shape[1] is None:
        model = with_input_size(model, image_size)
    return _Run(model=model, start=start, phases=phases, augment=augment, weight_of=weight_of, state=run_state.state,
                initial_epoch=initial_epoch, device=device, seconds=seconds, settings=settings, run_dir=run_dir)


def _finish(run: _Run, *, out: Path, data: Path, train_set: LabelledImages, val_set: LabelledImages, epochs: int,
            workers: int, decision_weight: str, decision_of: dict[str, float], prior_correction: str, calibrate: bool) -> TrainResult:
    """Fit the post-hoc steps on validation and save the bundle.

    After checkpoint selection, so a finished run can be re-bundled with other post-hoc choices
    (`--resume`) without training again; the validation figures include them."""
    classes, settings, history = train_set.classes, run.settings, run.state["history"]
    raw = validation_probs(run.model, val_set, image_size=settings["image_size"], batch_size=settings["batch_size"],
                           workers=workers)
    labels = np.asarray(val_set.labels)
    probs, fitted = post_hoc(run.model, raw, labels, classes=classes, prior_counts=train_set.counts(),
                             decision_of=decision_of, prior_correction=prior_correction, calibrate=calibrate)
    val_report = classification_report(labels, probs, list(classes))
    val_report.get("melanoma", {}).pop("roc", None)
    val_report["calibration"] = fitted["validation_after"]
    training = {**settings, "epochs": epochs, "epochs_run": len(history), "best_epoch": run.state["best_epoch"],
                "best_value": run.state["best"], "class_weights": run.weight_of,
                "decision_weight": decision_weight, "decision_weights": decision_of, "augmentation": asdict(run.augment),
                "phases": [{"epochs": [first + 1, end], "image_size": size} for first, end, size in run.phases],
                "device": run.device, "seconds": round(run.state.get("seconds", run.seconds), 1)}
    save_bundle(run.model, out, _bundle_meta(run.model, out=out, start=run.start, training=training, post_hoc=fitted,
                                             val_report=val_report, history=history, data=data,
                                             train_set=train_set, val_set=val_set))
    epochs_trained = max(0, len(history) - run.initial_epoch)
    return TrainResult(
        model_path=out, run_dir=run.run_dir, epochs_run=len(history), best_epoch=run.state["best_epoch"] or 0,
        monitor=settings["monitor"], best_value=float(run.state["best"] or float("nan")), val_metrics=val_report,
        seconds=run.seconds,
        images_per_second=epochs_trained * len(train_set.paths) / run.seconds if run.seconds > 0 and epochs_trained else 0.0,
    )


def _check_out(out: Path, *, overwrite: bool, resume: bool) -> Path:
    if out.suffix != ".keras":
        raise SkinclfError(f"--out {out}: the model file must end in .keras")
    if resume and overwrite:
        raise SkinclfError("--resume continues the run in --run-dir and --overwrite starts it over: choose one")
    # An existing model is replaced only when asked (--resume re-bundles this run's own model).
    check_output_file(out, example="model.keras", kind=MODEL, overwrite=overwrite or resume)
    return out


def _check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to start over on the checkpoints of an earlier run unless asked (--overwrite)."""
    if resume or overwrite or not (run_dir / "state.json").is_file():
        return
    raise SkinclfError(f"{run_dir} holds the checkpoints of an earlier run: add --resume to continue it, --overwrite "
                       "to start over (its checkpoints are replaced), or choose another --out or --run-dir")


@contextlib.contextmanager
def _interrupt_hint(run_dir: Path):
    """Ctrl-C: say how to continue, once (the CLI prints it)."""
    try:
        yield
    except KeyboardInterrupt:
        if (run_dir / "state.json").is_file():
            raise Interrupted(f"the finished epochs are saved in {run_dir}; continue with the same command plus "
                              "--resume (skinclf train ... --resume)") from None
        raise Interrupted("no epoch had finished, so nothing was saved; run the same command again") from None


def _datasets(model, start: int, train_set: LabelledImages, val_set: LabelledImages, *, settings: dict,
              augment: AugmentSpec, sample_weights: list[float], run_dir: Path, workers: int, show_progress):
    """What trains (the whole model, or its top above a feature cache), the training batches of an
    epoch at a size, and the validation batches."""
    classes = settings["classes"]
    common = {"num_classes": len(classes), "batch_size": settings["batch_size"], "seed": settings["seed"]}
    image_common = {**common, "workers": workers}
    image_size, views = settings["image_size"], settings["cache_views"]
    if not views:
        def make_images(size: int, epoch: int):
            return ImageBatches(train_set.paths, train_set.labels, augment=augment, shuffle=True, epoch=epoch,
                                sample_weights=sample_weights, image_size=size, **image_common)

        # Validation always at the size predict will use, so epochs of both phases compare.
        return model, make_images, ImageBatches(val_set.paths, val_set.labels, image_size=image_size, **image_common)
    prefix, trainable = split_model(model, start)
    key = sha256_text(json.dumps([settings["fingerprint"], settings["weights"], image_size, settings["alpha"], start,
                                  settings["seed"], asdict(augment)]))
    # Shared by runs beside this one: the key covers everything the cached features depend on.
    cache_dir = run_dir.parent / f"feature-cache-{key[:16]}"
    train_views = _cache_views(prefix, ImageBatches(train_set.paths, train_set.labels, augment=augment,
                                                    image_size=image_size, **image_common),
                               cache_dir, "train", views, show_progress=show_progress)
    val_views = _cache_views(prefix, ImageBatches(val_set.paths, val_set.labels, image_size=image_size, **image_common),
                             cache_dir, "val", 1, show_progress=show_progress)

    def make_features(size: int, epoch: int):
        return FeatureBatches(train_views, train_set.labels, shuffle=True, epoch=epoch,
                              sample_weights=sample_weights, **common)

    return trainable, make_features, FeatureBatches(val_views, val_set.labels, **common)


def _announce(trainable, phases, *, trainable_layers: int, train: int, val: int, initial_epoch: int) -> str:
    device = accelerator() or "CPU"
    sizes = " then ".join(f"{end - first} epoch(s) at {size}px" for first, end, size in phases)
    ui.stderr.print(
        f"Training {len(trainable.trainable_weights)} weight tensors ({trainable_layers} base layers + head) on "
        f"{train} images ({sizes}), validating on {val}; {device}"
        + (f"; resuming after epoch {initial_epoch}" if initial_epoch else ""),
        soft_wrap=True,
    )
    return device


def _bundle_meta(model, *, out: Path, start: int, training: dict, post_hoc: dict, val_report: dict, history: list,
                 data: Path, train_set: LabelledImages, val_set: LabelledImages) -> dict[str, Any]:
    """Everything the bundle carries besides the weights (see the model card)."""
    colour_constancy = training["colour_constancy"]
    return {
        "name": out.stem,
        "classes": training["classes"],
        "input_size": [training["image_size"], training["image_size"]],
        "preprocessing": {**PREPROCESSING, **({"colour_constancy": "Shades of Gray, p = 6 (layer 'colour_constancy', "
                                                                   "before the scaling)"} if colour_constancy else {})},
        "architecture": {"base": {"mobilenetv2": "MobileNetV2"}.get(training.get("arch"), "MobileNet"), "alpha": training["alpha"],
                         "head": "global average pool, dropout, dense softmax", "dropout": training["dropout"],
                         "first_trainable_layer": model.layers[start].name, "colour_constancy": colour_constancy},
        "training": training,
        "post_hoc": post_hoc,
        "calibration": {"temperature": post_hoc["temperature"], "fitted_on": "validation split",
                        "validation_before": post_hoc["validation_before"], "validation_after": post_hoc["validation_after"]},
        "data": {"path": str(data), "fingerprint": training["fingerprint"], "train_counts": train_set.counts(),
                 "val_counts": val_set.counts(), **split_image_ids(train_set.paths, val_set.paths)},
        "metrics": {"validation": val_report},
        "history": history,
        "versions": versions(),
        "intended_use": "Decision support on dermoscopic images for clinicians; not a diagnosis; "
                        "not for smartphone photographs.",
    }
