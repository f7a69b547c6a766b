"""Teacher views for distillation: K augmented views of every training image and the teacher's logits on each.

Stored once, uint8 and memory-mapped, built view by view in resumable chunks; each draw is keyed by
(seed, view, image).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from skinclf import ui
from skinclf.data.images import ImageError, load_image
from skinclf.errors import SkinclfError
from skinclf.files import atomic_write_json, sha256_text
from skinclf.parallel import in_background
from skinclf.training.augment import AugmentSpec, random_affine

CHUNK = 256  # images per chunk: the unit that an interrupted build redoes


@dataclass(frozen=True)
class ViewSpec:
    """How views are drawn: at `size` (the student's side), seen by the teacher at `teacher_size`
    (the same draw before it is shrunk), with the recipe's `augment`. View k of image i depends on
    (seed, k, i) only, so a cache of K views extends to more without changing the first K."""

    size: int
    teacher_size: int
    seed: int
    augment: AugmentSpec


def draw_view(path: Path, index: int, view: int, spec: ViewSpec) -> tuple[np.ndarray, np.ndarray]:
    """(teacher image, student image) of view `view` of image `index`: one augmentation at the
    teacher's size, then shrunk (bilinear, antialiased) to the student's size. Both uint8."""
    try:
        pixels = load_image(path, spec.teacher_size)
    except ImageError as exc:
        raise SkinclfError(f"cannot read {path}: {exc}") from None
    big = random_affine(pixels, np.random.default_rng([spec.seed, view, index]), spec.augment)
    big = np.asarray(big, dtype="uint8")
    if spec.size == spec.teacher_size:
        return big, big
    small = Image.fromarray(big).resize((spec.size, spec.size), Image.Resampling.BILINEAR, reducing_gap=None)
    return big, np.asarray(small, dtype="uint8")


def engine_teacher(engine) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """A teacher function from an engine (logits before the bundle's post-hoc temperature) and its record.

    The bundle's head computes (z + shift) / T; the stored logits are z + shift = logits x T: the
    members' mean logits with the ensemble's prior correction and decision weights, unscaled."""
    temperature = float(engine.meta.get("calibration", {}).get("temperature") or 1.0)

    def teacher(images: np.ndarray) -> np.ndarray:
        return engine.logits(np.asarray(images, dtype="float32")) * temperature

    record = {"model": str(engine.path), "sha256": engine.sha256, "engine": engine.name,
              "temperature_undone": temperature,
              "logits": "bundle logits x its temperature: mean member logits + prior shift + decision weights"}
    return teacher, record


def _key(paths: Sequence[Path], spec: ViewSpec, teacher: dict) -> str:
    listing = "\n".join(f"{Path(p).parent.name}/{Path(p).name}" for p in paths)
    return sha256_text(json.dumps([listing, asdict(spec), teacher.get("sha256"), teacher.get("temperature_undone")]))


def _arrays(folder: Path, view: int, n: int, size: int, num_classes: int, mode: str):
    images = np.lib.format.open_memmap(folder / f"view{view}-images.npy", mode=mode, dtype="uint8",
                                       shape=(n, size, size, 3))
    logits = np.lib.format.open_memmap(folder / f"view{view}-logits.npy", mode=mode, dtype="float32",
                                       shape=(n, num_classes))
    return images, logits


def open_views(folder: Path, views: int) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """(images per view (N, s, s, 3) uint8, logits per view (N, C) float32, record) of the first `views` views."""
    folder = Path(folder)
    record = json.loads((folder / "views.json").read_text(encoding="utf-8"))
    chunks = -(-record["images"] // record["chunk"])
    missing = [k for k in range(views) if len(record["done"].get(str(k), [])) != chunks]
    if missing:
        raise SkinclfError(f"view cache {folder}: view(s) {missing} incomplete: build them first")
    images = [np.load(folder / f"view{k}-images.npy", mmap_mode="r") for k in range(views)]
    logits = [np.load(folder / f"view{k}-logits.npy", mmap_mode="r") for k in range(views)]
    return images, logits, record


def build_views(paths: Sequence[Path], folder: Path, spec: ViewSpec, teacher: Callable[[np.ndarray], np.ndarray], *,
                views: int, teacher_record: dict, num_classes: int, batch_size: int = 32, workers: int = 2,
                show_progress: bool | None = None) -> Path:
    """Build (or finish, or extend to `views` views) the view cache of `paths` in `folder`.

    One pair of .npy files per view, filled in chunks of CHUNK images; after each chunk both are
    flushed and `views.json` lists it as done, so a killed build resumes at the first missing
    chunk. A folder built with other images, settings or teacher is refused."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(paths)
    chunks = -(-n // CHUNK)
    key = _key(paths, spec, teacher_record)
    record_path = folder / "views.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record["key"] != key:
            raise SkinclfError(f"{folder} holds views of other images, settings or teacher: choose another folder")
    else:
        record = {"key": key, "spec": asdict(spec), "teacher": teacher_record, "images": n, "chunk": CHUNK, "done": {}}
        atomic_write_json(record_path, record)
    with ui.progress(enabled=show_progress) as progress:
        task = progress.add_task("Teacher views", total=views * chunks, rate="")
        for view in range(views):
            done = record["done"].setdefault(str(view), [])
            if len(done) == chunks:
                continue
            images, logits = _arrays(folder, view, n, spec.size, num_classes, "r+" if done else "w+")
            for chunk in (c for c in range(chunks) if c not in done):
                rows = range(chunk * CHUNK, min(n, (chunk + 1) * CHUNK))
                pairs = list(in_background([lambda i=i, k=view: draw_view(paths[i], i, k, spec) for i in rows],
                                           workers=workers))
                big = np.stack([b for b, _ in pairs])
                images[rows.start : rows.stop] = np.stack([s for _, s in pairs])
                logits[rows.start : rows.stop] = np.concatenate(
                    [teacher(big[i : i + batch_size]) for i in range(0, len(big), batch_size)])
                images.flush()
                logits.flush()
                done.append(chunk)
                atomic_write_json(record_path, record)
                progress.update(task, advance=1)
                ui.stderr.print(f"views: view {view} chunk {len(done)}/{chunks}", soft_wrap=True)
            del images, logits
    return folder
