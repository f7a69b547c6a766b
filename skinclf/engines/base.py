"""Runtimes behind one small interface: a batch of images in, logits and probabilities out.

predict, evaluate, serve and explain only ever hold an `Engine`; which runtime runs the
network (Keras on any backend, or ONNX Runtime) is chosen once by `load_engine`.

    engine = load_engine(model_path, engine="auto")
    probs = engine(images)          # (n, classes) probabilities, rows sum to 1
    logits = engine.logits(images)  # (n, classes) the final layer's logits (post-hoc shifts and
                                    # temperature included): softmax(logits) == probs

`images` is a float32 array (n, size, size, 3) of RGB values in 0..255, as `images.load_image`
returns them (preprocessing lives inside the model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from skinclf.bundle import ModelInfo
from skinclf.errors import SkinclfError

ENGINES = ("auto", "keras", "onnx")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype="float32")
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Engine(ModelInfo):
    """A loaded model and what it needs to be used; subclasses implement `_logits`."""

    name = "engine"

    def __init__(self, *, meta: dict[str, Any], path: Path, sha256: str, batch_size: int) -> None:
        self.meta = meta
        self.path = Path(path)
        self.sha256 = sha256
        self.batch_size = batch_size

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "engine": self.name}

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits for any number of images, run in batches of `batch_size` (padded to one shape)."""
        images = np.asarray(images, dtype="float32")
        parts = [self._padded(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)), dtype="float32")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.logits(images))

    def _padded(self, x: np.ndarray) -> np.ndarray:
        # One input shape only: a compiled function never retraces for the last, shorter batch.
        n = len(x)
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        return np.asarray(self._logits(x), dtype="float32")[:n]

    def _logits(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class KerasEngine(Engine):
    """The `.keras` bundle on the active Keras backend, batch norms folded, softmax split off."""

    name = "keras"

    def __init__(self, bundle, *, batch_size: int) -> None:
        super().__init__(meta=bundle.meta, path=bundle.path, sha256=bundle.sha256, batch_size=batch_size)
        from skinclf.inference import inference_model
        from skinclf.model import logits_model

        self.model = inference_model(logits_model(bundle.model), image_size=bundle.image_size)

    @classmethod
    def from_model(cls, model, *, batch_size: int, image_size: int | None = None,
                   meta: dict[str, Any] | None = None) -> "KerasEngine":
        """An engine around an in-memory Keras model (training's final validation, tests)."""
        from skinclf.model import Bundle

        n = int(model.outputs[0].shape[-1])
        size = image_size or int(model.inputs[0].shape[1])
        meta = meta or {"classes": [str(i) for i in range(n)], "input_size": [size, size]}
        return cls(Bundle(model=model, meta=meta, path=Path(f"{model.name}.keras")), batch_size=batch_size)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(x), dtype="float32")


def keras_available() -> bool:
    """Whether Keras and its backend (KERAS_BACKEND, default TensorFlow) can be imported."""
    import importlib.util
    import os

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    return all(importlib.util.find_spec(m) is not None for m in ("keras", backend))


def onnx_form(path: Path) -> Path:
    """Where a bundle's ONNX form lives: beside it, same name, `.onnx`."""
    return Path(path).with_suffix(".onnx")


def load_engine(path: Path, *, engine: str = "auto", batch_size: int = 16, threads: int | None = None) -> Engine:
    """Load the model at `path` with the runtime `engine` (auto, keras or onnx).

    auto: ONNX Runtime when the model has an ONNX form (a `.onnx` passed as `path`, or the
    `.onnx` beside the `.keras` whose metadata names this bundle's SHA-256) and onnxruntime
    is installed, else Keras. `threads`: ONNX Runtime intra-op threads (default: usable CPUs).
    """
    if engine not in ENGINES:
        raise SkinclfError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if batch_size < 1:
        raise SkinclfError(f"--batch-size {batch_size}: must be at least 1")
    if threads is not None and threads < 0:
        raise SkinclfError(f"--threads {threads}: must be at least 1 (0: one per usable CPU)")
    from skinclf.files import sha256_file
    from skinclf.onnx_engine import OnnxEngine, onnxruntime_available, session

    path = Path(path)
    if not path.is_file():
        raise SkinclfError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        if engine == "keras":
            raise SkinclfError(f"--engine keras runs a .keras bundle, not {path}: pass --model "
                               f"{path.with_suffix('.keras')} or --engine onnx")
        return OnnxEngine(path, batch_size=batch_size, threads=threads or None)
    export = f"skinclf export {path} --format onnx --out {onnx_form(path)}"
    if engine in ("auto", "onnx"):
        if engine == "onnx" and not onnxruntime_available():
            raise SkinclfError('--engine onnx needs ONNX Runtime, which is not installed: pip install onnxruntime '
                               '(or --engine keras)')
        candidate = onnx_form(path)
        if not candidate.is_file():
            reason = f"no {candidate.name} beside it"
        elif not onnxruntime_available():
            reason = "onnxruntime is not installed"
        else:
            onnx = OnnxEngine(candidate, batch_size=batch_size, threads=threads or None,
                              sess=session(candidate, threads=threads or None), model_path=path)
            if onnx.source_sha256 == sha256_file(path):
                return onnx
            reason = f"{candidate.name} was exported from another version of {path.name}"
        if engine == "onnx":
            raise SkinclfError(f"--engine onnx: {path} has no up-to-date ONNX form ({reason}); create it: {export}")
        if not keras_available():
            raise SkinclfError(f"{path} has no up-to-date ONNX form ({reason}) and TensorFlow is not installed: "
                               f'run `{export}` where it is, or pip install "skinclf[train]"')
    elif not keras_available():
        raise SkinclfError('--engine keras needs TensorFlow, which this install leaves out: '
                           'pip install "skinclf[train]" (or --engine onnx)')
    from skinclf.model import load_bundle

    return KerasEngine(load_bundle(path), batch_size=batch_size)
