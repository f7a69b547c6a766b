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

import csv
import io
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinclf import ui
from skinclf.augment import AugmentSpec
from skinclf.calibration import calibration_report, fit_prior_tau, fit_temperature, logits_from_probs, softmax
from skinclf.backend import accelerator, load_keras, versions
from skinclf.config import TRAIN
from skinclf.data import FeatureBatches, ImageBatches, in_background
from skinclf.errors import SkinclfError
from skinclf.options import at_least
from skinclf.files import atomic_path, atomic_write, atomic_write_json, check_output_file, sha256_file, sha256_text
from skinclf.inference import predict_files
from skinclf.layout import LabelledImages, list_labelled_images
from skinclf.metrics import classification_report
from skinclf.seen import split_image_ids
from skinclf.model import (
    PREPROCESSING,
    build_model,
    check_trainable_layers,
    fold_logit_transform,
    save_bundle,
    set_trainable,
    split_model,
    with_input_size,
)

keras = load_keras()
ops = keras.ops

MONITORS = ("val_top2_accuracy", "val_top1_accuracy", "val_top3_accuracy", "val_balanced_accuracy", "val_loss")
LOSSES = ("crossentropy", "focal")
SCHEDULES = ("plateau", "cosine")
# Fault injection for the resume test: hard-kill the process after this epoch's checkpoint.
_KILL_AFTER_EPOCH = "_SKINCLF_KILL_AFTER_EPOCH"


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


class BalancedAccuracy(keras.metrics.Metric):
    """Mean per-class recall over the classes seen, accumulated over an epoch (backend-agnostic)."""

    def __init__(self, num_classes: int, name: str = "balanced_accuracy", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.matrix = self.add_variable(shape=(num_classes, num_classes), initializer="zeros", name="matrix")

    def update_state(self, y_true, y_pred, sample_weight=None):  # unweighted on purpose
        t = ops.one_hot(ops.argmax(y_true, axis=-1), self.num_classes)
        p = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes)
        self.matrix.assign_add(ops.matmul(ops.transpose(t), p))

    def result(self):
        support = ops.sum(self.matrix, axis=1)
        present = ops.cast(support > 0, "float32")
        recall = ops.diagonal(self.matrix) / ops.maximum(support, 1.0)
        return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        self.matrix.assign(ops.zeros((self.num_classes, self.num_classes)))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def class_weights(spec: str, counts: dict[str, int], *, option: str = "--class-weight") -> dict[str, float]:
    """Per-class loss weights from `spec`: a base, optionally followed by per-class changes.

    Bases: 'balanced', n / (k * n_c), so every class carries the same total weight
    (scikit-learn's formula); 'sqrt', its square root, a softer correction; 'none', all 1.
    Changes, comma-separated: 'NAME=W' sets a weight, 'NAME*F' multiplies it. Without a base,
    'none' is assumed: 'mel=4,nv=1.25' (the seed's style) leaves other classes at 1;
    'balanced,mel*2' doubles melanoma's balanced weight.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    present = {c: n for c, n in counts.items() if n > 0}
    total, k = sum(present.values()), len(present)
    balanced = {c: total / (k * n) if n else 0.0 for c, n in counts.items()}
    bases = {"balanced": balanced, "sqrt": {c: math.sqrt(w) for c, w in balanced.items()},
             "none": dict.fromkeys(counts, 1.0)}
    weights = dict(bases[items.pop(0)] if items and items[0] in bases else bases["none"])
    for item in items:
        op = "=" if "=" in item else "*" if "*" in item else None
        name, _, value = item.partition(op) if op else (item, "", "")
        name = name.strip()
        if op is None or name not in counts:
            raise SkinclfError(
                f"{option} {spec!r}: expected a base (balanced, sqrt, none) and/or NAME=WEIGHT or NAME*FACTOR "
                f"items with NAME one of {', '.join(counts)}"
            )
        try:
            number = float(value)
        except ValueError:
            raise SkinclfError(f"{option} {item!r}: {value!r} is not a number") from None
        if not number > 0:
            raise SkinclfError(f"{option} {item!r}: weights must be positive")
        weights[name] = number if op == "=" else weights[name] * number
    return weights


def _validate(*, epochs, batch_size, lr, loss, monitor, cache_views, image_size, alpha, dropout, label_smoothing,
              color_jitter, crop_scale=0.0, weight_decay=0.0, schedule="plateau", warmup_epochs=0, train_size=0,
              fixres_epochs=0, patience=1, workers=1, prior_correction="none", focal_gamma=0.0, seed=0) -> None:
    if epochs < 1:
        raise SkinclfError(f"--epochs {epochs}: must be at least 1")
    if batch_size < 1:
        raise SkinclfError(f"--batch-size {batch_size}: must be at least 1")
    if workers < 1:
        raise SkinclfError(f"--workers {workers}: must be at least 1")
    at_least("--focal-gamma", focal_gamma, 0, example=2.0)
    at_least("--seed", seed, 0, example=42)
    if patience < 1:
        raise SkinclfError(f"--patience {patience}: must be at least 1")
    if not lr > 0:
        raise SkinclfError(f"--lr {lr}: must be positive")
    if loss not in LOSSES:
        raise SkinclfError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if monitor not in MONITORS:
        raise SkinclfError(f"--monitor {monitor!r}: choose one of {', '.join(MONITORS)}")
    if schedule not in SCHEDULES:
        raise SkinclfError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup_epochs < epochs:
        raise SkinclfError(f"--warmup-epochs {warmup_epochs}: must be 0 or more and below --epochs {epochs}")
    if cache_views < 0:
        raise SkinclfError(f"--cache-views {cache_views}: must be 0 (no cache) or more")
    if image_size < 32:
        raise SkinclfError(f"--image-size {image_size}: must be at least 32")
    if train_size and not 32 <= train_size <= image_size:
        raise SkinclfError(f"--train-size {train_size}: must be 0 (off) or 32..{image_size} (the --image-size)")
    if not 0 <= fixres_epochs <= epochs:
        raise SkinclfError(f"--fixres-epochs {fixres_epochs}: must be 0..{epochs} (the --epochs)")
    if cache_views and train_size and train_size != image_size:
        raise SkinclfError("--train-size needs training from images: drop --cache-views")
    if alpha not in (0.25, 0.5, 0.75, 1.0):
        raise SkinclfError(f"--alpha {alpha}: MobileNet comes in 0.25, 0.5, 0.75 and 1.0")
    if not 0 <= color_jitter < 1:
        raise SkinclfError(f"--color-jitter {color_jitter}: must be in [0, 1), e.g. 0.1")
    if not 0 <= crop_scale < 1:
        raise SkinclfError(f"--crop-scale {crop_scale}: must be in [0, 1), e.g. 0.3 (0: no random crops)")
    if weight_decay < 0:
        raise SkinclfError(f"--weight-decay {weight_decay}: must be 0 (Adam) or positive (AdamW), e.g. 0.05")
    if not 0 <= dropout < 1 or not 0 <= label_smoothing < 1:
        raise SkinclfError("dropout and label smoothing must be in [0, 1)")
    _prior_tau(prior_correction)


def _prior_tau(spec: str) -> float | str | None:
    """--prior-correction as None ('none'), 'fit', or a fixed tau."""
    if spec in ("none", "fit"):
        return None if spec == "none" else spec
    try:
        return float(spec)
    except ValueError:
        raise SkinclfError(f"--prior-correction {spec!r}: use none, fit, or a number such as 0.5") from None


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


class LogLearningRate(keras.callbacks.Callback):
    """Puts the rate the epoch ended with into the logs (ReduceLROnPlateau does so itself)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and "learning_rate" not in logs:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


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


class EpochProgress(keras.callbacks.Callback):
    """A rich progress bar per epoch (on a terminal) and one summary line per epoch."""

    def __init__(self, *, epochs: int, steps: int, images: int, show_progress: bool | None) -> None:
        super().__init__()
        self.epochs, self.steps, self.images = epochs, steps, images
        self.progress = ui.progress(transient=True, enabled=show_progress)
        self.task = None
        self.t0 = 0.0

    def on_train_begin(self, logs=None):
        self.progress.start()

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()
        self.task = self.progress.add_task(f"Epoch {epoch + 1}/{self.epochs}", total=self.steps, rate="")

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        text = f"loss {logs.get('loss', float('nan')):.3f} top1 {logs.get('top1_accuracy', float('nan')):.3f}"
        self.progress.update(self.task, advance=1, rate=text)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = time.perf_counter() - self.t0
        self.progress.remove_task(self.task)

        def fmt(prefix: str) -> str:
            return " ".join(
                f"{short} {logs[prefix + key]:.3f}"
                for key, short in (("loss", "loss"), ("top1_accuracy", "top1"), ("top2_accuracy", "top2"),
                                   ("top3_accuracy", "top3"), ("balanced_accuracy", "bal"))
                if prefix + key in logs
            )

        lr = logs.get("learning_rate", float("nan"))
        ui.stderr.print(
            f"Epoch {epoch + 1}/{self.epochs}  train: {fmt('')}  |  val: {fmt('val_')}  |  lr {lr:.1e}  "
            f"{seconds:.0f}s ({self.images / max(seconds, 1e-9):.0f} img/s)",
            soft_wrap=True,
        )

    def on_train_end(self, logs=None):
        self.progress.stop()


class RunState(keras.callbacks.Callback):
    """Keeps the best weights and, after every epoch, everything `--resume` needs.

    Placed after ReduceLROnPlateau and EarlyStopping in the callback list: on resume it
    restores their counters after their own `on_train_begin` has reset them.
    """

    def __init__(self, run_dir: Path, *, settings: dict, monitor: str, reduce_lr, early_stop, state: dict | None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.settings = settings
        self.monitor = monitor
        self.mode = "min" if monitor.endswith("loss") else "max"
        self.reduce_lr, self.early_stop = reduce_lr, early_stop
        self.state = state or {"epoch": 0, "best": None, "best_epoch": None, "history": []}
        kill = os.environ.get(_KILL_AFTER_EPOCH)
        self.kill_after = int(kill) if kill else None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.perf_counter()
        # Reseed dropout from (seed, epoch): an epoch draws the same masks after --resume.
        for layer in self.model.layers:
            generator = getattr(layer, "seed_generator", None)
            if generator is not None:
                generator.state.assign(np.array([self.settings["seed"], epoch], dtype=generator.state.dtype))

    def on_train_begin(self, logs=None):
        saved = self.state.get("callbacks")
        if saved:
            for cb, key in ((self.reduce_lr, "reduce_lr"), (self.early_stop, "early_stop")):
                for attr, value in saved[key].items():
                    setattr(cb, attr, value)

    def improved(self, value: float) -> bool:
        best = self.state["best"]
        return best is None or (value < best if self.mode == "min" else value > best)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        value = float(logs[self.monitor])
        self.state["history"].append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}})
        if self.improved(value):
            self.state["best"], self.state["best_epoch"] = value, epoch + 1
            with atomic_path(self.run_dir / "best.weights.h5") as tmp:
                self.model.save_weights(tmp)
        with atomic_path(self.run_dir / "last.weights.h5") as tmp:
            self.model.save_weights(tmp)
        self.state["epoch"] = epoch + 1
        # Training time over every session of the run, so a resumed or re-bundled run reports it whole.
        self.state["seconds"] = self.state.get("seconds", 0.0) + time.perf_counter() - self.epoch_started
        self.state["stopped_early"] = bool(self.model.stop_training)
        self.state["callbacks"] = {
            "reduce_lr": {a: getattr(self.reduce_lr, a) for a in ("wait", "best", "cooldown_counter")},
            "early_stop": {a: getattr(self.early_stop, a) for a in ("wait", "best", "best_epoch", "stopped_epoch")},
        }
        write_history_csv(self.run_dir / "history.csv", self.state["history"])
        # The state file is written last: it only ever points at complete checkpoint files.
        atomic_write_json(self.run_dir / "state.json", {"settings": self.settings, **self.state})
        if self.kill_after is not None and epoch + 1 >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def write_history_csv(path: Path, history: list[dict]) -> None:
    """Per-epoch learning rate (as used in the epoch), losses and metrics as CSV (atomically)."""
    keys = sorted({k for row in history for k in row} - {"epoch"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["epoch", *keys], lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, buffer.getvalue())


def _restore(model, run_dir: Path) -> None:
    """Load the last epoch's weights and optimizer state into `model` (compiled)."""
    # The weights file holds the optimizer's slots too; Keras loads them only into a built
    # optimizer (and warns that it skipped them otherwise).
    model.optimizer.build(model.trainable_variables)
    model.load_weights(run_dir / "last.weights.h5")


def _is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "resourceexhausted" in text or "out of memory" in text or "oom when allocating" in text


def _resume_state(run_dir: Path, settings: dict, resume: bool) -> dict | None:
    """The saved state of an interrupted run (resume), or None after clearing old checkpoints."""
    if not resume:
        for name in ("state.json", "last.weights.h5", "best.weights.h5", "history.csv"):
            (run_dir / name).unlink(missing_ok=True)
        return None
    state_file = run_dir / "state.json"
    if not state_file.is_file():
        raise SkinclfError(f"nothing to resume in {run_dir} (no state.json); start without --resume")
    saved = json.loads(state_file.read_text(encoding="utf-8"))
    # Settings added in later versions default to their old behaviour when an older run lacks them.
    changed = [k for k in settings if saved["settings"].get(k, _LEGACY.get(k)) != settings[k]]
    if changed:
        raise SkinclfError(f"cannot resume {run_dir}: settings differ from the interrupted run ({', '.join(changed)}); "
                           f"pass the same options, or start over without --resume")
    return {k: v for k, v in saved.items() if k != "settings"}


_LEGACY = {"crop_scale": 0.0, "weight_decay": 0.0, "schedule": "plateau", "warmup_epochs": 1, "train_size": 0,
           "fixres_epochs": 0, "colour_constancy": False, "epochs_planned": None}


def _callbacks(*, schedule, monitor, patience, run_dir, settings, state, epochs, steps, images, show_progress):
    mode = "min" if monitor.endswith("loss") else "max"
    # ReduceLROnPlateau cannot change a scheduled rate; with a schedule it only keeps its counters.
    reduce_lr = keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=0.5, patience=2, min_lr=1e-5)
    early_stop = keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience)
    run_state = RunState(run_dir, settings=settings, monitor=monitor, reduce_lr=reduce_lr, early_stop=early_stop,
                         state=state)
    # Order matters: the first puts the epoch's learning rate into the logs the others read.
    first = reduce_lr if schedule == "plateau" else LogLearningRate()
    progress = EpochProgress(epochs=epochs, steps=steps, images=images, show_progress=show_progress)
    return [first, progress, early_stop, run_state], run_state


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
        if _is_out_of_memory(exc):
            raise SkinclfError(f"out of memory at batch size {batch_size}: try --batch-size {max(1, batch_size // 2)}") from None
        raise


def _validation_probs(model, val_set: LabelledImages, *, image_size: int, batch_size: int, workers: int) -> np.ndarray:
    """The assembled model's probabilities on the validation images, exactly as predict runs it."""
    probs = []
    for batch in predict_files(model, val_set.paths, image_size=image_size, batch_size=batch_size, workers=workers):
        bad = [f"{p.name}: {e}" for p, e in zip(batch.paths, batch.errors) if e]
        if bad:
            raise SkinclfError(f"cannot read validation image {bad[0]}")
        probs.append(batch.probs)
    return np.concatenate(probs)


def _post_hoc(model, probs: np.ndarray, labels: np.ndarray, *, classes, prior_counts: dict, decision_of: dict,
              prior_correction: str, calibrate: bool) -> tuple[np.ndarray, dict]:
    """Fold the decision weights, the prior correction and the temperature into the final layer.

    Each is fitted on the validation probabilities of the model before it; returns the final
    validation probabilities and a record of what was fitted. The decision is chosen first
    (shifts), then its confidence (temperature), which leaves every decision as it was.
    """
    prior = np.array([prior_counts[c] for c in classes], dtype="float64")
    prior = prior / prior.sum()
    tau = _prior_tau(prior_correction)
    record: dict[str, Any] = {"prior": dict(zip(classes, prior.round(6).tolist())), "prior_correction": prior_correction}
    if tau == "fit":
        tau, record["val_balanced_accuracy_at_tau"] = fit_prior_tau(probs, labels, prior)
    tau = float(tau or 0.0)
    shift = -tau * np.log(prior) + np.log([decision_of[c] for c in classes])
    logits = logits_from_probs(probs) + shift
    before = calibration_report(softmax(logits), labels)
    temperature = fit_temperature(softmax(logits), labels) if calibrate else 1.0
    fold_logit_transform(model, shift=shift, temperature=temperature)
    final = softmax(logits / temperature)
    after = calibration_report(final, labels)
    record.update({"tau": tau, "temperature": temperature, "shift": dict(zip(classes, shift.round(6).tolist())),
                   "fitted_on": "validation split",
                   "validation_before": {k: before[k] for k in ("ece", "brier", "nll")},
                   "validation_after": {k: after[k] for k in ("ece", "brier", "nll")}})
    return final, record


def train_model(
    *,
    data: Path = TRAIN.data,
    out: Path = TRAIN.out,
    epochs: int = TRAIN.epochs,
    batch_size: int = TRAIN.batch_size,
    lr: float = TRAIN.lr,
    weights: str = TRAIN.weights,
    trainable_layers: int = TRAIN.trainable_layers,
    class_weight: str = TRAIN.class_weight,
    decision_weight: str = TRAIN.decision_weight,
    loss: str = TRAIN.loss,
    focal_gamma: float = TRAIN.focal_gamma,
    monitor: str = TRAIN.monitor,
    patience: int = TRAIN.patience,
    dropout: float = TRAIN.dropout,
    label_smoothing: float = TRAIN.label_smoothing,
    seed: int = TRAIN.seed,
    image_size: int = TRAIN.image_size,
    alpha: float = TRAIN.alpha,
    cache_views: int = TRAIN.cache_views,
    color_jitter: float = TRAIN.color_jitter,
    crop_scale: float = TRAIN.crop_scale,
    weight_decay: float = TRAIN.weight_decay,
    schedule: str = TRAIN.schedule,
    warmup_epochs: int = TRAIN.warmup_epochs,
    train_size: int = TRAIN.train_size,
    fixres_epochs: int = TRAIN.fixres_epochs,
    colour_constancy: bool = TRAIN.colour_constancy,
    prior_correction: str = TRAIN.prior_correction,
    calibrate: bool = TRAIN.calibrate,
    workers: int = TRAIN.workers,
    run_dir: Path | None = None,
    resume: bool = False,
    show_progress: bool | None = None,
) -> TrainResult:
    """Train a model on `data/train`, select the best epoch on `data/val`, save a bundle at `out`.

    `weights` is 'imagenet' (Keras' download), 'none', or the path of a MobileNet weights file.
    `run_dir` (default `runs/<out stem>`) keeps the checkpoints and the feature cache; with
    `resume`, training continues from its last completed epoch. After training, the decision
    weights, the prior correction and the temperature are fitted on validation and folded in.
    """
    _validate(epochs=epochs, batch_size=batch_size, lr=lr, loss=loss, monitor=monitor, cache_views=cache_views,
              image_size=image_size, alpha=alpha, dropout=dropout, label_smoothing=label_smoothing,
              color_jitter=color_jitter, crop_scale=crop_scale, weight_decay=weight_decay, schedule=schedule,
              warmup_epochs=warmup_epochs if schedule == "cosine" else 0, train_size=train_size,
              fixres_epochs=fixres_epochs, patience=patience, workers=workers, prior_correction=prior_correction,
              focal_gamma=focal_gamma, seed=seed)
    check_trainable_layers(trainable_layers)
    out = Path(out)
    if out.suffix != ".keras":
        raise SkinclfError(f"--out {out}: the model file must end in .keras")
    check_output_file(out, example="model.keras")
    data = Path(data)
    train_set = _labelled(data, "train")
    val_set = _labelled(data, "val", classes=train_set.classes)
    classes = train_set.classes
    weight_of = class_weights(class_weight, train_set.counts())
    decision_of = class_weights(decision_weight, dict.fromkeys(classes, 1), option="--decision-weight")
    weights_arg: str | Path | None = {"imagenet": "imagenet", "none": None}.get(weights, Path(weights))
    weights_id = sha256_file(weights_arg) if isinstance(weights_arg, Path) and weights_arg.is_file() else weights
    settings = {
        "data": str(data.resolve()), "batch_size": batch_size, "lr": lr, "weights": weights_id,
        "trainable_layers": trainable_layers, "class_weight": class_weight, "loss": loss, "focal_gamma": focal_gamma,
        "monitor": monitor, "patience": patience, "dropout": dropout, "label_smoothing": label_smoothing,
        "seed": seed, "image_size": image_size, "alpha": alpha, "cache_views": cache_views,
        "color_jitter": color_jitter, "crop_scale": crop_scale, "weight_decay": weight_decay, "schedule": schedule,
        "warmup_epochs": warmup_epochs, "train_size": train_size, "fixres_epochs": fixres_epochs,
        "colour_constancy": colour_constancy, "fingerprint": _data_fingerprint(data, train_set, val_set),
        "classes": list(classes),
    }
    if schedule == "cosine":
        settings["epochs_planned"] = epochs  # the curve depends on the total, so resume must keep it
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / out.stem
    state = _resume_state(run_dir, settings, resume)
    run_dir.mkdir(parents=True, exist_ok=True)

    augment = AugmentSpec(color=color_jitter, crop_scale=(crop_scale, 1.0) if crop_scale else None)
    phases = _phase_sizes(epochs=epochs, image_size=image_size, train_size=train_size, fixres_epochs=fixres_epochs)
    keras.utils.set_random_seed(seed)
    model = build_model(num_classes=len(classes), image_size=image_size if len(phases) == 1 and phases[0][2] == image_size else None,
                        alpha=alpha, weights=weights_arg, dropout=dropout, seed=seed, colour_constancy=colour_constancy)
    start = set_trainable(model, trainable_layers)
    train_weights = [weight_of[classes[label]] for label in train_set.labels]
    initial_epoch = state["epoch"] if state else 0
    common = {"num_classes": len(classes), "batch_size": batch_size, "seed": seed}
    image_common = {**common, "workers": workers}
    if cache_views:
        prefix, trainable = split_model(model, start)
        key = sha256_text(json.dumps([settings["fingerprint"], weights_id, image_size, alpha, start, seed, asdict(augment)]))
        # Shared by runs beside this one: the key covers everything the cached features depend on.
        cache_dir = run_dir.parent / f"feature-cache-{key[:16]}"
        train_views = _cache_views(prefix, ImageBatches(train_set.paths, train_set.labels, augment=augment,
                                                        image_size=image_size, **image_common),
                                   cache_dir, "train", cache_views, show_progress=show_progress)
        val_views = _cache_views(prefix, ImageBatches(val_set.paths, val_set.labels, image_size=image_size, **image_common),
                                 cache_dir, "val", 1, show_progress=show_progress)

        def make_train(size: int, epoch: int):
            return FeatureBatches(train_views, train_set.labels, shuffle=True, epoch=epoch,
                                  sample_weights=train_weights, **common)

        val_ds = FeatureBatches(val_views, val_set.labels, **common)
    else:
        trainable = model

        def make_train(size: int, epoch: int):
            return ImageBatches(train_set.paths, train_set.labels, augment=augment, shuffle=True, epoch=epoch,
                                sample_weights=train_weights, image_size=size, **image_common)

        # Validation always at the size predict will use, so epochs of both phases compare.
        val_ds = ImageBatches(val_set.paths, val_set.labels, image_size=image_size, **image_common)

    steps = math.ceil(len(train_set.paths) / batch_size)
    trainable.compile(optimizer=_optimizer(lr=lr, weight_decay=weight_decay, schedule=schedule,
                                           warmup_epochs=warmup_epochs, epochs=epochs, steps=steps),
                      loss=_loss(loss, focal_gamma, label_smoothing), metrics=_metrics(len(classes)))
    if state:
        _restore(trainable, run_dir)
    callbacks, run_state = _callbacks(schedule=schedule, monitor=monitor, patience=patience, run_dir=run_dir,
                                      settings=settings, state=state, epochs=epochs, steps=steps,
                                      images=len(train_set.paths), show_progress=show_progress)
    device = accelerator() or "CPU"
    sizes = " then ".join(f"{end - first} epoch(s) at {size}px" for first, end, size in phases)
    ui.stderr.print(
        f"Training {len(trainable.trainable_weights)} weight tensors ({trainable_layers} base layers + head) on "
        f"{len(train_set.paths)} images ({sizes}), validating on {len(val_set.paths)}; {device}"
        + (f"; resuming after epoch {initial_epoch}" if initial_epoch else ""),
        soft_wrap=True,
    )
    t0 = time.perf_counter()
    if initial_epoch < epochs and not (state and state.get("stopped_early")):
        _fit(trainable, phases, make_train=make_train, val_ds=val_ds, initial_epoch=initial_epoch,
             callbacks=callbacks, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    history = run_state.state["history"]
    epochs_trained = max(0, len(history) - initial_epoch)
    best_epoch = run_state.state["best_epoch"]
    trainable.load_weights(run_dir / "best.weights.h5")
    if model.inputs[0].shape[1] is None:
        model = with_input_size(model, image_size)

    # After checkpoint selection, so a finished run can be re-bundled with other post-hoc
    # choices (`--resume`) without training again; the validation figures below include them.
    raw = _validation_probs(model, val_set, image_size=image_size, batch_size=batch_size, workers=workers)
    labels = np.asarray(val_set.labels)
    probs, post_hoc = _post_hoc(model, raw, labels, classes=classes, prior_counts=train_set.counts(),
                                decision_of=decision_of, prior_correction=prior_correction, calibrate=calibrate)
    val_report = classification_report(labels, probs, list(classes))
    val_report.get("melanoma", {}).pop("roc", None)
    val_report["calibration"] = post_hoc["validation_after"]
    meta = {
        "name": out.stem,
        "classes": list(classes),
        "input_size": [image_size, image_size],
        "preprocessing": {**PREPROCESSING, **({"colour_constancy": "Shades of Gray, p = 6 (layer 'colour_constancy', "
                                                                   "before the scaling)"} if colour_constancy else {})},
        "architecture": {"base": "MobileNet", "alpha": alpha, "head": "global average pool, dropout, dense softmax",
                         "dropout": dropout, "first_trainable_layer": model.layers[start].name,
                         "colour_constancy": colour_constancy},
        "training": {**settings, "epochs": epochs, "epochs_run": len(history), "best_epoch": best_epoch,
                     "best_value": run_state.state["best"], "class_weights": weight_of,
                     "decision_weight": decision_weight, "decision_weights": decision_of, "augmentation": asdict(augment),
                     "phases": [{"epochs": [first + 1, end], "image_size": size} for first, end, size in phases],
                     "device": device, "seconds": round(run_state.state.get("seconds", seconds), 1)},
        "post_hoc": post_hoc,
        "calibration": {"temperature": post_hoc["temperature"], "fitted_on": "validation split",
                        "validation_before": post_hoc["validation_before"], "validation_after": post_hoc["validation_after"]},
        "data": {"path": str(data), "fingerprint": settings["fingerprint"], "train_counts": train_set.counts(),
                 "val_counts": val_set.counts(), **split_image_ids(train_set.paths, val_set.paths)},
        "metrics": {"validation": val_report},
        "history": history,
        "versions": versions(),
        "intended_use": "Decision support on dermoscopic images for clinicians; not a diagnosis; "
                        "not for smartphone photographs.",
    }
    save_bundle(model, out, meta)
    return TrainResult(
        model_path=out, run_dir=run_dir, epochs_run=len(history), best_epoch=best_epoch or 0, monitor=monitor,
        best_value=float(run_state.state["best"] or float("nan")), val_metrics=val_report, seconds=seconds,
        images_per_second=epochs_trained * len(train_set.paths) / seconds if seconds > 0 and epochs_trained else 0.0,
    )
