"""Checks of numeric command options, run before any work so a bad value is one line, not a
traceback (or a half-written output) minutes later."""

from __future__ import annotations

from collections.abc import Sequence

from skinclf.errors import SkinclfError


def at_least(option: str, value: float, minimum: float, *, example: float | None = None) -> None:
    """`value` of `option` must be `minimum` or more."""
    if value < minimum:
        hint = f", e.g. {option} {example}" if example is not None else ""
        raise SkinclfError(f"{option} {value}: must be at least {minimum:g}{hint}")


def positive(option: str, value: float) -> None:
    """`value` of `option` must be above 0."""
    if not value > 0:
        raise SkinclfError(f"{option} {value}: must be positive")


def one_of(option: str, value: object, choices: Sequence[object]) -> None:
    """`value` of `option` must be one of `choices`."""
    if value not in choices:
        raise SkinclfError(f"{option} {value}: choose one of {', '.join(map(str, choices))}")
