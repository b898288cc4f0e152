"""Object detection on procedural scenes: a few coloured squares on clutter; the targets are their centres and classes.

Batch keys (B = per-process batch, M = max_objects):
  images   float32 [B, H, W, 3] in [0, 1]
  centres  float32 [B, M, 2]   (row, column) of each object's centre in pixels (pixel i spans [i, i + 1));
                                0 on the invalid slots
  classes  int32 [B, M]        the object's class in [0, num_classes) (its colour); 0 on the invalid slots
  valid    float32 [B, M]      1 for the objects of the image (the first n slots, n in [min_objects, max_objects])
  weights  float32 [B]         1
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int
from .images import BLUE, DISTRACTOR_COLORS, RED

# Object colours, one per class; each far from the others and from the clutter colours (images.DISTRACTOR_COLORS).
CLASS_COLORS = np.stack([RED, BLUE, np.array([0.95, 0.5, 0.05], np.float32), np.array([0.45, 0.1, 0.6], np.float32)])
_COLOR_JITTER = 0.08


def place_objects(
    rng: np.random.Generator, counts: np.ndarray, sizes: np.ndarray, image_size: int, max_tries: int = 1000
) -> np.ndarray:
    """Top-left corners int [B, M, 2] of squares of side sizes int [B, M] inside image_size x image_size; within
    each row the first counts[b] squares are at least one pixel apart (they never touch); the rest are 0. ValueError
    when a row finds no such place in `max_tries` draws."""
    corners = np.zeros((*sizes.shape, 2), np.int64)
    for row, count in enumerate(counts):
        for slot in range(count):
            size = sizes[row, slot]
            for _ in range(max_tries):
                corner = rng.integers(0, image_size - size + 1, size=2)
                apart = all(
                    np.any((corner + size < other) | (other + sizes[row, j] < corner))
                    for j, other in enumerate(corners[row, :slot])
                )
                if apart:
                    corners[row, slot] = corner
                    break
            else:
                raise ValueError(f"no room for {count} squares of sizes {sizes[row, :count]} in {image_size} pixels")
    return corners


class DetectionSceneSource(DataSource):
    """Where are the objects, and what are they? Centre regression and classification on cluttered scenes.

    Each image holds n objects (n uniform in [min_objects, max_objects]): squares whose side is uniform in
    [object_size, max_object_size] (object_size default image_size // 8, at least 2; max_object_size default
    object_size) and whose colour (jittered) is their class, CLASS_COLORS[:num_classes]. Large squares span several
    patches, so a patch inside one must look at its neighbours to tell where the centre is. Behind them,
    `num_distractors` squares of side object_size in clutter colours (images.DISTRACTOR_COLORS) at random places, on a
    grey background of random brightness, plus Gaussian pixel noise of std `noise_std`. Objects never touch each
    other; they may cover clutter. Classes are uniform. Endless stream;
    split="valid" uses a random stream disjoint from "train".
    """

    name: ClassVar[str] = "detection_scenes"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "image_size": 32,
        "num_classes": 3,
        "min_objects": 1,
        "max_objects": 3,
        "object_size": None,
        "max_object_size": None,
        "num_distractors": 4,
        "noise_std": 0.05,
    }

    def __init__(
        self,
        *,
        split: str = "train",
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        seq_len: int | None = None,  # accepted for a uniform factory call; images have no length
        image_size: int = 32,
        num_classes: int = 3,
        min_objects: int = 1,
        max_objects: int = 3,
        object_size: int | None = None,
        max_object_size: int | None = None,
        num_distractors: int = 4,
        noise_std: float = 0.05,
    ) -> None:
        super().__init__(
            split=split,
            batch_size=batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
        self.image_size = check_int("image_size", image_size, 8)
        self.num_classes = check_int("num_classes", num_classes, 1)
        if self.num_classes > len(CLASS_COLORS):
            raise ValueError(f"num_classes must be <= {len(CLASS_COLORS)} (one colour each), got {num_classes}")
        self.max_objects = check_int("max_objects", max_objects, 1)
        self.min_objects = check_int("min_objects", min_objects, 0)
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects={min_objects} must be <= max_objects={max_objects}")
        default_size = max(2, self.image_size // 8)
        self.object_size = check_int("object_size", default_size if object_size is None else object_size, 1)
        largest = self.object_size if max_object_size is None else max_object_size
        self.max_object_size = check_int("max_object_size", largest, self.object_size)
        # Room for max_objects of the largest squares side by side with a one-pixel gap (so sampling never stalls).
        room = ((self.image_size + 1) // (self.max_object_size + 1)) ** 2
        if room < self.max_objects:
            raise ValueError(
                f"max_objects={max_objects} squares of side up to {self.max_object_size} do not fit apart in "
                f"image_size={self.image_size} (room for {room}); use fewer objects or smaller squares"
            )
        self.num_distractors = check_int("num_distractors", num_distractors, 0)
        if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or noise_std < 0:
            raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)

    @property
    def element_spec(self) -> ElementSpec:
        b, s, m = self.batch_size, self.image_size, self.max_objects
        return {
            "images": ((b, s, s, 3), np.dtype(np.float32)),
            "centres": ((b, m, 2), np.dtype(np.float32)),
            "classes": ((b, m), np.dtype(np.int32)),
            "valid": ((b, m), np.dtype(np.float32)),
            "weights": ((b,), np.dtype(np.float32)),
        }

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, s, m, size = self.global_batch_size, self.image_size, self.max_objects, self.object_size
        counts = rng.integers(self.min_objects, m + 1, size=b)
        valid = np.arange(m)[None, :] < counts[:, None]
        sizes = np.where(valid, rng.integers(size, self.max_object_size + 1, size=(b, m)), size)
        corners = place_objects(rng, counts, sizes, s)
        classes = np.where(valid, rng.integers(0, self.num_classes, size=(b, m)), 0).astype(np.int32)
        background = rng.uniform(0.05, 0.45, size=(b, 1, 1, 1)).astype(np.float32)
        images = np.broadcast_to(background, (b, s, s, 3)).copy()
        pixels = np.arange(s)

        def paint(corner: np.ndarray, side: np.ndarray, color: np.ndarray, where: np.ndarray) -> None:
            """Squares of side int [B] at corner int [B, 2] in color float [B, 3], on the rows where `where`."""
            inside_rows = (pixels >= corner[:, :1]) & (pixels < corner[:, :1] + side[:, None])  # [B, s]
            inside_cols = (pixels >= corner[:, 1:]) & (pixels < corner[:, 1:] + side[:, None])
            inside = inside_rows[:, :, None] & inside_cols[:, None, :] & where[:, None, None]
            images[:] = np.where(inside[..., None], color[:, None, None, :], images)

        for _ in range(self.num_distractors):
            corner = rng.integers(0, s - size + 1, size=(b, 2))
            color = DISTRACTOR_COLORS[rng.integers(0, len(DISTRACTOR_COLORS), size=b)]
            paint(corner, np.full(b, size), color, np.ones(b, bool))
        for slot in range(m):
            jitter = rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, size=(b, 3)).astype(np.float32)
            paint(corners[:, slot], sizes[:, slot], CLASS_COLORS[classes[:, slot]] + jitter, valid[:, slot])
        if self.noise_std > 0:
            images += np.float32(self.noise_std) * rng.standard_normal(size=images.shape, dtype=np.float32)
        np.clip(images, 0.0, 1.0, out=images)
        centres = np.where(valid[..., None], corners + sizes[..., None] / 2.0, 0.0).astype(np.float32)
        return {
            "images": images,
            "centres": centres,
            "classes": classes,
            "valid": valid.astype(np.float32),
            "weights": np.ones(b, np.float32),
        }
