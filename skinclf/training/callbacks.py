"""Keras callbacks of a training run: balanced accuracy, progress, learning rate, and the run state `--resume` reads."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from skinclf import ui
from skinclf.backend import load_keras
from skinclf.errors import SkinclfError
from skinclf.files import atomic_path, atomic_write, atomic_write_json

keras = load_keras()
ops = keras.ops

# Tests set this to kill the process after an epoch, as a crash would (see tests/training/test_train.py).
_KILL_AFTER_EPOCH = "_SKINCLF_KILL_AFTER_EPOCH"
# Settings of runs saved before an option existed, and the value that reproduces them.
_LEGACY = {"crop_scale": 0.0, "weight_decay": 0.0, "schedule": "plateau", "warmup_epochs": 1, "train_size": 0,
           "fixres_epochs": 0, "colour_constancy": False, "epochs_planned": None}


@keras.saving.register_keras_serializable(package="skinclf")
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


class LogLearningRate(keras.callbacks.Callback):
    """Puts the rate the epoch ended with into the logs (ReduceLROnPlateau does so itself)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and "learning_rate" not in logs:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


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


def restore(model, run_dir: Path) -> None:
    """Load the last epoch's weights and optimizer state into `model` (compiled)."""
    # The weights file holds the optimizer's slots too; Keras loads them only into a built
    # optimizer (and warns that it skipped them otherwise).
    model.optimizer.build(model.trainable_variables)
    model.load_weights(run_dir / "last.weights.h5")


def is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "resourceexhausted" in text or "out of memory" in text or "oom when allocating" in text


def resume_state(run_dir: Path, settings: dict, resume: bool) -> dict | None:
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


def training_callbacks(*, schedule, monitor, patience, run_dir, settings, state, epochs, steps, images, show_progress):
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
