"""The engines a model can run on, each registered by its own module (timm's `@register_model`).

An engine module decorates its loader with `register_engine`, naming the engine, the model file
suffixes it runs directly, the extra that installs it and whether it is installed now;
`load.load_engine` and the CLI's `--engine` help read this table, so a new engine (OpenVINO,
TensorRT, CoreML) is one new module plus one import in `engines/load.py`.

    @register_engine("onnx", suffixes=(".onnx",), extra='pip install "skinclf"', available=...)
    def load_onnx(path, *, batch_size, threads, model_path=None) -> Engine: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"  # not an engine: the lightest installed one that runs the model


@dataclass(frozen=True)
class EngineSpec:
    """A registered engine: `load(path, *, batch_size, threads, model_path=None) -> Engine`."""

    name: str
    load: Callable
    suffixes: tuple[str, ...]
    extra: str
    available: Callable[[], bool]

    def runs(self, path: Path) -> bool:
        """Whether `path` is a file this engine runs directly (by its suffix)."""
        return Path(path).suffix.lower() in self.suffixes


_ENGINES: dict[str, EngineSpec] = {}


def register_engine(name: str, *, suffixes: tuple[str, ...], extra: str,
                    available: Callable[[], bool] = lambda: True) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated loader as engine `name` (a second registration replaces the first)."""
    if name == AUTO:
        raise ValueError(f"{AUTO!r} is not an engine name")

    def register(load: Callable) -> Callable:
        _ENGINES[name] = EngineSpec(name=name, load=load, suffixes=tuple(s.lower() for s in suffixes), extra=extra,
                                    available=available)
        return load

    return register


def unregister_engine(name: str) -> None:
    """Remove engine `name` (tests that register one of their own)."""
    _ENGINES.pop(name, None)


def registered() -> dict[str, EngineSpec]:
    """The registered engines by name, sorted."""
    return {name: _ENGINES[name] for name in sorted(_ENGINES)}


def engine_choices() -> tuple[str, ...]:
    """What `--engine` accepts: auto, then every registered engine."""
    return (AUTO, *registered())


def model_suffixes() -> tuple[str, ...]:
    """Every model file suffix some engine runs, sorted."""
    return tuple(sorted({s for spec in _ENGINES.values() for s in spec.suffixes}))


def engine_for(path: Path) -> EngineSpec | None:
    """The engine that runs `path` directly, by its suffix (None: no engine does)."""
    return next((spec for spec in registered().values() if spec.runs(path)), None)
