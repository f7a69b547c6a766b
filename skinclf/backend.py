"""Importing Keras quietly and asking the active backend about accelerators.

Everything that touches a model is written against `import keras`, so it runs unchanged with
KERAS_BACKEND=tensorflow (the default), torch or jax. This module holds the few lines that must
know which backend is active: TensorFlow prints C++ log lines to stderr when it is imported
and when it first looks for GPUs, which would clutter every `skinclf predict`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

from skinclf.errors import SkinclfError

_keras: ModuleType | None = None


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (C++ logging bypasses Python's sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _without_matplotlib() -> Iterator[None]:
    """Keras imports matplotlib.pyplot if it can (for a plotting helper skinclf never calls), and
    that import writes ~/.config/matplotlib and a font cache under ~/.cache: hide matplotlib
    while Keras is imported, so predict and serve leave nothing in the user's home. Commands
    that draw import it themselves later, and a process that already has it keeps it."""
    if "matplotlib" in sys.modules:
        yield
        return
    sys.modules["matplotlib"] = None  # type: ignore[assignment]  # `import matplotlib` -> ImportError
    try:
        yield
    finally:
        if sys.modules.get("matplotlib", 0) is None:
            del sys.modules["matplotlib"]


def load_keras() -> ModuleType:
    """Import and return `keras`, with its backend initialised and its start-up noise hidden."""
    global _keras
    if _keras is not None:
        return _keras
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with _quiet_fd2(), _without_matplotlib():
            import keras

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.get_logger().setLevel("ERROR")
                tf.config.list_physical_devices()  # device discovery logs now, while quiet
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("keras", "tensorflow", "torch", "jax"):
            raise  # not installed (the light install): the CLI names the extra that brings it
        raise SkinclfError(f"cannot import Keras and its backend ({exc}); reinstall skinclf") from None
    except ImportError as exc:
        raise SkinclfError(f"cannot import Keras and its backend ({exc}); reinstall skinclf") from None
    _keras = keras
    return keras


def accelerator() -> str | None:
    """A short description of the GPU the active backend will use, or None on CPU."""
    keras = load_keras()
    name = keras.backend.backend()
    try:
        if name == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return f"{len(gpus)} GPU(s) via TensorFlow" if gpus else None
        if name == "torch":
            import torch

            return f"{torch.cuda.get_device_name(0)} via PyTorch" if torch.cuda.is_available() else None
        if name == "jax":
            import jax

            gpus = [d for d in jax.devices() if d.platform == "gpu"]
            return f"{gpus[0].device_kind} via JAX" if gpus else None
    except Exception:  # noqa: BLE001 - a failed probe means no usable accelerator
        return None
    return None


def versions() -> dict[str, str]:
    """Versions of the pieces a trained model depends on, for its metadata."""
    import numpy
    import PIL

    from skinclf import __version__

    keras = load_keras()
    out = {
        "skinclf": __version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "python": sys.version.split()[0],
    }
    backend_module = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}.get(out["backend"])
    if backend_module:
        with contextlib.suppress(Exception):
            out[backend_module] = __import__(backend_module).__version__
    return out
