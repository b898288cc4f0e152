"""Video questions for vision-language models: "what colour is the shape in frame <k>" about a short clip.

Each clip has `num_frames` frames of `frame_size` x `frame_size` pixels: one square (side `square_size`) moves in a
straight line across a grey background (a random start and a random velocity of at most one square per frame,
bouncing off the edges), and takes a random colour from PALETTE (red, blue, green, yellow) in each frame, with
pixel noise. The question names a frame k and the answer is the square's colour in that frame (chance 1/4): the
model must find frame k's tokens, which is what a frame-causal cross-attention (`video_ccam`) orders.

The frames are stacked vertically into one image [num_frames * frame_size, frame_size, 3], so a ViT with a
patch_size dividing frame_size yields frame-major patch tokens (frame 0's patches first): the layout of the
`video_ccam` and `crosslmm` contexts, with num_frames frames of (frame_size / patch_size)^2 tokens.

Token ids (`WORDS[i]` is token i): 0 padding, 1 start, the question words, the frame numbers, the colours.

    inputs   BOS what colour is the shape in frame <k>              int32 [B, 9]
    targets  what colour is the shape in frame <k> <answer>         int32 [B, 9]
    weights  0 ... 0 1                                             float32 [B, 9] (the answer position only)
    images   float32 [B, num_frames * frame_size, frame_size, 3] in [0, 1]
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int
from .image_questions import PALETTE

MAX_FRAMES = 16
WORDS = (
    "<pad>",
    "<bos>",
    "what",
    "colour",
    "is",
    "the",
    "shape",
    "in",
    "frame",
    *(str(k) for k in range(MAX_FRAMES)),
    *PALETTE,
)
TOKEN = {word: index for index, word in enumerate(WORDS)}
QUESTION = ("<bos>", "what", "colour", "is", "the", "shape", "in", "frame", None)  # None: the frame number


def square_path(rng: np.random.Generator, batch: int, frames: int, frame_size: int, square_size: int) -> np.ndarray:
    """Top-left corners int [B, F, 2] (row, column) of a square moving in a straight line, reflected at the edges so
    it stays inside the frame; velocity per axis uniform in [-square_size, square_size]."""
    span = frame_size - square_size  # corners lie in [0, span]
    start = rng.integers(0, span + 1, size=(batch, 1, 2))
    velocity = rng.integers(-square_size, square_size + 1, size=(batch, 1, 2))
    raw = start + velocity * np.arange(frames)[None, :, None]
    period = 2 * max(span, 1)
    folded = np.mod(raw, period)
    return np.where(folded > span, period - folded, folded)


class VideoClipSource(DataSource):
    """Procedural video questions (see the module docstring)."""

    name: ClassVar[str] = "video_clips"
    OPTIONS: ClassVar[dict[str, Any]] = {"num_frames": 4, "frame_size": 8, "square_size": 3, "noise_std": 0.05}

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        num_frames, frame_size, square_size, noise_std = (
            options["num_frames"],
            options["frame_size"],
            options["square_size"],
            options["noise_std"],
        )
        self.num_frames = check_int("num_frames", num_frames, 1)
        if self.num_frames > MAX_FRAMES:
            raise ValueError(f"num_frames={num_frames} must be at most {MAX_FRAMES} (the frame-number words)")
        self.frame_size = check_int("frame_size", frame_size, 4)
        self.square_size = check_int("square_size", square_size, 1)
        if self.square_size >= self.frame_size:
            raise ValueError(f"square_size={square_size} must be smaller than frame_size={frame_size}")
        if not noise_std >= 0:
            raise ValueError(f"noise_std={noise_std!r} must be >= 0")
        self.noise_std = float(noise_std)
        self.vocab_size = len(WORDS)
        self.question_length = len(QUESTION)

    @property
    def element_spec(self) -> ElementSpec:
        b, f, s, t = self.batch_size, self.num_frames, self.frame_size, self.question_length
        return {
            "images": ((b, f * s, s, 3), np.dtype(np.float32)),
            "inputs": ((b, t), np.dtype(np.int32)),
            "targets": ((b, t), np.dtype(np.int32)),
            "weights": ((b, t), np.dtype(np.float32)),
        }

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, f, s, q = self.global_batch_size, self.num_frames, self.frame_size, self.square_size
        corners = square_path(rng, b, f, s, q)
        colours = rng.integers(0, len(PALETTE), size=(b, f))
        palette = np.stack(list(PALETTE.values())).astype(np.float32)
        background = rng.uniform(0.05, 0.45, size=(b, 1, 1, 1, 1)).astype(np.float32)
        frames = np.broadcast_to(background, (b, f, s, s, 3)).copy()
        rows = corners[..., 0, None] + np.arange(q)  # [B, F, q]
        cols = corners[..., 1, None] + np.arange(q)
        bi, fi = np.arange(b)[:, None, None, None], np.arange(f)[None, :, None, None]
        frames[bi, fi, rows[..., :, None], cols[..., None, :]] = palette[colours][:, :, None, None, :]
        if self.noise_std:
            frames += np.float32(self.noise_std) * rng.standard_normal(size=frames.shape, dtype=np.float32)
        images = np.clip(frames, 0.0, 1.0).reshape(b, f * s, s, 3)
        asked = rng.integers(0, f, size=b)
        words = [TOKEN[w] if w is not None else 0 for w in QUESTION]
        inputs = np.tile(np.array(words, np.int32), (b, 1))
        inputs[:, QUESTION.index(None)] = np.array([TOKEN[str(k)] for k in range(f)], np.int32)[asked]
        answers = np.array([TOKEN[c] for c in PALETTE], np.int32)[colours[np.arange(b), asked]]
        targets = np.concatenate([inputs[:, 1:], answers[:, None]], axis=1)
        weights = np.zeros(inputs.shape, np.float32)
        weights[:, -1] = 1.0
        return {"images": images, "inputs": inputs, "targets": targets, "weights": weights}
