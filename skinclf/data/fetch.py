"""`skinclf fetch`: get HAM10000 into the Kaggle layout, from Kaggle or from a local copy.

The layout (what `prepare` reads):

    DEST/HAM10000_metadata.csv
    DEST/HAM10000_images_part_1/ISIC_*.jpg
    DEST/HAM10000_images_part_2/ISIC_*.jpg

The Kaggle archive also holds lower-case duplicates of the image folders and hmnist_*.csv
files; they are skipped. Nothing is uploaded anywhere: the Kaggle path only downloads.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from skinclf import ui
from skinclf.config import FETCH
from skinclf.data.images import ImageError, load_image
from skinclf.data.layout import IMAGE_DIRS, METADATA_FILE, read_metadata
from skinclf.errors import SkinclfError
from skinclf.files import atomic_path, check_output_dir, link_or_copy, new_folders

KAGGLE_URL = "https://www.kaggle.com/datasets/{dataset}"
_DOWNLOAD_DIR = ".download"


@dataclass(frozen=True)
class FetchResult:
    """What a fetch did: where the data is and how much of it was new."""

    dest: Path
    source: str
    images: int
    added: int
    already_present: int
    verified: bool


def layout_path(member: str) -> str | None:
    """Map a path inside an archive or folder to its place in the layout, or None to skip it.

    `HAM10000_metadata.csv` and `HAM10000_images_part_{1,2}/*.jpg` are kept wherever they sit
    in the source (some copies nest them one folder down); everything else is skipped,
    including the Kaggle archive's lower-case duplicate folders.
    """
    parts = PurePosixPath(member.replace("\\", "/")).parts
    if not parts or parts[-1].startswith("."):
        return None
    name = parts[-1]
    if name == METADATA_FILE:
        return METADATA_FILE
    if len(parts) >= 2 and parts[-2] in IMAGE_DIRS and name.lower().endswith(".jpg"):
        return f"{parts[-2]}/{name}"
    return None


def _check_member_name(name: str, archive: Path) -> None:
    """Refuse archive members that would land outside the destination (zip-slip)."""
    normalized = name.replace("\\", "/")
    parts = PurePosixPath(normalized).parts
    if normalized.startswith("/") or ".." in parts or (parts and parts[0].endswith(":")):
        raise SkinclfError(
            f"refusing to extract {archive}: member {name!r} would be written outside the "
            "destination folder (unsafe archive)"
        )


def _inside(dest: Path, rel: str) -> Path:
    target = (dest / rel).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise SkinclfError(f"refusing to write {rel!r}: outside {dest}")
    return target


def _import_folder(source: Path, dest: Path, bar: Callable[[int], None]) -> tuple[int, int]:
    """Link or copy the layout's files from a folder; returns (added, already present)."""
    added = present = 0
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            src = Path(dirpath) / filename
            rel = layout_path(src.relative_to(source).as_posix())
            if rel is None:
                continue
            target = _inside(dest, rel)
            if target.exists() and target.stat().st_size == src.stat().st_size:
                present += 1
            else:
                target.unlink(missing_ok=True)
                link_or_copy(src, target)
                added += 1
            bar(1)
    return added, present


def _import_zip(archive: Path, dest: Path, bar: Callable[[int], None], *, downloaded: bool = False) -> tuple[int, int]:
    """Extract the layout's files from a zip archive; returns (added, already present).

    A corrupt archive that skinclf downloaded itself is removed (the next fetch downloads it
    again); the user's own archive (`--from`) is never touched."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:  # check every name before writing anything
                _check_member_name(info.filename, archive)
            added = present = 0
            for info in members:
                rel = layout_path(info.filename)
                if rel is None or info.is_dir():
                    continue
                target = _inside(dest, rel)
                if target.exists() and target.stat().st_size == info.file_size:
                    present += 1
                else:
                    with atomic_path(target) as tmp, zf.open(info) as src, open(tmp, "wb") as out:
                        while block := src.read(1 << 20):
                            out.write(block)
                    added += 1
                bar(1)
            return added, present
    except (zipfile.BadZipFile, EOFError) as exc:
        reason = exc or "unexpected end of data"
        if downloaded:
            archive.unlink(missing_ok=True)
            raise SkinclfError(f"the downloaded {archive.name} is truncated or corrupt ({reason}); it was removed: "
                               "run `skinclf fetch` again") from None
        raise SkinclfError(f"--from {archive} is truncated or corrupt ({reason}); copy or download the archive "
                           "again and pass the new copy to --from (or --from an unpacked folder)") from None
    except OSError as exc:
        raise SkinclfError(f"cannot extract {archive}: {exc}") from None


def import_local(source: Path, dest: Path, *, show_progress: bool | None = None,
                 downloaded: bool = False) -> tuple[int, int]:
    """Bring a local HAM10000 copy (folder or .zip) into `dest`; returns (added, already present)."""
    source = Path(source)
    if not source.exists():
        raise SkinclfError(f"--from {source}: no such file or folder")
    dest.mkdir(parents=True, exist_ok=True)
    with ui.progress(enabled=show_progress) as progress:
        task = progress.add_task("Importing", total=None, rate="")
        advance = lambda n: progress.advance(task, n)  # noqa: E731
        if source.is_dir():
            added, present = _import_folder(source, dest, advance)
        elif zipfile.is_zipfile(source) or source.suffix.lower() == ".zip":
            added, present = _import_zip(source, dest, advance, downloaded=downloaded)
        else:
            raise SkinclfError(f"--from {source}: expected a folder or a .zip archive")
    if not (dest / METADATA_FILE).is_file():
        raise SkinclfError(
            f"{source} holds no {METADATA_FILE}: expected the Kaggle HAM10000 layout "
            f"({METADATA_FILE}, {IMAGE_DIRS[0]}/, {IMAGE_DIRS[1]}/)"
        )
    return added, present


# --- Kaggle -------------------------------------------------------------------------------


def kaggle_credentials_present(env: dict[str, str] | None = None) -> bool:
    """Whether the kaggle package will find credentials (env vars or kaggle.json / token file)."""
    env = dict(os.environ) if env is None else env
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return True
    if env.get("KAGGLE_API_TOKEN"):
        return True
    home = Path(env.get("HOME", str(Path.home())))
    xdg = Path(env.get("XDG_CONFIG_HOME", str(home / ".config")))
    dirs = [Path(env["KAGGLE_CONFIG_DIR"])] if env.get("KAGGLE_CONFIG_DIR") else []
    dirs += [home / ".kaggle", xdg / "kaggle"]
    return any((d / f).is_file() for d in dirs for f in ("kaggle.json", "access_token"))


_CREDENTIALS_HELP = (
    "Kaggle credentials not found: create an API token at https://www.kaggle.com/settings "
    "and save it as ~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY; "
    "or import a copy you already have with `skinclf fetch --from PATH`"
)


def kaggle_api() -> Any:
    """An authenticated `KaggleApi`. The kaggle package authenticates when it is imported (and
    prints to stdout), so it is imported here, late, with its output captured."""
    if not kaggle_credentials_present():
        raise SkinclfError(_CREDENTIALS_HELP)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
    except ImportError:
        raise SkinclfError('skinclf fetch needs the kaggle client to download (not installed): '
                           'pip install "skinclf[train]", or import a copy with --from') from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - kaggle exits or raises on bad creds
        raise explain_kaggle_error(exc, FETCH.dataset) from None
    return api


_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "NewConnectionError",
    "MaxRetryError",
    "NameResolutionError",
    "gaierror",
    "TimeoutError",
    "ConnectionRefusedError",
    "ConnectionResetError",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def explain_kaggle_error(exc: BaseException, dataset: str) -> SkinclfError:
    """Turn whatever the kaggle package raised into a one-line, actionable SkinclfError."""
    url = KAGGLE_URL.format(dataset=dataset)
    for e in _chain(exc):
        status = getattr(getattr(e, "response", None), "status_code", None) or getattr(e, "status", None)
        if status == 401 or isinstance(e, SystemExit):
            return SkinclfError(
                "Kaggle rejected the credentials (401): create a new API token at "
                "https://www.kaggle.com/settings and save it as ~/.kaggle/kaggle.json"
            )
        if status == 403:
            return SkinclfError(
                f"Kaggle refused the download (403): sign in at {url} and accept the dataset's "
                "licence and rules, then run `skinclf fetch` again"
            )
        if status == 404:
            return SkinclfError(f"Kaggle dataset {dataset!r} not found (404): check the name at {url}")
        if any(cls.__name__ in _NETWORK_ERRORS for cls in type(e).__mro__):
            return SkinclfError(
                "cannot reach kaggle.com (no network?): connect and retry, or download the "
                f"archive from {url} elsewhere and run `skinclf fetch --from PATH.zip`"
            )
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return SkinclfError(f"Kaggle download of {dataset} failed: {reason}")


def download_from_kaggle(
    dataset: str, workdir: Path, *, api: Any = None, show_progress: bool | None = None
) -> Path:
    """Download the dataset's zip archive into `workdir` through the kaggle API; returns its path.

    The kaggle call runs in a thread while a rich display follows the growing file; an archive
    already complete in `workdir` is not downloaded again (the kaggle client checks).
    """
    api = api if api is not None else kaggle_api()
    workdir.mkdir(parents=True, exist_ok=True)
    archive = workdir / f"{dataset.split('/')[-1]}.zip"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                api.dataset_download_files(dataset, path=str(workdir), quiet=True, unzip=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="kaggle-download", daemon=True)
    thread.start()
    with ui.download_progress(enabled=show_progress) as progress:
        task = progress.add_task(f"Downloading {dataset}", total=None)
        while thread.is_alive():
            thread.join(0.25)
            if archive.exists():
                progress.update(task, completed=archive.stat().st_size)
    if failure:
        raise explain_kaggle_error(failure[0], dataset)
    if not archive.is_file():
        raise SkinclfError(f"Kaggle reported success but {archive} was not written")
    return archive


# --- verification -------------------------------------------------------------------------


def verify_images(dest: Path, *, show_progress: bool | None = None, workers: int = 4) -> int:
    """Decode every image the metadata names; returns how many, raises listing the bad ones."""
    meta = read_metadata(dest)
    paths = list(meta["path"])
    problems: list[str] = []

    def check(path: Path) -> str | None:
        try:
            load_image(path, 64)
        except ImageError as exc:
            return f"{path.name}: {exc}"
        return None

    with ui.progress(enabled=show_progress) as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task("Verifying", total=len(paths), rate="")
        for problem in pool.map(check, paths):
            if problem:
                problems.append(problem)
            progress.advance(task)
    if problems:
        shown = "; ".join(problems[:3])
        raise SkinclfError(f"{len(problems)} of {len(paths)} images cannot be decoded ({shown})")
    return len(paths)


def fetch_dataset(
    *,
    dest: Path = FETCH.dest,
    source: Path | None = None,
    verify: bool = False,
    dataset: str = FETCH.dataset,
    keep_archive: bool = False,
    api: Any = None,
    show_progress: bool | None = None,
) -> FetchResult:
    """Put HAM10000 into `dest` in the Kaggle layout and check it is complete.

    With `source`, imports a local folder or zip (hard links where possible); otherwise
    downloads from Kaggle with the `kaggle` package (`api` replaces it in tests). Re-running
    adds only what is missing. With `verify`, every image is decoded.
    """
    dest = Path(dest)
    check_output_dir(dest, option="--dest")
    with new_folders(dest):  # a failed first fetch leaves no empty --dest behind
        if source is not None:
            added, present = import_local(Path(source), dest, show_progress=show_progress)
            origin = str(source)
        else:
            workdir = dest / _DOWNLOAD_DIR
            archive = download_from_kaggle(dataset, workdir, api=api, show_progress=show_progress)
            added, present = import_local(archive, dest, show_progress=show_progress, downloaded=True)
            if not keep_archive:
                archive.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    workdir.rmdir()
            origin = f"kaggle:{dataset}"
        meta = read_metadata(dest)  # every metadata row must have its image
        if verify:
            verify_images(dest, show_progress=show_progress)
    return FetchResult(
        dest=dest, source=origin, images=len(meta), added=added, already_present=present, verified=verify
    )
