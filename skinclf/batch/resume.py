"""What each row of a predict CSV was computed from, so `--resume` keeps only rows still right.

A row may be kept only if it was computed by the same model (SHA-256, and the ONNX file's when
ONNX Runtime ran it), with every option that changes a cell (top-k, all-probs, TTA, engine), from
the same folder, and from the same file (path relative to the folder, size, modification time in
nanoseconds). Anything else is reclassified, and the summary and the sidecar say how many and why.

Where the record lives:
- while a run is unfinished: `<out>.partial.json`, JSON lines beside `<out>.partial`: first the
  run (model, options, folder), then `[path, size, mtime_ns, sha256]` per row (records of
  earlier versions lack the SHA-256: read as before, and `--verify` redoes their rows), appended after the rows
  themselves, so a kill between the two leaves a row without a record, which is redone;
- once finished: the sidecar `<out>.json`, key `resume`: the run, the per-file map, and the
  SHA-256 of the CSV it describes. A sidecar that does not describe this very CSV (an edit, a
  kill between the rename and the sidecar) keeps no row.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from skinclf.files import sha256_file

# Run fields and how a change of each is reported.
_WHY = {"model": "another model", "onnx": "another ONNX form of the model", "engine": "another --engine", "top_k": "another --top-k",
        "all_probs": "another --all-probs", "tta": "another --tta", "directory": "another folder",
        "metadata": "another --metadata file (or none)"}
NO_RECORD = "no record of what they were computed from"
FILE_CHANGED = "file changed since (size or modification time)"
CONTENT_CHANGED = "file content changed since (SHA-256, --verify)"
NO_HASH = "no SHA-256 recorded to verify against (--verify)"
CHECKS = {False: "size and modification time", True: "size, modification time and SHA-256 of the content (--verify)"}

FileKey = list  # [size, mtime_ns] of a file now; a record adds its SHA-256: [size, mtime_ns, sha256]


def content_hash(path: Path) -> str | None:
    """SHA-256 of a file's bytes (None if it cannot be read: its row is then never kept by --verify)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def record_path(target: Path) -> Path:
    """Where the record of an unfinished run's rows goes (beside `<out>.partial`)."""
    return target.with_name(target.name + ".partial.json")


def file_key(path: Path) -> FileKey | None:
    """[size, mtime_ns] of a file; None if it cannot be stat'ed (its row is then never kept)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def run_record(*, identity: dict[str, Any], engine: str, top_k: int, all_probs: bool, tta: int,
               directory: Path, metadata: str = "") -> dict[str, Any]:
    """Everything run-wide that a row's cells depend on (`metadata`: the --metadata file's
    SHA-256, empty without one: an edited metadata file redoes every row)."""
    # An int8 and a float export of one bundle share the bundle's SHA-256: the ONNX file's tells them apart.
    return {"model": identity.get("sha256", ""), "onnx": identity.get("onnx_sha256", ""), "engine": engine, "top_k": top_k, "all_probs": all_probs, "tta": tta,
            "directory": str(Path(directory).resolve()), "metadata": metadata}


def read_partial_record(target: Path) -> tuple[dict | None, dict[str, FileKey]]:
    """The run and per-row keys recorded beside `<out>.partial` (None, {} when absent or unreadable)."""
    try:
        lines = record_path(target).read_bytes().split(b"\n")
        run = json.loads(lines[0])
    except (OSError, ValueError, IndexError):
        return None, {}
    keys: dict[str, FileKey] = {}
    for line in lines[1:]:
        try:
            path, *key = json.loads(line)  # [path, size, mtime_ns] or, since --verify, [..., sha256]
        except (ValueError, TypeError):
            continue  # an empty or torn last line: that row has no record and is redone
        if len(key) in (2, 3):
            keys[path] = key
    return (run if isinstance(run, dict) else None), keys


def read_finished_record(target: Path, sidecar: Path) -> tuple[dict | None, dict[str, FileKey]]:
    """The run and per-file keys of a finished CSV, from its sidecar, if it describes this very CSV."""
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8")).get("resume") or {}
        if record.get("csv_sha256") != sha256_file(target):
            return None, {}
        return record["run"], {k: list(v) for k, v in record["files"].items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None, {}


def still_valid(rows: list[list[str]], *, was: dict | None, keys: dict[str, FileKey], now: dict,
                current: dict[str, FileKey | None], verify: bool = False) -> tuple[list[list[str]], Counter]:
    """The rows that may be kept, and why the others (of files still in the folder) must be redone.
    `verify`: also re-hash each file and compare with the SHA-256 recorded with its row (an edit
    in place that kept the size and the modification time, e.g. `cp -p`, `rsync -t`)."""
    rows = [r for r in rows if r[0] in current]
    if was is None:
        return [], Counter({NO_RECORD: len(rows)}) if rows else Counter()
    changed = [field for field in _WHY if was.get(field, "" if field == "metadata" else None) != now.get(field, "")]
    if "engine" in changed and "onnx" in changed:  # Keras <-> ONNX Runtime: the ONNX file comes or goes
        changed.remove("onnx")
    changed = [_WHY[field] for field in changed]
    if changed:
        return [], Counter({", ".join(changed): len(rows)}) if rows else Counter()
    kept, redone = [], Counter()
    for r in rows:
        key = current[r[0]]
        why = _why_redone(r[0], keys.get(r[0]), key, verify=verify, directory=now.get("directory", ""))
        if why:
            redone[why] += 1
        else:
            kept.append(r)
    return kept, redone


def _why_redone(path: str, recorded: FileKey | None, key: FileKey | None, *, verify: bool, directory: str) -> str:
    """Why the row of `path` must be redone ('' if it may be kept)."""
    if recorded is None:
        return NO_RECORD
    if key is None or list(recorded[:2]) != list(key[:2]):
        return FILE_CHANGED
    if not verify:
        return ""
    if len(recorded) < 3:
        return NO_HASH
    return "" if content_hash(Path(directory) / path) == recorded[2] else CONTENT_CHANGED


class RowRecord:
    """The open `<out>.partial.json`: appended after each batch's rows are written."""

    def __init__(self, target: Path, run: dict, keys: dict[str, FileKey | None]) -> None:
        self.path = record_path(target)
        self.directory = Path(run.get("directory", "."))
        self.keys: dict[str, FileKey | None] = {}
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(run) + "\n")
        self.sink: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.add(keys)

    def add(self, keys: dict[str, FileKey | None]) -> None:
        """Record each row's file: its key and, unless already known, the SHA-256 `--verify` checks."""
        keys = {path: key if key is None or len(key) > 2 else [*key, content_hash(self.directory / path)]
                for path, key in keys.items()}
        lines = [json.dumps([path, *key]) + "\n" for path, key in keys.items() if key is not None]
        self.sink.writelines(lines)
        self.sink.flush()
        self.keys.update(keys)

    def close(self, *, remove: bool = False) -> None:
        self.sink.close()
        if remove:
            self.path.unlink(missing_ok=True)


def sidecar_record(*, target: Path, run: dict, keys: dict[str, FileKey | None], paths: list[str],
                   kept: int, redone: Counter, verify: bool = False) -> dict[str, Any]:
    """The sidecar's `resume` entry: what the finished CSV's rows were computed from."""
    return {"kept": kept, "check": CHECKS[verify], "redone": sum(redone.values()), "redone_why": dict(redone),
            "run": run, "csv_sha256": sha256_file(target),
            "files": {p: keys[p] for p in paths if keys.get(p) is not None}}


def redone_text(redone: Counter) -> str:
    """'3 rows redone (another --tta)': for the summary line."""
    count = sum(redone.values())
    why = "; ".join(f"{why}: {n}" if len(redone) > 1 else why for why, n in redone.items())
    return f"{count} {'row' if count == 1 else 'rows'} redone ({why})"
