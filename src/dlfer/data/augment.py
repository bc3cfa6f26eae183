"""The paper's augmentation, used to balance the training classes.

DLFER (section 2.2): rotation up to 10 degrees, zoom 20%, horizontal flip with p=0.5, width
and height shift 10%, nearest fill. The transform follows Keras' ImageDataGenerator semantics
(independent zoom factors for x and y drawn from [1-zoom, 1+zoom], shifts as a fraction of the
side, bilinear interpolation) but is a pure function of the image and a passed-in RNG, so a
seed reproduces every copy and no Keras legacy API is needed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    rotation_degrees: float
    zoom: float
    shift: float
    horizontal_flip: float
    fill_mode: str


def random_affine(image: np.ndarray, settings: AugmentSettings, rng: np.random.Generator) -> np.ndarray:
    """One randomly transformed copy of a (H, W) uint8 image."""
    height, width = image.shape
    angle = np.deg2rad(rng.uniform(-settings.rotation_degrees, settings.rotation_degrees))
    zoom_y, zoom_x = rng.uniform(1 - settings.zoom, 1 + settings.zoom, size=2)
    shift_y = rng.uniform(-settings.shift, settings.shift) * height
    shift_x = rng.uniform(-settings.shift, settings.shift) * width
    flip = rng.random() < settings.horizontal_flip

    # affine_transform maps each output coordinate to an input coordinate: input = matrix @ output + offset.
    # Compose rotation and zoom about the image centre, as ImageDataGenerator does.
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.array([[cos, -sin], [sin, cos]]) @ np.diag([zoom_y, zoom_x])
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    offset = centre - matrix @ centre + np.array([shift_y, shift_x])
    transformed = ndimage.affine_transform(image.astype(np.float32), matrix, offset=offset, order=1,
                                           mode=settings.fill_mode)
    if flip:
        transformed = transformed[:, ::-1]
    return np.clip(np.rint(transformed), 0, 255).astype(np.uint8)


def balance_plan(labels: np.ndarray, target_per_class: int, max_copies_per_image: int,
                 rng: np.random.Generator) -> np.ndarray:
    """How many augmented copies to make of each image so every class reaches the target.

    target_per_class 0 means the largest class's count. Copies are spread evenly over a class's
    images (the remainder goes to randomly chosen ones); max_copies_per_image > 0 caps them, in
    which case a very small class can stay below the target (reported by the stage).
    """
    classes, counts = np.unique(labels, return_counts=True)
    target = int(counts.max()) if target_per_class <= 0 else target_per_class
    copies = np.zeros(len(labels), dtype=np.int64)
    for label, count in zip(classes, counts):
        needed = max(target - int(count), 0)
        rows = np.flatnonzero(labels == label)
        per_image, remainder = divmod(needed, count)
        copies[rows] = per_image
        copies[rng.choice(rows, size=remainder, replace=False)] += 1
    if max_copies_per_image > 0:
        copies = np.minimum(copies, max_copies_per_image)
    return copies


def augment_copies(images: np.ndarray, copies: np.ndarray, settings: AugmentSettings,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The augmented images and, for each, the row of the original it came from."""
    sources = np.repeat(np.arange(len(images)), copies)
    augmented = np.empty((len(sources), *images.shape[1:]), dtype=np.uint8)
    for index, source in enumerate(sources):
        augmented[index] = random_affine(images[source], settings, rng)
    return augmented, sources
