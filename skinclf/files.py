"""Small filesystem helpers: atomic writes, link-or-copy, hashing.

Every output skinclf writes (models, CSVs, reports, images) goes through `atomic_path` or
`atomic_write`, so an interrupted run leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from skinclf.errors import SkinclfError
from skinclf.own_outputs import MODEL, is_own_output, looks_like_model


def _default_mode() -> int:
    # mkstemp creates 0600 files; give outputs the mode any other new file would get.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The temporary name keeps the final suffix, since some writers (Keras, matplotlib) choose
    the format from it. On error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep every suffix (".weights.h5", ".keras"): some writers check the whole ending.
    suffixes = "".join(path.suffixes[-2:]) if path.name.endswith(".weights.h5") else path.suffix
    stem = path.name[: len(path.name) - len(suffixes)] if suffixes else path.name
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffixes}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link `src` to `dst` where the filesystem allows, else copy; returns 'link' or 'copy'.

    Hard links let a 6 GB dataset appear in several layouts without taking space twice. The
    copy goes through a temporary name so an interrupted copy never looks complete.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "link"
    except FileExistsError:
        raise
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return "copy"


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex SHA-256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _check_can_create_in(folder: Path, option: str, target: Path) -> None:
    """The folder that will hold `target` exists or can be made, and can be written in."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise SkinclfError(f"{option} {target}: {existing} is a file, so no folder can be made there; "
                           "choose another place")
    if not _writable(existing):
        raise SkinclfError(f"{option} {target}: cannot write in {existing} (permission denied); choose another place")


_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
            (stat.S_ISSOCK, "a socket"))


def check_not_special(path: Path, *, option: str = "--out") -> None:
    """Refuse an output path that exists and is not a regular file (a device, a pipe, a socket,
    or a link to one), whatever --overwrite says: replacing it would turn e.g. /dev/null into a
    file, and writing into it is never what a result file is for."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to /dev/null is /dev/null
    except OSError:
        return  # a new name (or a dangling link: replaced like a file)
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    what = next((name for test, name in _SPECIAL if test(mode)), "not a regular file")
    raise SkinclfError(f"{option} {path} is {what}, not a file: skinclf writes only regular files, even with "
                       "--overwrite; choose a file name")


def check_output_file(path: Path, *, option: str = "--out", example: str = "results.csv", kind: str | None = None,
                      overwrite: bool = False) -> None:
    """Refuse, before any work, an output file that could not be written (the path is a folder,
    or its folder can neither be made nor written in) or must not be: a device, pipe or socket
    (`check_not_special`), or an existing file that is not this command's own earlier output of
    `kind` (see `check_replace`)."""
    path = Path(path)
    if path.is_dir():
        raise SkinclfError(f"{option} {path} is a folder: give a file name, e.g. {option} {path / example}")
    check_not_special(path, option=option)
    _check_can_create_in(path.parent, option, path)
    if kind is not None:
        check_replace(path, kind=kind, overwrite=overwrite, option=option)


def check_replace(path: Path, *, kind: str, overwrite: bool, option: str = "--out") -> None:
    """Refuse to replace an existing file unless it is this command's own earlier output of
    `kind` or `overwrite` says so. Called before any work, so nothing is lost and no time wasted."""
    path = Path(path)
    check_not_special(path, option=option)
    if overwrite or not (path.exists() or path.is_symlink()) or is_own_output(path, kind):
        return
    if kind == MODEL:
        what = "a model" if looks_like_model(path) else "not a model (by its content, whatever its name)"
    else:
        what = f"not a {kind} written by skinclf"
    raise SkinclfError(f"{option} {path} already exists and is {what}: refusing to replace it; choose another "
                       f"path, or add --overwrite to replace it")


def check_output_files(folder: Path, names: dict[str, str], *, overwrite: bool, option: str = "--out") -> None:
    """`check_replace` for the files (name -> kind) a command writes into an output folder."""
    for name, kind in names.items():
        check_replace(Path(folder) / name, kind=kind, overwrite=overwrite, option=option)


@contextlib.contextmanager
def new_folders(path: Path) -> Iterator[Path]:
    """Make the folder `path` (and missing parents); if the block fails, the folders it made are
    removed again where they are still empty, so a failed run leaves no empty folder behind."""
    path = Path(path)
    made: list[Path] = []
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        made.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in made:  # innermost first
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): keep it and everything above it
                break
        raise


def check_output_dir(path: Path, *, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file or cannot be made or written in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SkinclfError(f"{option} {path} is a file, not a folder: choose a folder (it is created if missing)")
    _check_can_create_in(path, option, path)
