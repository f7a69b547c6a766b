"""Synthetic data: lesion-like images, a tiny HAM10000-layout dataset and its Kaggle archive, and a
stand-in for the Kaggle client."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
# A distinct colour per class, so a tiny model can learn the task in a few steps.
CLASS_COLOURS = {
    "akiec": (200, 60, 60),
    "bcc": (60, 200, 60),
    "bkl": (60, 60, 200),
    "df": (200, 200, 60),
    "mel": (30, 20, 20),
    "nv": (150, 100, 70),
    "vasc": (200, 60, 200),
    "healthy": (230, 200, 180),
}


def lesion_image(colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small synthetic 'lesion': a coloured disc on skin-toned noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.normal(180, 20, (h, w, 3)).clip(0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2
    base[disc] = np.array(colour) + rng.normal(0, 8, (int(disc.sum()), 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def write_ham(root: Path, per_class: int = 6, *, seed: int = 0) -> Path:
    """A tiny HAM10000-layout dataset: metadata CSV and JPEGs split over the two part folders.

    Every third lesion has two images, so grouping by lesion matters.
    """
    rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    n = 0
    for dx in CLASSES:
        for j in range(per_class):
            lesion = f"HAM_{n:07d}"
            images = 2 if j % 3 == 0 else 1
            for _ in range(images):
                image_id = f"ISIC_{n:07d}"
                part = "HAM10000_images_part_1" if n % 2 == 0 else "HAM10000_images_part_2"
                path = root / part / f"{image_id}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                lesion_image(CLASS_COLOURS[dx], seed + n).save(path, quality=90)
                rows.append(f"{lesion},{image_id},{dx},histo,50.0,female,back")
                n += 1
    (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def kaggle_style_zip(ham: Path, archive: Path, *, extra_members: dict[str, bytes] | None = None) -> Path:
    """Zip `ham` the way the Kaggle archive is laid out, with its lower-case duplicate folders
    and hmnist CSVs that fetch must skip."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(ham.rglob("*")):
            if path.is_file():
                rel = path.relative_to(ham).as_posix()
                zf.write(path, rel)
                if rel.startswith("HAM10000_images_part_"):
                    zf.write(path, rel.replace("HAM10000_images_part_", "ham10000_images_part_"))
        zf.writestr("hmnist_28_28_RGB.csv", "pixel0000,label\n1,2\n")
        for name, data in (extra_members or {}).items():
            zf.writestr(name, data)
    return archive


def lesion_folder(folder: Path, count: int) -> Path:
    """`count` synthetic lesion JPEGs (0.jpg, 1.jpg, ...) in a new folder."""
    folder.mkdir()
    for i in range(count):
        lesion_image((150, 100, 70), i).save(folder / f"{i}.jpg")
    return folder


class HTTPErrorLike(Exception):
    """What the kaggle client raises on an HTTP error status: `.response.status_code`."""

    def __init__(self, status: int):
        super().__init__(f"{status} Client Error")
        self.response = type("Response", (), {"status_code": status})()


class FakeKaggleApi:
    """Stands in for `kaggle.api.KaggleApi` at the boundary skinclf uses."""

    def __init__(self, archive: Path | None = None, error: BaseException | None = None):
        self.archive = archive
        self.error = error
        self.calls: list[tuple[str, str]] = []

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False, licenses=()):
        self.calls.append((dataset, path))
        if self.error is not None:
            raise self.error
        target = Path(path) / f"{dataset.split('/')[-1]}.zip"
        target.write_bytes(self.archive.read_bytes())
