"""Captioned images of coloured shapes, for text-to-image models (the DiT of `attn.models.dit`).

Each image has a black background and one or two shapes (circle, square, triangle) in one of four colours (red,
green, blue, yellow). With two shapes, the first lies in the left half and the second in the right half, and their
(colour, shape) concepts differ. With one shape, it lies in the middle. The caption names them in that order:

    "red circle left blue square"      two shapes: <colour> <shape> left <colour> <shape>
    "green triangle <pad> <pad> <pad>" one shape

Token ids (`WORDS[i]` is token i): 0 padding, then the colours, the shapes and "left". A row whose caption was
dropped (probability `caption_dropout`, for classifier-free guidance) has only padding: that is the null caption.

Batch keys (B = per-process batch, S = image_size):
    images    float32 [B, S, S, 3] in [0, 1]
    captions  int32 [B, 5]
    concepts  float32 [B, len(COLORS) * len(SHAPES)]: 1 at colour * len(SHAPES) + shape for each shape drawn
              (concept_index), whatever the caption dropout did
    noise     float32 [B, S, S, 3] standard normal: the flow-matching endpoint eps of this row
    times     float32 [B] uniform in [0, 1): the flow-matching time of this row

noise and times are part of the stream so that a training step is a pure function of (seed, step): resuming and
evaluation see exactly the same draws.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int

COLORS = {
    "red": np.array([0.9, 0.1, 0.1], np.float32),
    "green": np.array([0.1, 0.8, 0.1], np.float32),
    "blue": np.array([0.15, 0.25, 0.95], np.float32),
    "yellow": np.array([0.9, 0.85, 0.1], np.float32),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("<pad>", *COLORS, *SHAPES, "left")
TOKEN = {word: index for index, word in enumerate(WORDS)}
CAPTION_LENGTH = 5
NUM_CONCEPTS = len(COLORS) * len(SHAPES)


def concept_index(color: int, shape: int) -> int:
    """Index of the (colour, shape) concept in the `concepts` vector: color * len(SHAPES) + shape."""
    return color * len(SHAPES) + shape


def shape_mask(shape: str, size: int) -> np.ndarray:
    """bool [size, size]: the pixels of `shape` ("circle", "square" or "triangle") drawn in a size x size box."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} must be one of {SHAPES}")
    centre = (size - 1) / 2.0
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    if shape == "circle":
        return (rows - centre) ** 2 + (cols - centre) ** 2 <= (size / 2.0) ** 2
    if shape == "square":
        margin = size // 8
        return (rows >= margin) & (rows < size - margin) & (cols >= margin) & (cols < size - margin)
    # An upright triangle: its half-width grows linearly from the apex (top row) to the base (bottom row).
    half_width = (rows + 1) / size * (size / 2.0)
    return np.abs(cols - centre) <= half_width


def encode_caption(text: str) -> np.ndarray:
    """int32 [CAPTION_LENGTH] token ids of a caption such as "red circle" or "red circle left blue square".

    ValueError naming the caption for an unknown word or a caption that is not of those two forms."""
    words = text.split()
    unknown = [word for word in words if word not in TOKEN or word == "<pad>"]
    ok = len(words) in (2, 5) and not unknown
    if ok:
        ok = words[0] in COLORS and words[1] in SHAPES
        if len(words) == 5:
            ok = ok and words[2] == "left" and words[3] in COLORS and words[4] in SHAPES
    if not ok:
        raise ValueError(
            f"caption={text!r} must be '<colour> <shape>' or '<colour> <shape> left <colour> <shape>' with colours "
            f"{list(COLORS)} and shapes {list(SHAPES)}"
        )
    ids = [TOKEN[word] for word in words] + [0] * (CAPTION_LENGTH - len(words))
    return np.array(ids, np.int32)


def caption_concepts(text: str) -> list[int]:
    """The concept indices a caption names, in order (one or two)."""
    ids = encode_caption(text)
    colors, shapes = list(COLORS), list(SHAPES)
    out = [concept_index(colors.index(WORDS[ids[0]]), shapes.index(WORDS[ids[1]]))]
    if ids[2]:
        out.append(concept_index(colors.index(WORDS[ids[3]]), shapes.index(WORDS[ids[4]])))
    return out


class ShapeCaptionSource(DataSource):
    """Procedural captioned shapes (see the module docstring).

    Options: image_size (>= 8, a multiple of 4), two_shape_fraction (probability of two shapes), caption_dropout
    (probability that a row's caption is the null caption). Endless stream; "valid" is disjoint from "train".
    """

    name: ClassVar[str] = "shape_captions"
    OPTIONS: ClassVar[dict[str, Any]] = {"image_size": 16, "two_shape_fraction": 0.75, "caption_dropout": 0.1}
    # The vocabulary and caption helpers, reachable from the class (tools outside train get it by source_class).
    WORDS: ClassVar[tuple[str, ...]] = WORDS
    PALETTE: ClassVar[dict[str, np.ndarray]] = COLORS  # name -> RGB in [0, 1] (before COLORS is rebound below)
    COLORS: ClassVar[tuple[str, ...]] = tuple(COLORS)
    SHAPES: ClassVar[tuple[str, ...]] = SHAPES
    NUM_CONCEPTS: ClassVar[int] = NUM_CONCEPTS
    encode_caption = staticmethod(encode_caption)
    caption_concepts = staticmethod(caption_concepts)

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        image_size, two_shape_fraction, caption_dropout = (
            options["image_size"],
            options["two_shape_fraction"],
            options["caption_dropout"],
        )
        self.image_size = check_int("image_size", image_size, 8)
        if self.image_size % 4:
            raise ValueError(f"image_size={image_size} must be a multiple of 4 (each shape fills a half, padded)")
        for key, value in (("two_shape_fraction", two_shape_fraction), ("caption_dropout", caption_dropout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}={value!r} must be a number in [0, 1]")
        self.two_shape_fraction = float(two_shape_fraction)
        self.caption_dropout = float(caption_dropout)
        self.vocab_size = len(WORDS)
        self.caption_length = CAPTION_LENGTH
        self.shape_size = self.image_size // 2 - 2  # a shape's box; 1-pixel margins leave room for jitter
        self._masks = np.stack([shape_mask(shape, self.shape_size) for shape in SHAPES])

    @property
    def element_spec(self) -> ElementSpec:
        b, s = self.batch_size, self.image_size
        return {
            "images": ((b, s, s, 3), np.dtype(np.float32)),
            "captions": ((b, CAPTION_LENGTH), np.dtype(np.int32)),
            "concepts": ((b, NUM_CONCEPTS), np.dtype(np.float32)),
            "noise": ((b, s, s, 3), np.dtype(np.float32)),
            "times": ((b,), np.dtype(np.float32)),
        }

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, s, box = self.global_batch_size, self.image_size, self.shape_size
        num_colors, num_shapes = len(COLORS), len(SHAPES)
        two = rng.random(b) < self.two_shape_fraction
        first = rng.integers(0, NUM_CONCEPTS, size=b)
        second = (first + rng.integers(1, NUM_CONCEPTS, size=b)) % NUM_CONCEPTS  # a different concept
        jitter = rng.integers(-1, 2, size=(b, 2, 2))  # per shape (row, column) offsets in {-1, 0, 1}
        palette = np.stack(list(COLORS.values()))
        images = np.zeros((b, s, s, 3), np.float32)
        captions = np.zeros((b, CAPTION_LENGTH), np.int32)
        concepts = np.zeros((b, NUM_CONCEPTS), np.float32)
        middle_row = (s - box) // 2
        for i in range(b):
            placed = [(first[i], s // 2 - box // 2)] if not two[i] else [(first[i], 1), (second[i], s // 2 + 1)]
            for slot, (concept, column) in enumerate(placed):
                color, shape = divmod(int(concept), num_shapes)
                row = middle_row + jitter[i, slot, 0]
                col = int(np.clip(column + jitter[i, slot, 1], 0, s - box))
                region = images[i, row : row + box, col : col + box]
                region[self._masks[shape]] = palette[color]
                concepts[i, concept] = 1.0
                captions[i, 3 * slot] = 1 + color
                captions[i, 3 * slot + 1] = 1 + num_colors + shape
            if two[i]:
                captions[i, 2] = TOKEN["left"]
        dropped = rng.random(b) < self.caption_dropout
        captions[dropped] = 0
        noise = rng.standard_normal(size=images.shape, dtype=np.float32)
        times = rng.random(b, dtype=np.float32)
        return {"images": images, "captions": captions, "concepts": concepts, "noise": noise, "times": times}
