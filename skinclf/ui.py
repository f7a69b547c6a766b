"""Terminal output shared by the library's long-running steps.

Progress goes to stderr (stdout may carry a CSV or JSON for scripts) and only when stderr is a
terminal, so logs and pipes stay clean.
"""

from __future__ import annotations

import unicodedata

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

# Characters that steer a terminal or reorder what it shows, beside the control characters (Cc:
# C0 with ESC and BEL, DEL, C1): bidirectional overrides and isolates, which can make a name read
# as another.
_BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _shown(ch: str) -> str:
    if ch not in _BIDI and unicodedata.category(ch) != "Cc":
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, lines: bool = False) -> str:
    """`text` safe to print on a terminal: every control character (ESC, BEL, CR, C1 ...) and
    bidirectional override shown escaped (`\\x1b`), so a file name, an image id or any other
    string a user or an upload supplied cannot retitle the window, move the cursor or hide text.
    `lines`: keep line breaks (a message of several lines); a name never has them.

    The one escaping function: everything skinclf prints about files and inputs goes through it
    (the CLI's errors, notes, summaries and per-file lines; the progress lines of the library)."""
    text = str(text)
    if lines:
        return "\n".join(printable(line) for line in text.split("\n"))
    if text.isprintable():
        return text
    return "".join(_shown(ch) for ch in text)


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
