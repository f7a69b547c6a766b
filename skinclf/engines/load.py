"""Choose and load an engine for a model path: Keras for `.keras`, ONNX Runtime for `.onnx` (auto: the light one)."""

from __future__ import annotations

from pathlib import Path

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
    is installed, else Keras. `threads`: ONNX Runtime intra-op threads (default: usable CPUs).
    """
    if engine not in ENGINES:
        raise SkinclfError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if batch_size < 1:
        raise SkinclfError(f"--batch-size {batch_size}: must be at least 1")
    if threads is not None and threads < 0:
        raise SkinclfError(f"--threads {threads}: must be at least 1 (0: one per usable CPU)")
    from skinclf.engines.onnx import OnnxEngine
    from skinclf.files import sha256_file
    from skinclf.model.onnx_meta import onnxruntime_available, session

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
    from skinclf.model.bundle import load_bundle

    return KerasEngine(load_bundle(path), batch_size=batch_size)
