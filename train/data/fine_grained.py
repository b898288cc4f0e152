"""Procedural fine-grained image classification: every class shares one coarse body; a small part tells them apart.

Each image holds one "body" (a rectangle of a shared, jittered body colour, image_size // 2 on a side, at a random
place: pose jitter) carrying a small square "part" (side `part_size`) at one of `num_slots` fixed places on the body
(its corners, in the order top-left, bottom-right, top-right, bottom-left), in one of `num_colors` palette colours.
The class is (colour, slot): label = colour * num_slots + slot, so num_classes = num_colors * num_slots, drawn
uniformly (balanced; chance = 1 / num_classes). The other slots carry neutral dark "decoy" marks of the same size,
so the presence of a mark at a slot says nothing; only the colour of the one coloured mark and where it sits on
the body do. Clutter: `num_distractors` squares of the same size and palette colours lie at random places (painted
before the body, so they only show off it), then Gaussian pixel noise. Colours are jittered by +-0.08 per channel.

Batch keys (B = per-process batch), as the "images" source:
  images  float32 [B, H, W, 3] in [0, 1]
  labels  int32 [B] in [0, num_colors * num_slots)
  weights float32 [B]   ones
Endless stream; split="valid" draws from a random stream disjoint from "train".
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int
from .images import _paint

# Part colours: distinct hues at similar brightness, none close to the body colour or the decoy grey.
PART_COLORS = np.array(
    [[0.85, 0.15, 0.15], [0.9, 0.55, 0.1], [0.75, 0.15, 0.7], [0.2, 0.7, 0.3], [0.15, 0.35, 0.85], [0.1, 0.75, 0.75]],
    dtype=np.float32,
)
BODY_COLOR = np.array([0.72, 0.7, 0.6], dtype=np.float32)
DECOY_COLOR = np.array([0.25, 0.25, 0.25], dtype=np.float32)
_JITTER = 0.08
MAX_SLOTS = 4


def slot_offsets(body_size: int, part_size: int) -> np.ndarray:
    """(row, column) of each slot's part corner relative to the body corner, int [MAX_SLOTS, 2]: the body's
    top-left, bottom-right, top-right and bottom-left corners, one pixel in from its edges."""
    near, far = 1, body_size - part_size - 1
    return np.array([[near, near], [far, far], [near, far], [far, near]])


class FineGrainedImageSource(DataSource):
    """Which colour and where is the small mark on the shared body? Classes differ only in a small local detail."""

    name: ClassVar[str] = "fine_grained"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "image_size": 32,
        "num_colors": 4,
        "num_slots": 2,
        "part_size": 3,
        "num_distractors": 4,
        "noise_std": 0.08,
    }

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        self.image_size = check_int("image_size", options["image_size"], 16)
        self.num_colors = check_int("num_colors", options["num_colors"], 2)
        if self.num_colors > len(PART_COLORS):
            raise ValueError(f"num_colors={self.num_colors} exceeds the {len(PART_COLORS)} palette colours")
        self.num_slots = check_int("num_slots", options["num_slots"], 1)
        if self.num_slots > MAX_SLOTS:
            raise ValueError(f"num_slots={self.num_slots} must be at most {MAX_SLOTS} (the body's corners)")
        self.body_size = self.image_size // 2
        self.part_size = check_int("part_size", options["part_size"], 1)
        if 2 * self.part_size + 2 > self.body_size:
            raise ValueError(
                f"part_size={self.part_size} is too large for image_size={self.image_size}: two parts and their "
                f"margins must fit the body side {self.body_size} (part_size <= {(self.body_size - 2) // 2})"
            )
        self.num_distractors = check_int("num_distractors", options["num_distractors"], 0)
        noise_std = options["noise_std"]
        if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or noise_std < 0:
            raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.num_classes = self.num_colors * self.num_slots

    @property
    def element_spec(self) -> ElementSpec:
        b, s = self.batch_size, self.image_size
        return {
            "images": ((b, s, s, 3), np.dtype(np.float32)),
            "labels": ((b,), np.dtype(np.int32)),
            "weights": ((b,), np.dtype(np.float32)),
        }

    def sample(self, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(batch, geometry): geometry {"body" int [B, 2] body corner, "part" int [B, 2] coloured part corner,
        "color" int [B], "slot" int [B]} lets tests check the labels against the pixels."""
        batch, size, part = self.global_batch_size, self.image_size, self.part_size
        labels = rng.integers(0, self.num_classes, size=batch).astype(np.int32)
        color, slot = labels // self.num_slots, labels % self.num_slots
        background = rng.uniform(0.05, 0.45, size=(batch, 1, 1, 1)).astype(np.float32)
        images = np.broadcast_to(background, (batch, size, size, 3)).copy()
        jitter = lambda: rng.uniform(-_JITTER, _JITTER, size=(batch, 3)).astype(np.float32)  # noqa: E731
        for _ in range(self.num_distractors):
            corner = rng.integers(0, size - part + 1, size=(batch, 2))
            _paint(images, corner, part, PART_COLORS[rng.integers(0, self.num_colors, size=batch)] + jitter())
        body = rng.integers(0, size - self.body_size + 1, size=(batch, 2))
        _paint(images, body, self.body_size, BODY_COLOR + jitter())
        offsets = slot_offsets(self.body_size, part)
        # A decoy at every slot but the class's, then the coloured part.
        for s in range(self.num_slots):
            _paint_where(images, slot != s, body + offsets[s], part, DECOY_COLOR + jitter())
        part_corner = body + offsets[slot]
        _paint(images, part_corner, part, PART_COLORS[color] + jitter())
        if self.noise_std > 0:
            images += np.float32(self.noise_std) * rng.standard_normal(size=images.shape, dtype=np.float32)
        np.clip(images, 0.0, 1.0, out=images)
        batch_out = {"images": images, "labels": labels, "weights": np.ones(batch, np.float32)}
        return batch_out, {"body": body, "part": part_corner, "color": color, "slot": slot}

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        return self.sample(rng)[0]


def _paint_where(images: np.ndarray, rows: np.ndarray, corner: np.ndarray, size: int, color: np.ndarray) -> None:
    """Paints in place size x size squares at corner int [B, 2] with color [B, 3], only in the images where rows
    (bool [B]) is True."""
    offsets = np.arange(size)
    index = np.flatnonzero(rows)
    ys = (corner[index, :1] + offsets)[:, :, None]
    xs = (corner[index, 1:] + offsets)[:, None, :]
    images[index[:, None, None], ys, xs] = color[index][:, None, None, :]
