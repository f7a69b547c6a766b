"""Writing the predict CSV through `<out>.partial`: starting, resuming, finishing, giving up.

Rows are appended to `<out>.partial` as batches finish; at the end it replaces `<out>` in one
rename. Every refusal names a command that works (`--resume` with the options the file was
written with, or `--overwrite`), and every check runs before `.partial` is created, so a
failed start never leaves a file that blocks the next run.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from skinclf.batch.results import header_options, read_csv, sidecar_path, write_csv
from skinclf.batch.resume import (
    FileKey,
    RowRecord,
    read_finished_record,
    read_partial_record,
    record_path,
    still_valid,
)
from skinclf.errors import SkinclfError
from skinclf.files import atomic_path


def partial_path(target: Path) -> Path:
    """Where the rows of an unfinished run go."""
    return target.with_name(target.name + ".partial")


def _read_lines(path: Path) -> list[list[str]]:
    """The CSV lines of `path`, without a torn last line (a kill in the middle of a write)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    try:
        return read_csv(data.decode("utf-8"))
    except (UnicodeDecodeError, csv.Error):
        return [[]]


def _write_lines(path: Path, lines: list[list[str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        write_csv(fh, lines)


def _options_text(options: dict) -> str:
    return f"--top-k {options['top_k']}" + (" --all-probs" if options["all_probs"] else "")


def _mismatch(source: Path, old: list[str], new: list[str], finished: bool) -> SkinclfError:
    """Why `source` cannot be continued with these options, and what to run instead."""
    start_over = "run without --resume to replace it" if finished else "pass --overwrite to start over"
    if not old or old[0] != "path" or "error" not in old:
        return SkinclfError(f"cannot resume {source}: it is not a CSV written by skinclf predict; {start_over}")
    if ("metadata" in old) != ("metadata" in new):  # the last column: a --metadata run's
        how = "with --metadata (its CSV has a metadata column); resume with --metadata and the same file" \
            if "metadata" in old else "without --metadata; resume without it"
        return SkinclfError(f"cannot resume {source}: it was written {how}, or {start_over}")
    was, now = header_options(old), header_options(new)
    if was["all_probs"] and now["all_probs"] and was["classes"] != now["classes"]:
        return SkinclfError(f"cannot resume {source}: it was written by a model with other classes "
                            f"({', '.join(was['classes'])}); resume with that --model, or {start_over}")
    if (was["top_k"], was["all_probs"]) != (now["top_k"], now["all_probs"]):
        written = _options_text(was) + ("" if was["all_probs"] else " (no --all-probs)")
        return SkinclfError(f"cannot resume {source}: it was written with {written}; resume with those options "
                            f"(--resume {_options_text(was)}), or {start_over}")
    return SkinclfError(f"cannot resume {source}: its columns ({', '.join(old)}) are not the ones this skinclf "
                        f"writes (an older version?); {start_over}")


@dataclass
class CsvOutput:
    """An open predict CSV: `done` holds the paths already written (when resuming), `redone` why
    rows of the earlier run were not kept; `record` notes what each row was computed from."""

    sink: TextIO
    partial: Path | None = None
    target: Path | None = None
    done: set[str] = field(default_factory=set)
    dropped: list[str] = field(default_factory=list)
    created: bool = False  # this run created the .partial file
    written: int = 0
    record: RowRecord | None = None
    files: dict[str, FileKey | None] = field(default_factory=dict)
    redone: Counter = field(default_factory=Counter)

    def write(self, rows: list[list[str]]) -> None:
        write_csv(self.sink, rows)
        self.sink.flush()
        self.written += len(rows)
        if self.record is not None:  # after the rows: a row without a record is redone, never the reverse
            self.record.add({r[0]: self.files.get(r[0]) for r in rows})

    def abandon(self) -> None:
        """Close after a failure; a `.partial` this run created and never wrote a row to is removed."""
        if self.partial is None:
            return
        self.sink.close()
        unused = self.created and not self.written
        if self.record is not None:
            self.record.close(remove=unused)
        if unused:
            self.partial.unlink(missing_ok=True)

    def finish(self) -> list[list[str]]:
        """Sort the rows by path, move `.partial` onto the target; returns the rows (header first).
        The record stays until `forget_record`, once the sidecar holds it."""
        if self.partial is None:
            return []
        os.fsync(self.sink.fileno())
        self.sink.close()
        if self.record is not None:
            self.record.close()
        lines = _read_lines(self.partial)
        rows = sorted(lines[1:], key=lambda r: r[0])
        if rows != lines[1:]:
            _write_lines(self.partial, [lines[0], *rows])
        os.replace(self.partial, self.target)
        return [lines[0], *rows]

    def forget_record(self) -> None:
        if self.record is not None:
            self.record.path.unlink(missing_ok=True)


def _resume_rows(target: Path, partial: Path, header: list[str], *, run: dict, files: dict[str, FileKey | None],
                 verify: bool = False) -> tuple[list[list[str]], list[str], Counter, dict[str, FileKey]]:
    """The rows to keep from an interrupted run (or a finished CSV), the paths dropped because
    they are no longer in the folder, and why other rows are redone (see `skinclf.batch.resume`).
    Raises, creating nothing, if the file does not fit."""
    source = partial if partial.exists() else target
    lines = _read_lines(source)
    if not lines or lines[0] != header:
        raise _mismatch(source, lines[0] if lines else [], header, finished=source == target)
    was, keys = read_partial_record(target) if source == partial else read_finished_record(target, sidecar_path(target))
    kept, redone = still_valid(lines[1:], was=was, keys=keys, now=run, current=files, verify=verify)
    return kept, sorted(r[0] for r in lines[1:] if r[0] not in files), redone, keys


def open_output(out: Path | None, header: list[str], *, resume: bool, overwrite: bool,
                files: dict[str, FileKey | None], run: dict, verify: bool = False) -> CsvOutput:
    """Open the CSV for this run (`out` None: stdout). `files` maps each file to classify to its
    key (`resume.file_key`) and `run` is `resume.run_record`. With `resume`, rows still valid
    for them are kept (rows of other paths are dropped and listed, stale rows are redone);
    `overwrite` discards an interrupted run's `.partial`."""
    if out is None:
        sink = CsvOutput(sink=sys.stdout)
        sink.write([header])
        return sink
    partial = partial_path(out)
    if overwrite:
        partial.unlink(missing_ok=True)
        record_path(out).unlink(missing_ok=True)
    rows: list[list[str]] = []
    dropped: list[str] = []
    redone: Counter = Counter()
    recorded: dict[str, FileKey] = {}
    if resume and (partial.exists() or out.exists()):
        created = not partial.exists()  # continuing a finished CSV: add new files
        rows, dropped, redone, recorded = _resume_rows(out, partial, header, run=run, files=files, verify=verify)
        _write_lines(partial, [header, *rows])  # also cuts a torn last line
    elif partial.exists():
        count = max(0, len(_read_lines(partial)) - 1)
        raise SkinclfError(f"{partial} holds {count} rows of an interrupted run: add --resume (with the options of "
                           "that run) to continue it, or --overwrite to start over")
    else:
        created = True
        _write_lines(partial, [header])
    # A kept row keeps its recorded SHA-256 (its file is unchanged): no file is hashed twice.
    record = RowRecord(out, run, {r[0]: recorded.get(r[0]) if len(recorded.get(r[0]) or ()) > 2 else files.get(r[0])
                                  for r in rows})
    sink = open(partial, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed by finish/abandon
    return CsvOutput(sink=sink, partial=partial, target=out, done={r[0] for r in rows}, dropped=dropped,
                     created=created, record=record, files=files, redone=redone)
