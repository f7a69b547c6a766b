"""Distillation: one MobileNetV2 student trained on the teacher's logits over cached views (Hinton et al. 2015).

Loss T^2 KL(teacher_T || student_T) mixed with class-weighted cross-entropy; weight EMA; resumable per epoch.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinclf import ui
from skinclf.backend import load_keras, versions
from skinclf.data.images import load_image
from skinclf.data.layout import list_labelled_images
from skinclf.errors import SkinclfError
from skinclf.evaluation.seen import split_image_ids
from skinclf.files import atomic_path, atomic_write_json, sha256_file
from skinclf.metrics import classification_report
from skinclf.model.bundle import save_bundle
from skinclf.model.mobilenet_v2 import build_student
from skinclf.model.network import PREPROCESSING
from skinclf.model.posthoc import balanced_accuracy, fit_prior_tau, logits_from_probs
from skinclf.parallel import in_background
from skinclf.training.callbacks import restore, write_history_csv
from skinclf.training.loader import _LabelledBatches
from skinclf.training.posthoc_fit import class_weights, post_hoc
from skinclf.training.views import open_views

keras = load_keras()
ops = keras.ops
MEL = "mel"
MEL_WEIGHTS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 18
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    kd_temperature: float = 2.0
    kd_alpha: float = 0.7  # share of the distillation term; the rest is the labels' cross-entropy
    class_weight: str = "sqrt"
    ema_momentum: float = 0.998
    dropout: float = 0.25
    colour_constancy: bool = True
    seed: int = 42
    image_size: int = 224  # validation and bundle side (the views set the training side)
    views: int = 4
    decision_weight: str = "none"


def distillation_loss(num_classes: int, temperature: float, alpha: float):
    """Per-image loss of (y_true, probabilities); y_true rows are [one-hot label, teacher logits, class weight].

    alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) w CE(label, softmax(s)), s = log p."""
    c = num_classes

    def loss(y_true, y_pred):
        onehot, teacher, weight = y_true[:, :c], y_true[:, c : 2 * c], y_true[:, 2 * c]
        s = ops.log(ops.clip(y_pred, 1e-7, 1.0))
        log_pt = ops.log_softmax(teacher / temperature, axis=-1)
        kl = ops.sum(ops.exp(log_pt) * (log_pt - ops.log_softmax(s / temperature, axis=-1)), axis=-1)
        ce = -ops.sum(onehot * ops.log_softmax(s, axis=-1), axis=-1)
        return alpha * temperature**2 * kl + (1.0 - alpha) * weight * ce

    return loss


class ViewBatches(_LabelledBatches):
    """Each epoch shows every training image through one of its K cached views (picked with (seed, epoch)),
    with that view's teacher logits and the image's class weight packed into y_true."""

    def __init__(self, images, logits, labels, *, class_weight, num_classes, batch_size, seed, epoch) -> None:
        self.images, self.logits = list(images), list(logits)
        self.class_weight = np.asarray(class_weight, dtype="float32")
        super().__init__(labels, num_classes=num_classes, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                         sample_weights=None)

    def _new_epoch(self) -> None:
        super()._new_epoch()
        self._view = np.random.default_rng([self.seed, self.epoch, 2]).integers(0, len(self.images), len(self.labels))

    def __getitem__(self, batch: int):
        idx = self._order[batch * self.batch_size : (batch + 1) * self.batch_size]
        x = np.stack([self.images[self._view[i]][i] for i in idx]).astype("float32")
        t = np.stack([self.logits[self._view[i]][i] for i in idx]).astype("float32")
        labels = self.labels[idx]
        y = np.concatenate([np.eye(self.num_classes, dtype="float32")[labels], t, self.class_weight[labels][:, None]],
                           axis=1)
        return x, y


def _optimizer(config: DistillConfig, steps: int):
    warmup = config.warmup_epochs * steps
    rate = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.lr / 100 if warmup else config.lr,
        decay_steps=max(1, (config.epochs - config.warmup_epochs) * steps),
        warmup_target=config.lr if warmup else None, warmup_steps=warmup)
    return keras.optimizers.AdamW(rate, weight_decay=config.weight_decay, use_ema=True,
                                  ema_momentum=config.ema_momentum)


def swap_ema(model) -> None:
    """Exchange the model's trainable weights with the optimizer's moving averages (twice: back)."""
    averages = model.optimizer._model_variables_moving_average
    for var, avg in zip(model.trainable_variables, averages):
        value = ops.convert_to_numpy(var)
        var.assign(avg)
        avg.assign(value)


def scores(probs: np.ndarray, labels: np.ndarray, classes: list[str], prior: np.ndarray) -> dict[str, float]:
    """Balanced accuracy and melanoma recall: raw, after a prior correction fitted here, and at the
    smallest melanoma decision weight (of MEL_WEIGHTS) that reaches melanoma recall 0.80 (diagnostics)."""
    mel = classes.index(MEL) if MEL in classes else 0
    pred = probs.argmax(1)
    tau, bal_tau = fit_prior_tau(probs, labels, prior)
    z = logits_from_probs(probs) - tau * np.log(prior)
    row = {"val_balanced_accuracy": balanced_accuracy(labels, pred, len(classes)),
           "val_mel_recall": float(np.mean(pred[labels == mel] == mel)), "val_tau": tau,
           "val_balanced_accuracy_tau": bal_tau,
           "val_mel_recall_tau": float(np.mean(z.argmax(1)[labels == mel] == mel)),
           "val_mel_weight_80": float("nan"), "val_balanced_accuracy_mel80": float("nan")}
    for w in MEL_WEIGHTS:
        shifted = z.copy()
        shifted[:, mel] += np.log(w)
        p = shifted.argmax(1)
        if np.mean(p[labels == mel] == mel) >= 0.8:
            row.update(val_mel_weight_80=w, val_balanced_accuracy_mel80=balanced_accuracy(labels, p, len(classes)))
            break
    return row


class DistillState(keras.callbacks.Callback):
    """After each epoch: validate the EMA weights at full size, keep the best, write what --resume needs."""

    def __init__(self, run_dir: Path, *, settings: dict, state: dict, val_images, val_labels, classes, prior,
                 stop_after: int | None) -> None:
        super().__init__()
        self.run_dir, self.settings, self.state = run_dir, settings, state
        self.val_images, self.val_labels, self.classes, self.prior = val_images, val_labels, classes, prior
        self.stop_after = stop_after

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()
        for layer in self.model.layers:  # dropout draws keyed by (seed, epoch), as in `skinclf train`
            generator = getattr(layer, "seed_generator", None)
            if generator is not None:
                generator.state.assign(np.array([self.settings["seed"], epoch], dtype=generator.state.dtype))

    def on_epoch_end(self, epoch, logs=None):
        swap_ema(self.model)
        probs = predict(self.model, self.val_images)
        row = {"epoch": epoch + 1, "loss": float(logs["loss"]),
               "learning_rate": float(ops.convert_to_numpy(self.model.optimizer.learning_rate)),
               **scores(probs, self.val_labels, self.classes, self.prior)}
        if self.state["best"] is None or row["val_balanced_accuracy"] > self.state["best"]:
            self.state["best"], self.state["best_epoch"] = row["val_balanced_accuracy"], epoch + 1
            with atomic_path(self.run_dir / "best.weights.h5") as tmp:
                self.model.save_weights(tmp)  # the EMA weights
        swap_ema(self.model)
        with atomic_path(self.run_dir / "last.weights.h5") as tmp:
            self.model.save_weights(tmp)  # raw weights and the optimizer, EMA included
        seconds = time.perf_counter() - self.t0
        self.state["history"].append(row)
        self.state["epoch"] = epoch + 1
        self.state["seconds"] = self.state.get("seconds", 0.0) + seconds
        write_history_csv(self.run_dir / "history.csv", self.state["history"])
        atomic_write_json(self.run_dir / "state.json", {"settings": self.settings, **self.state})
        ui.stderr.print(f"Epoch {epoch + 1}/{self.settings['epochs']}  loss {row['loss']:.4f}  EMA val: balanced "
                        f"accuracy {row['val_balanced_accuracy']:.3f}, mel recall {row['val_mel_recall']:.3f}; with "
                        f"prior tau {row['val_tau']:.2f}: {row['val_balanced_accuracy_tau']:.3f} / "
                        f"{row['val_mel_recall_tau']:.3f}; at mel recall 0.80 (mel x {row['val_mel_weight_80']}): "
                        f"{row['val_balanced_accuracy_mel80']:.3f}  ({seconds:.0f}s)", soft_wrap=True)
        if self.stop_after is not None and epoch + 1 >= self.stop_after:
            self.model.stop_training = True


def predict(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([np.asarray(model.predict_on_batch(np.asarray(images[i : i + batch_size], "float32")))
                           for i in range(0, len(images), batch_size)])


def _val_images(paths, size: int, workers: int) -> np.ndarray:
    return np.stack(list(in_background([lambda p=p: load_image(p, size) for p in paths], workers=workers)))


def _fingerprint(data: Path) -> str | None:
    manifest = data / "prepare.json"
    return json.loads(manifest.read_text(encoding="utf-8"))["fingerprint"] if manifest.is_file() else None


def _resume_state(run_dir: Path, settings: dict, resume: bool) -> dict | None:
    state_file = run_dir / "state.json"
    if not resume:
        if state_file.is_file():
            raise SkinclfError(f"{run_dir} holds an earlier run: add --resume to continue it, or choose another folder")
        return None
    if not state_file.is_file():
        raise SkinclfError(f"nothing to resume in {run_dir} (no state.json); start without --resume")
    saved = json.loads(state_file.read_text(encoding="utf-8"))
    changed = [k for k in settings if saved["settings"].get(k) != settings[k]]
    if changed:
        raise SkinclfError(f"cannot resume {run_dir}: settings differ ({', '.join(changed)})")
    return {k: v for k, v in saved.items() if k != "settings"}


def distill(*, data: Path, views_dir: Path, run_dir: Path, out: Path, weights: str | Path | None, config: DistillConfig,
            workers: int = 2, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Train the student on the cached views, select its best EMA epoch on validation, fit the
    post-hoc steps there and save a bundle at `out`; returns the bundle's metadata.

    `stop_after` ends this session after that epoch (the run resumes with `resume`)."""
    data, run_dir, out = Path(data), Path(run_dir), Path(out)
    train_set = list_labelled_images(data / "train")
    val_set = list_labelled_images(data / "val", classes=train_set.classes)
    classes = list(train_set.classes)
    images, logits, record = open_views(views_dir, config.views)
    if len(images[0]) != len(train_set.paths) or record["teacher"].get("sha256") is None:
        raise SkinclfError(f"view cache {views_dir} was built for other training images")
    weight_of = class_weights(config.class_weight, train_set.counts())
    weights_id = sha256_file(Path(weights)) if weights is not None else None
    # The decision weight is applied after training: a finished run re-bundles with another (--resume).
    settings = {**{k: v for k, v in asdict(config).items() if k != "decision_weight"}, "data": str(data.resolve()),
                "views_key": record["key"], "weights": weights_id, "classes": classes,
                "train_size": int(images[0].shape[1])}
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _resume_state(run_dir, settings, resume) or {"epoch": 0, "best": None, "best_epoch": None, "history": []}
    keras.utils.set_random_seed(config.seed)
    model = build_student(num_classes=len(classes), image_size=None, weights=weights, dropout=config.dropout,
                          seed=config.seed, colour_constancy=config.colour_constancy)
    steps = math.ceil(len(train_set.paths) / config.batch_size)
    model.compile(optimizer=_optimizer(config, steps),
                  loss=distillation_loss(len(classes), config.kd_temperature, config.kd_alpha))
    if state["epoch"]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # Keras only warns when it skips the optimizer's state
            restore(model, run_dir)
    prior = np.array([train_set.counts()[c] for c in classes], dtype="float64")
    prior /= prior.sum()
    val_labels = np.asarray(val_set.labels)
    val_images = _val_images(val_set.paths, config.image_size, workers)
    if state["epoch"] < config.epochs and (stop_after is None or state["epoch"] < stop_after):
        ui.stderr.print(f"Distilling into MobileNetV2: {len(train_set.paths)} images x {config.views} views at "
                        f"{settings['train_size']}px, validating {len(val_labels)} at {config.image_size}px"
                        + (f"; resuming after epoch {state['epoch']}" if state["epoch"] else ""), soft_wrap=True)
        batches = ViewBatches(images, logits, train_set.labels, class_weight=[weight_of[c] for c in classes],
                              num_classes=len(classes), batch_size=config.batch_size, seed=config.seed,
                              epoch=state["epoch"])
        callback = DistillState(run_dir, settings=settings, state=state, val_images=val_images, val_labels=val_labels,
                                classes=classes, prior=prior, stop_after=stop_after)
        model.fit(batches, epochs=config.epochs, initial_epoch=state["epoch"], callbacks=[callback], verbose=0,
                  shuffle=False)
    if state["epoch"] < config.epochs:
        return {}
    return _bundle(run_dir, out, weights=weights, config=config, settings=settings, state=state, record=record,
                   train_set=train_set, val_set=val_set, val_images=val_images, weight_of=weight_of)


def _bundle(run_dir, out, *, weights, config, settings, state, record, train_set, val_set, val_images, weight_of):
    """The best EMA epoch at the full size, its post-hoc steps fitted on validation, saved as a bundle."""
    classes = settings["classes"]
    model = build_student(num_classes=len(classes), image_size=config.image_size, weights=None,
                          dropout=config.dropout, colour_constancy=config.colour_constancy)
    model.load_weights(run_dir / "best.weights.h5")
    labels = np.asarray(val_set.labels)
    decision_of = class_weights(config.decision_weight, dict.fromkeys(classes, 1), option="--decision-weight")
    probs, fitted = post_hoc(model, predict(model, val_images), labels, classes=classes,
                             prior_counts=train_set.counts(), decision_of=decision_of, prior_correction="fit",
                             calibrate=True)
    report = classification_report(labels, probs, classes)
    report.get("melanoma", {}).pop("roc", None)
    meta = {"name": out.stem, "classes": classes, "input_size": [config.image_size, config.image_size],
            "preprocessing": {**PREPROCESSING, **({"colour_constancy": "Shades of Gray, p = 6"}
                                                  if config.colour_constancy else {})},
            "architecture": {"base": "MobileNetV2", "alpha": 1.0, "head": "global average pool, dropout, dense softmax",
                             "dropout": config.dropout, "colour_constancy": config.colour_constancy,
                             "batch_norm": "frozen (folded into the ImageNet weights)"},
            "training": {**settings, "decision_weight": config.decision_weight, "kind": "distillation",
                         "teacher": record["teacher"], "views": record["spec"],
                         "class_weights": weight_of, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
                         "ema": "the saved weights are the optimizer's moving averages", "seconds": state["seconds"]},
            "post_hoc": fitted,
            "calibration": {"temperature": fitted["temperature"], "fitted_on": "validation split",
                            "validation_before": fitted["validation_before"],
                            "validation_after": fitted["validation_after"]},
            "data": {"path": settings["data"], "fingerprint": _fingerprint(Path(settings["data"])),
                     "train_counts": train_set.counts(), "val_counts": val_set.counts(),
                     **split_image_ids(train_set.paths, val_set.paths)},
            "metrics": {"validation": report}, "history": state["history"], "versions": versions(),
            "intended_use": "Decision support on dermoscopic images for clinicians; not a diagnosis; "
                            "not for smartphone photographs."}
    save_bundle(model, out, meta)
    return meta
