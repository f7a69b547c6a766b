"""Where things live on disk: the HAM10000 (Kaggle) layout and labelled class folders.

Pure Python and pandas, no Keras, so `fetch` and `prepare` start instantly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skinclf.data.images import is_image_file
from skinclf.errors import SkinclfError

METADATA_FILE = "HAM10000_metadata.csv"
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
METADATA_COLUMNS = ("lesion_id", "image_id", "dx")
MODEL_ENV = "SKINCLF_MODEL"
BUNDLED_MODEL = "skinclf-mobilenet.keras"


def model_path(model: Path | str | None = None) -> Path:
    """`model` as a path, or the default model when none is given (`default_model_path`)."""
    return Path(model) if model else default_model_path()


def default_model_path() -> Path:
    """The model to use when none is given: $SKINCLF_MODEL, else the bundled one.

    An installed wheel carries `models/` inside the package (`skinclf/models/`); a source
    checkout has it beside the package. Either way it is found from any working directory.
    """
    if os.environ.get(MODEL_ENV):
        path = Path(os.environ[MODEL_ENV])
        if not path.is_file():  # the user may not know the variable is set: name it
            what = "is a folder, not a model file" if path.is_dir() else "does not exist"
            raise SkinclfError(f"{MODEL_ENV}={path}: {what}; point it at a .keras or .onnx model, unset it to use "
                               "the bundled model, or pass --model")
        return path
    here = Path(__file__).resolve().parents[1]  # the skinclf package
    candidates = (here / "models" / BUNDLED_MODEL, here.parent / "models" / BUNDLED_MODEL)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SkinclfError(
        f"no bundled model found (looked for {candidates[0]} and {candidates[1]}); "
        f"pass --model PATH or set {MODEL_ENV}"
    )


def read_metadata(root: Path, *, require_images: bool = True) -> pd.DataFrame:
    """Read `HAM10000_metadata.csv` under `root` and locate each row's image.

    Returns the metadata with a `path` column (None where the image is missing when
    `require_images` is False). Raises SkinclfError if the layout or the CSV is wrong, or if
    images are missing and `require_images` is True.
    """
    root = Path(root)
    csv = root / METADATA_FILE
    if not root.is_dir():
        raise SkinclfError(
            f"dataset folder not found: {root} (run `skinclf fetch` first, or pass --src)"
        )
    if not csv.is_file():
        raise SkinclfError(f"{csv} not found: {root} is not in the HAM10000 layout")
    try:
        meta = pd.read_csv(csv, dtype={"lesion_id": str, "image_id": str, "dx": str})
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user problem
        raise SkinclfError(f"cannot read {csv}: {exc}") from None
    missing_cols = [c for c in METADATA_COLUMNS if c not in meta.columns]
    if missing_cols:
        raise SkinclfError(
            f"{csv} lacks column(s) {', '.join(missing_cols)}; expected {', '.join(METADATA_COLUMNS)}"
        )
    if meta.empty:
        raise SkinclfError(f"{csv} has no rows")
    if meta["image_id"].duplicated().any():
        dup = meta.loc[meta["image_id"].duplicated(), "image_id"].iloc[0]
        raise SkinclfError(f"{csv} lists image {dup} more than once")
    found: dict[str, Path] = {}
    for folder in IMAGE_DIRS:
        d = root / folder
        if d.is_dir():
            for p in d.iterdir():
                if p.suffix.lower() == ".jpg":
                    found[p.stem] = p
    meta["path"] = meta["image_id"].map(found)
    missing = meta["path"].isna()
    if require_images and missing.any():
        first = meta.loc[missing, "image_id"].iloc[0]
        raise SkinclfError(
            f"{int(missing.sum())} of {len(meta)} images in {csv.name} are missing under {root} "
            f"(first: {first}); expected them in {' or '.join(IMAGE_DIRS)}"
        )
    return meta


@dataclass(frozen=True)
class LabelledImages:
    """Images of a folder with one sub-folder per class."""

    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def counts(self) -> dict[str, int]:
        """Number of images per class, in class order."""
        out = dict.fromkeys(self.classes, 0)
        for label in self.labels:
            out[self.classes[label]] += 1
        return out


def list_labelled_images(folder: Path, *, classes: tuple[str, ...] | None = None) -> LabelledImages:
    """List a folder of class sub-folders (`folder/<class>/<image>`).

    Class names are the sorted sub-folder names; pass `classes` to fix their order (a model's
    classes), in which case a sub-folder outside it is an error. Every class folder must hold
    at least one image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SkinclfError(f"folder not found: {folder}")
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise SkinclfError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    if classes is None:
        classes = tuple(subdirs)
    else:
        unknown = [d for d in subdirs if d not in classes]
        if unknown:
            raise SkinclfError(
                f"{folder} has class folder(s) {', '.join(unknown)} the model does not know; "
                f"its classes are {', '.join(classes)}"
            )
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = folder / name
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and is_image_file(p)) if class_dir.is_dir() else []
        if not files and name in subdirs:
            raise SkinclfError(f"class folder {class_dir} holds no images")
        paths.extend(files)
        labels.extend([index] * len(files))
    if not paths:
        raise SkinclfError(f"{folder} holds no images")
    return LabelledImages(classes=tuple(classes), paths=tuple(paths), labels=tuple(labels))
