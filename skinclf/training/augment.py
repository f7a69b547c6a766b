"""Training-time augmentation: the seed projects' recipe, done in one resampling per image.

Rotation up to 180 degrees either way, shift up to 10% of the side, zoom 0.9-1.1, horizontal and
vertical flips; optionally (`color`), brightness, contrast and saturation jitter, since
dermatoscopes differ in colour rendering. The geometric five are folded into a single affine
map applied with Pillow in the
data-loading threads (outside the model: random augmentation layers inside a Keras model ran
4x slower on a GPU). The image is reflect-padded first, so rotated corners show skin rather than
black wedges that the model could learn to key on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class AugmentSpec:
    rotation: float = 180.0  # degrees, either way
    shift: float = 0.1  # fraction of the side, each axis
    zoom: float = 0.1  # scale in [1 - zoom, 1 + zoom]
    flips: bool = True  # horizontal and vertical, each with probability 1/2
    color: float = 0.0  # brightness, contrast and saturation factors in [1 - color, 1 + color]
    # Random resized crop (the ISIC winners' recipe): a box of this share of the image's area and
    # an aspect ratio in `crop_ratio`, stretched to the output. None keeps the zoom/shift recipe.
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


RECIPE = AugmentSpec()
# Full fine-tuning recipe: random resized crops (area 0.3-1), rotations, flips, colour jitter.
WINNERS = AugmentSpec(color=0.2, crop_scale=(0.3, 1.0))


def color_jitter(image: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Scale brightness, contrast and saturation by random factors in [1 - amount, 1 + amount]."""
    brightness, contrast, saturation = rng.uniform(1 - amount, 1 + amount, 3)
    x = image.astype(np.float32) * brightness
    x = (x - x.mean()) * contrast + x.mean()
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = gray[..., None] + (x - gray[..., None]) * saturation
    return np.clip(x, 0, 255).astype(np.uint8)


def _crop_box(size: int, rng: np.random.Generator, spec: AugmentSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale (x, y) and centre offset of a random resized crop of a `size` square.

    The box's area is a share in `crop_scale` of the image and its aspect ratio (log-uniform)
    in `crop_ratio`; sides are capped at the image's and the box lies inside it.
    """
    area = rng.uniform(*spec.crop_scale)
    ratio = np.exp(rng.uniform(np.log(spec.crop_ratio[0]), np.log(spec.crop_ratio[1])))
    sides = np.minimum(np.array([np.sqrt(area * ratio), np.sqrt(area / ratio)]), 1.0)
    room = (1.0 - sides) / 2 * size
    return sides, rng.uniform(-room, room)


def random_affine(image: np.ndarray, rng: np.random.Generator, spec: AugmentSpec = RECIPE) -> np.ndarray:
    """Return a randomly rotated, shifted/cropped, zoomed and flipped copy of a square uint8 RGB image.

    Every geometric step is folded into one affine map, so the image is resampled once.
    """
    size = image.shape[0]
    theta = np.deg2rad(rng.uniform(-spec.rotation, spec.rotation))
    if spec.crop_scale:
        # Per-axis scale < 1: the output shows a box of that share of each side.
        scale_xy, centre_shift = _crop_box(size, rng, spec)
    else:
        scale_xy = np.full(2, 1.0 / rng.uniform(1 - spec.zoom, 1 + spec.zoom))
        centre_shift = -rng.uniform(-spec.shift, spec.shift, 2) * size / scale_xy
    flip = np.where(rng.random(2) < 0.5, -1.0, 1.0) if spec.flips else np.ones(2)
    if spec.color:
        image = color_jitter(image, rng, spec.color)
    # Input pixel i = c + d + S F R(-theta) (o - c), with S the per-axis scale and d the box's offset.
    cos, sin = np.cos(theta), np.sin(theta)
    m = np.diag(scale_xy) @ np.diag(flip) @ np.array([[cos, sin], [-sin, cos]])
    pad = size // 2
    centre = np.array([size / 2, size / 2])
    offset = centre + pad + centre_shift - m @ centre
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = Image.fromarray(padded).transform(
        (size, size),
        Image.Transform.AFFINE,
        (m[0, 0], m[0, 1], offset[0], m[1, 0], m[1, 1], offset[1]),
        resample=Image.Resampling.BILINEAR,
    )
    return np.asarray(out)
