"""Finding every image below a folder, and reporting every place that could not be looked into.

No image is left out silently: linked folders (a clinic's archive mounted by a symbolic link)
are followed, each real folder once (so a link loop cannot hang a batch, and a folder reached
by two paths gives its images once), and every folder that cannot be listed, link that leads
nowhere, or entry that cannot be examined is returned as a `Problem`. Predict turns problems
into rows with an `error`, so `--strict` fails on them and the CSV shows what is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from skinclf.data.images import IMAGE_EXTENSIONS, is_image_file


@dataclass(frozen=True)
class Problem:
    """A place below the folder that could not be read: `path` is relative, POSIX style, and
    ends in '/' for a folder."""

    path: str
    reason: str


@dataclass
class Walk:
    """What a walk found: image files (relative POSIX paths, sorted) and problems (sorted)."""

    files: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: int = 0  # files passed over on purpose: hidden, or not an image by their extension
    skipped_examples: list[str] = field(default_factory=list)  # the first few, for the summary


def describe(exc: OSError) -> str:
    """A short lower-case reason for an OSError: 'permission denied', 'no such file or directory'."""
    return (exc.strerror or type(exc).__name__).lower()


def _relative(root: Path, path: str, *, folder: bool = False) -> str:
    rel = Path(path).relative_to(root).as_posix()
    return rel + "/" if folder and rel != "." else ("./" if folder else rel)


def _broken_link_may_hide_images(name: str) -> bool:
    """A dangling link is reported when it could have been an image or a folder of them."""
    suffix = Path(name).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or not suffix


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


class _Walker:
    def __init__(self, root: Path, recursive: bool) -> None:
        self.root, self.recursive = root, recursive
        self.visited: set[tuple[int, int]] = set()
        self.walk = Walk()

    def problem(self, path: str, reason: str, *, folder: bool = False) -> None:
        self.walk.problems.append(Problem(_relative(self.root, path, folder=folder), reason))

    def folder(self, path: str) -> None:
        try:
            info = os.stat(path)
        except OSError as exc:
            self.problem(path, f"cannot open folder: {describe(exc)}", folder=True)
            return
        if (info.st_dev, info.st_ino) in self.visited:
            return  # a link loop, or a folder already reached by another path: its images are listed once
        self.visited.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.problem(path, f"cannot list folder: {describe(exc)}", folder=True)
            return
        for entry in entries:
            if not entry.name.startswith("."):
                self.entry(entry)
            elif not _is_dir(entry):  # a hidden file: passed over, but counted
                self.skip(entry.path)

    def skip(self, path: str) -> None:
        self.walk.skipped += 1
        if len(self.walk.skipped_examples) < 3:
            self.walk.skipped_examples.append(_relative(self.root, path))

    def entry(self, entry: os.DirEntry) -> None:
        try:
            is_dir = entry.is_dir()  # follows links
            is_link = entry.is_symlink()
            is_file = entry.is_file()
        except OSError as exc:
            self.problem(entry.path, f"cannot examine: {describe(exc)}")
            return
        if is_dir:
            if self.recursive:
                self.folder(entry.path)
        elif is_link and not is_file and not os.path.exists(entry.path):
            if _broken_link_may_hide_images(entry.name):
                self.problem(entry.path, "broken link: its target does not exist")
        elif is_image_file(Path(entry.name)):
            if is_file and _own_picture(entry.path):  # an explain heat map: skinclf's output, never an input
                self.skip(entry.path)
            elif is_file:
                self.walk.files.append(_relative(self.root, entry.path))
            else:
                self.problem(entry.path, "not a regular file (a device, pipe or socket)")
        elif is_file and _has_dicom_preamble(entry.path):  # issue 32: a DICOM file without .dcm
            self.walk.files.append(_relative(self.root, entry.path))
        elif is_file:
            self.skip(entry.path)


def _has_dicom_preamble(path: str) -> bool:
    """Issue 32: a file of any name whose bytes 128-131 are DICM is a DICOM file (read 132 bytes)."""
    from skinclf.dicom.read import is_dicom

    return is_dicom(Path(path), name="")


def _own_picture(path: str) -> bool:
    """A PNG skinclf drew (explain's heat maps carry a "Software: skinclf" chunk): one of its
    own outputs, which no command takes as an input (`own_outputs`)."""
    if not path.lower().endswith(".png"):
        return False
    from skinclf.own_outputs import PNG, is_own_output

    return is_own_output(Path(path), PNG)


def walk_images(directory: Path, *, recursive: bool = True) -> Walk:
    """Every supported image below `directory` (hidden files and folders skipped), following
    linked folders once each, and every place that could not be read."""
    walker = _Walker(Path(directory), recursive)
    walker.folder(str(directory))
    walker.walk.files.sort()
    walker.walk.problems.sort(key=lambda p: p.path)
    return walker.walk
