"""Choose and load an engine for a model path, from the registered engines (`engines.registry`).

A file one engine runs directly (an exported `.onnx`, or a suffix a new engine registers) goes
to that engine; a `.keras` bundle goes to ONNX Runtime when it has an up-to-date ONNX form beside
it (auto: the light one), else to Keras.
"""

from __future__ import annotations

import os
from pathlib import Path

from skinclf import ui
from skinclf.checks import at_least
from skinclf.engines import onnx as onnx_engine
from skinclf.engines.base import Engine
from skinclf.engines.keras import keras_available, load_keras_engine
from skinclf.engines.onnx import INT8
from skinclf.engines.registry import AUTO, engine_choices, engine_for, model_suffixes, registered
from skinclf.errors import SkinclfError
from skinclf.files import sha256_file


def onnx_form(path: Path) -> Path:
    """Where a bundle's ONNX form lives: beside it, same name, `.onnx`."""
    return Path(path).with_suffix(".onnx")


def int8_form(path: Path) -> Path:
    """Where a bundle's int8 ONNX form lives: beside it, `<name>.int8.onnx` (`skinclf export --format onnx-int8`)."""
    return Path(path).with_name(Path(path).stem + ".int8.onnx")


def engine_help() -> str:
    """`--engine`'s help, from the registered engines."""
    names = list(engine_choices()[1:])
    listed = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return (f"auto (ONNX Runtime on the bundle's int8 form where it was exported, else its float .onnx, else Keras; "
            f"a model file on its own engine), {listed} (onnx: the float form).")


def load_engine(path: Path | None = None, *, engine: str = AUTO, batch_size: int = 16,
                threads: int | None = None) -> Engine:
    """Load the model at `path` (None: $SKINCLF_MODEL, else the bundled model) with the runtime
    `engine` (auto, or a registered engine's name: keras, onnx, ...).

    auto: a file an engine runs directly goes to it; a `.keras` bundle goes to ONNX Runtime when
    it has an ONNX form (the `.onnx` beside it whose metadata names this bundle's SHA-256) and
    onnxruntime is installed, else to Keras (with a warning when that ONNX form cannot be
    loaded). `threads`: ONNX Runtime intra-op threads (default: usable CPUs). A model named by
    $SKINCLF_MODEL that cannot be loaded says so, since the user may not know the variable is set.
    """
    from skinclf.data.layout import MODEL_ENV, model_path

    path = model_path(path)
    from_env = os.environ.get(MODEL_ENV)
    try:
        return _load(path, engine=engine, batch_size=batch_size, threads=threads)
    except SkinclfError as exc:
        if from_env and Path(from_env) == path:
            raise SkinclfError(f"{MODEL_ENV}={from_env}: {exc} (unset {MODEL_ENV} to use the bundled model, or pass "
                               "--model)") from None
        raise


def _check_model_file(path: Path) -> None:
    if path.is_dir():
        suffixes = model_suffixes()
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in suffixes)
        inside = (f"; it holds {', '.join(found)}: pass one of them" if found
                  else f"; it holds no {' or '.join(suffixes)} model")
        raise SkinclfError(f"model {path} is a folder, not a model file{inside}")
    if not path.is_file():
        raise SkinclfError(f"model file not found: {path}")


def _check_options(engine: str, batch_size: int, threads: int | None) -> None:
    if engine not in engine_choices():
        raise SkinclfError(f"--engine {engine!r}: choose one of {', '.join(engine_choices())}")
    at_least("--batch-size", batch_size, 1)
    if threads is not None:
        at_least("--threads", threads, 0)  # 0: one per usable CPU


def _load(path: Path, *, engine: str, batch_size: int, threads: int | None) -> Engine:
    _check_options(engine, batch_size, threads)
    _check_model_file(path)
    spec = engine_for(path)
    if spec is not None and spec.name != "keras":  # a file of one engine's own (an exported .onnx, ...)
        if engine == "keras":
            raise SkinclfError(f"--engine keras runs a .keras bundle, not {path}: pass --model "
                               f"{path.with_suffix('.keras')} or --engine {spec.name}")
        if engine not in (AUTO, spec.name) and not (engine == INT8 and path.name.lower().endswith(".int8.onnx")):
            raise SkinclfError(f"--engine {engine} does not run {path} (a {path.suffix} file runs on "
                               f"--engine {spec.name})")
        return spec.load(path, batch_size=batch_size, threads=threads or None)
    if engine not in (AUTO, "keras", "onnx", INT8):
        raise SkinclfError(f"--engine {engine} does not run the bundle {path}: pass a "
                           f"{' or '.join(registered()[engine].suffixes)} model")
    return _load_bundle(path, engine=engine, batch_size=batch_size, threads=threads)


def _onnx_form(path: Path, candidate: Path, *, engine: str, batch_size: int, threads: int | None,
               export: str) -> tuple[Engine | None, str]:
    """The bundle's up-to-date ONNX form `candidate` on ONNX Runtime, or None and why not."""
    if not candidate.is_file():
        return None, f"no {candidate.name} beside it"
    if not onnx_engine.onnxruntime_available():
        return None, "onnxruntime is not installed"
    try:
        onnx = onnx_engine.load_onnx(candidate, batch_size=batch_size, threads=threads or None, model_path=path)
    except SkinclfError as exc:  # corrupt or foreign: the .keras still works
        if engine != AUTO or not keras_available():
            raise
        ui.stderr.print(ui.printable(f"Warning: {exc}; using {path.name} without {candidate.name} (re-export it: {export})"),
                        markup=False, highlight=False, soft_wrap=True)
        return None, f"{candidate.name} cannot be loaded"
    if onnx.source_sha256 == sha256_file(path):
        return onnx, ""
    return None, f"{candidate.name} was exported from another version of {path.name}"


def _load_bundle(path: Path, *, engine: str, batch_size: int, threads: int | None) -> Engine:
    """auto: the int8 form where it was exported (it is written only when it holds: `engines.int8`),
    else the float ONNX form, else Keras; onnx-int8, onnx, keras: that form or a one-line error."""
    forms = {INT8: (int8_form(path), "onnx-int8"), "onnx": (onnx_form(path), "onnx")}
    reasons = []
    for name in ((INT8, "onnx") if engine == AUTO else (engine,) if engine in forms else ()):
        candidate, fmt = forms[name]
        export = f"skinclf export {path} --format {fmt} --out {candidate}"
        if engine != AUTO and not onnx_engine.onnxruntime_available():
            raise SkinclfError(f'--engine {engine} needs ONNX Runtime, which is not installed: pip install onnxruntime '
                               '(or --engine keras)')
        onnx, reason = _onnx_form(path, candidate, engine=engine, batch_size=batch_size, threads=threads, export=export)
        if onnx is not None:
            return onnx
        if engine != AUTO:
            raise SkinclfError(f"--engine {engine}: {path} has no up-to-date {fmt} form ({reason}); create it: {export}")
        reasons.append(reason)
    if not keras_available():
        if engine == "keras":
            raise SkinclfError('--engine keras needs TensorFlow, which this install leaves out: '
                               'pip install "skinclf[train]" (or --engine onnx)')
        export = f"skinclf export {path} --format onnx --out {onnx_form(path)}"
        raise SkinclfError(f"{path} has no up-to-date ONNX form ({reasons[-1]}) and TensorFlow is not installed: "
                           f'run `{export}` where it is, or pip install "skinclf[train]"')
    return load_keras_engine(path, batch_size=batch_size)
