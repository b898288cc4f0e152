"""Image question answering for vision-language models: "what colour is the shape at the <direction>?".

Images are drawn like the procedural relation images of `train.data.images`: two target squares of two different
colours from PALETTE (red, blue, green, yellow), among distractor squares of other colours (cyan, magenta, white),
with pixel noise. The two targets always lie in opposite halves of the image along every axis a question can ask
about. The question names a direction, and the answer is the colour of the target square in that half (which is
also the one further in that direction), so the answer is never ambiguous and can be read from one half of the
image. Answers are uniform over the palette (chance accuracy 1/4).

Token ids (`WORDS[i]` is token i): 0 padding, 1 start, then the question words, then the colour names.
Every row's question is the same 10 tokens except the direction:

    inputs   BOS what colour is the shape at the <direction> ?        int32 [B, 10]
    targets  what colour is the shape at the <direction> ? <answer>   int32 [B, 10]
    weights  0 ... 0 1                                                 float32 [B, 10] (the answer position only)
    images   float32 [B, image_size, image_size, 3] in [0, 1]

directions=2 asks about left/right; directions=4 also about top/bottom.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import ElementSpec
from .images import BLUE, DISTRACTOR_COLORS, RED, RelationImageSource, relation_label, render_relation_images

PALETTE = {
    "red": RED,
    "blue": BLUE,
    "green": DISTRACTOR_COLORS[0],
    "yellow": DISTRACTOR_COLORS[1],
}
# Distractors take the remaining colours (cyan, magenta, white), so no distractor looks like a target.
QUESTION_DISTRACTOR_COLORS = DISTRACTOR_COLORS[2:]
WORDS = (
    "<pad>",
    "<bos>",
    "what",
    "colour",
    "is",
    "the",
    "shape",
    "at",
    "left",
    "right",
    "top",
    "bottom",
    "?",
    *PALETTE,
)
TOKEN = {word: index for index, word in enumerate(WORDS)}
DIRECTIONS = ("left", "right", "top", "bottom")
QUESTION = ("<bos>", "what", "colour", "is", "the", "shape", "at", "the", None, "?")  # None: the direction


def sample_half_geometry(
    rng: np.random.Generator, batch: int, image_size: int, square_size: int, directions: int
) -> dict[str, np.ndarray]:
    """Corners int [B, 2] (row, column) of two squares, "red" (the first) and "blue" (the second) as
    `render_relation_images` names them, in opposite halves of the image along x (and, with directions=4, along
    y; with 2, the rows are free), each square wholly inside its half; "labels" int32 [B] as
    `train.data.images.relation_label` defines them for these positions."""
    half = image_size // 2
    positions = half - square_size + 1  # corner positions that keep a square inside its half

    def opposite_halves() -> tuple[np.ndarray, np.ndarray]:
        first_low = rng.integers(0, 2, size=batch).astype(bool)
        a, b = rng.integers(0, positions, size=(2, batch))
        return np.where(first_low, a, b + half), np.where(first_low, b + half, a)

    first_x, second_x = opposite_halves()
    if directions == 4:
        first_y, second_y = opposite_halves()
    else:
        first_y, second_y = rng.integers(0, image_size - square_size + 1, size=(2, batch))
    first, second = np.stack([first_y, first_x], 1), np.stack([second_y, second_x], 1)
    return {"labels": relation_label(first, second, directions), "red": first, "blue": second}


def answer_is_first(first_yx: np.ndarray, second_yx: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """bool [B]: the first square is the one further left (direction 0), right (1), up (2) or down (3) than the
    second. Positions int [B, 2] are (row, column) of each square's top-left corner."""
    column_less = first_yx[:, 1] < second_yx[:, 1]
    row_less = first_yx[:, 0] < second_yx[:, 0]
    return np.select(
        [direction == 0, direction == 1, direction == 2],
        [column_less, ~column_less, row_less],
        default=~row_less,
    )


class ImageQuestionSource(RelationImageSource):
    """Procedural image questions (see the module docstring). Options as for the "images" source, except
    `directions` (2 or 4) replaces num_classes."""

    name: ClassVar[str] = "image_questions"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "image_size": 32,
        "directions": 4,
        "square_size": None,
        "num_distractors": 4,
        "noise_std": 0.1,
    }

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        directions = options["directions"]
        if directions not in (2, 4):
            raise ValueError(f"directions must be 2 (left/right) or 4 (also top/bottom), got {directions!r}")
        super()._configure(seq_len, {**options, "num_classes": directions})
        self.directions = directions
        self.vocab_size = len(WORDS)
        self.question_length = len(QUESTION)

    @property
    def element_spec(self) -> ElementSpec:
        b, s, t = self.batch_size, self.image_size, self.question_length
        return {
            "images": ((b, s, s, 3), np.dtype(np.float32)),
            "inputs": ((b, t), np.dtype(np.int32)),
            "targets": ((b, t), np.dtype(np.int32)),
            "weights": ((b, t), np.dtype(np.float32)),
        }

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b = self.global_batch_size
        geometry = sample_half_geometry(rng, b, self.image_size, self.square_size, self.directions)
        # Two different palette colours per row: the first uniform, the second uniform over the others.
        first = rng.integers(0, len(PALETTE), size=b)
        second = (first + rng.integers(1, len(PALETTE), size=b)) % len(PALETTE)
        palette = np.stack(list(PALETTE.values()))
        images = render_relation_images(
            rng,
            geometry,
            self.image_size,
            self.square_size,
            self.num_distractors,
            self.noise_std,
            target_colors=(palette[first], palette[second]),
            distractor_colors=QUESTION_DISTRACTOR_COLORS,
        )
        direction = rng.integers(0, self.directions, size=b)
        answer = np.where(answer_is_first(geometry["red"], geometry["blue"], direction), first, second)
        question = np.array([0 if word is None else TOKEN[word] for word in QUESTION], np.int32)
        inputs = np.tile(question, (b, 1))
        inputs[:, QUESTION.index(None)] = np.array([TOKEN[d] for d in DIRECTIONS], np.int32)[direction]
        answer_tokens = np.array([TOKEN[c] for c in PALETTE], np.int32)[answer]
        targets = np.concatenate([inputs[:, 1:], answer_tokens[:, None]], axis=1)
        weights = np.zeros(inputs.shape, np.float32)
        weights[:, -1] = 1.0
        return {"images": images, "inputs": inputs, "targets": targets, "weights": weights}
