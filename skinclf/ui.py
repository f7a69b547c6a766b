"""Terminal output shared by the library's long-running steps.

Progress goes to stderr (stdout may carry a CSV or JSON for scripts) and only when stderr is a
terminal, so logs and pipes stay clean.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

stderr = Console(stderr=True, highlight=False)


def progress(*, transient: bool = False, enabled: bool | None = None) -> Progress:
    """A progress display for counted work: bar, n/total, items per second and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr,
        transient=transient,
        disable=not (stderr.is_terminal if enabled is None else enabled),
    )


def download_progress(*, enabled: bool | None = None) -> Progress:
    """A progress display for bytes: size so far, speed and ETA when the total is known."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=not (stderr.is_terminal if enabled is None else enabled),
    )


def rate_text(count: int, seconds: float, unit: str = "img/s") -> str:
    """'123.4 img/s' or '' before there is anything to divide."""
    return f"{count / seconds:.1f} {unit}" if seconds > 0 and count else ""
