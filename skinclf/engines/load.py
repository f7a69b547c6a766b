"""Choose and load an engine for a model path: Keras for `.keras`, ONNX Runtime for `.onnx` (auto: the light one)."""

from __future__ import annotations

import os
from pathlib import Path

from skinclf import ui
from skinclf.engines.base import ENGINES, Engine
from skinclf.engines.keras import KerasEngine, keras_available
from skinclf.errors import SkinclfError


def onnx_form(path: Path) -> Path:
    """Where a bundle's ONNX form lives: beside it, same name, `.onnx`."""
    return Path(path).with_suffix(".onnx")


def load_engine(path: Path, *, engine: str = "auto", batch_size: int = 16, threads: int | None = None) -> Engine:
    """Load the model at `path` with the runtime `engine` (auto, keras or onnx).

    auto: ONNX Runtime when the model has an ONNX form (a `.onnx` passed as `path`, or the
    `.onnx` beside the `.keras` whose metadata names this bundle's SHA-256) and onnxruntime
    is installed, else Keras (with a warning when that ONNX form cannot be loaded). `threads`:
    ONNX Runtime intra-op threads (default: usable CPUs). A model named by $SKINCLF_MODEL that
    cannot be loaded says so, since the user may not know the variable is set.
    """
    from skinclf.data.layout import MODEL_ENV

    from_env = os.environ.get(MODEL_ENV)
    try:
        return _load(Path(path), engine=engine, batch_size=batch_size, threads=threads)
    except SkinclfError as exc:
        if from_env and Path(from_env) == Path(path):
            raise SkinclfError(f"{MODEL_ENV}={from_env}: {exc} (unset {MODEL_ENV} to use the bundled model, or pass "
                               "--model)") from None
        raise


def _check_model_file(path: Path) -> None:
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".keras", ".onnx"))
        inside = f"; it holds {', '.join(found)}: pass one of them" if found else "; it holds no .keras or .onnx model"
        raise SkinclfError(f"model {path} is a folder, not a model file{inside}")
    if not path.is_file():
        raise SkinclfError(f"model file not found: {path}")


def _load(path: Path, *, engine: str, batch_size: int, threads: int | None) -> Engine:
    if engine not in ENGINES:
        raise SkinclfError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if batch_size < 1:
        raise SkinclfError(f"--batch-size {batch_size}: must be at least 1")
    if threads is not None and threads < 0:
        raise SkinclfError(f"--threads {threads}: must be at least 1 (0: one per usable CPU)")
    from skinclf.engines.onnx import OnnxEngine
    from skinclf.files import sha256_file
    from skinclf.model.onnx_meta import onnxruntime_available, session

    _check_model_file(path)
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
            try:
                onnx = OnnxEngine(candidate, batch_size=batch_size, threads=threads or None,
                                  sess=session(candidate, threads=threads or None), model_path=path)
            except SkinclfError as exc:  # corrupt or foreign: the .keras still works
                if engine == "onnx" or not keras_available():
                    raise
                ui.stderr.print(f"Warning: {exc}; using {path.name} with Keras instead (re-export it: {export})",
                                markup=False, highlight=False, soft_wrap=True)
                onnx, reason = None, f"{candidate.name} cannot be loaded"
            if onnx is not None and onnx.source_sha256 == sha256_file(path):
                return onnx
            if onnx is not None:
                reason = f"{candidate.name} was exported from another version of {path.name}"
        if engine == "onnx":
            raise SkinclfError(f"--engine onnx: {path} has no up-to-date ONNX form ({reason}); create it: {export}")
        if not keras_available():
            raise SkinclfError(f"{path} has no up-to-date ONNX form ({reason}) and TensorFlow is not installed: "
                               f'run `{export}` where it is, or pip install "skinclf[train]"')
    elif not keras_available():
        raise SkinclfError('--engine keras needs TensorFlow, which this install leaves out: '
                           'pip install "skinclf[train]" (or --engine onnx)')
    from skinclf.model.bundle import load_bundle

    return KerasEngine(load_bundle(path), batch_size=batch_size)
