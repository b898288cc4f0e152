"""Sequence-to-sequence synthetic tasks for encoder-decoder models: reverse or sort a random digit string.

The encoder reads the source digits; the decoder predicts the target digits and then an end token with teacher
forcing. Token ids: 0 padding, 1 start (BOS), 2 end (EOS), digit d -> 3 + d, so vocab_size = 3 + num_digits.

Batch keys (B = per-process batch, S = seq_len, the longest source):
  sources         int32 [B, S]      source digits, padded with 0 after the row's length
  source_lengths  int32 [B]         n, uniform in [min_length, S]
  inputs          int32 [B, S + 1]  decoder input: BOS, y_0 .. y_{n-1}, then padding
  targets         int32 [B, S + 1]  y_0 .. y_{n-1}, EOS, then padding
  weights         float32 [B, S + 1]  1 at the n + 1 target positions, 0 on padding
where y is the source reversed (task "reverse") or sorted ascending (task "sort"). Endless stream; split="valid"
draws from a random stream disjoint from "train".
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int

PAD, BOS, EOS = 0, 1, 2
FIRST_DIGIT = 3
TASKS = ("reverse", "sort")


def seq2seq_target(digits: np.ndarray, lengths: np.ndarray, task: str) -> np.ndarray:
    """Target digits int [B, S] for source digits int [B, S] of which the first lengths[b] are valid; positions at
    or beyond the length hold -1. "reverse": y_i = x_{n-1-i}; "sort": the valid digits in ascending order."""
    positions = np.arange(digits.shape[1])
    valid = positions[None, :] < lengths[:, None]
    if task == "reverse":
        source_index = np.clip(lengths[:, None] - 1 - positions[None, :], 0, None)
        target = np.take_along_axis(digits, source_index, axis=1)
    else:
        # Padding sorts after every digit, so the first n entries are the sorted valid digits.
        target = np.sort(np.where(valid, digits, np.iinfo(np.int64).max), axis=1)
    return np.where(valid, target, -1)


class Seq2SeqSource(DataSource):
    """Reverse or sort a digit string of random length (see the module docstring).

    Options: task ("reverse" or "sort"), num_digits (digit alphabet size, >= 2), min_length (shortest source,
    1 <= min_length <= seq_len).
    """

    name: ClassVar[str] = "seq2seq"
    OPTIONS: ClassVar[dict[str, Any]] = {"task": "reverse", "num_digits": 10, "min_length": 1}

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        task, num_digits, min_length = options["task"], options["num_digits"], options["min_length"]
        if task not in TASKS:
            raise ValueError(f"task={task!r} must be one of {TASKS}")
        self.task = task
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.num_digits = check_int("num_digits", num_digits, 2)
        self.min_length = check_int("min_length", min_length, 1)
        if self.min_length > self.seq_len:
            raise ValueError(f"min_length={self.min_length} must be <= seq_len={self.seq_len}")
        self.vocab_size = FIRST_DIGIT + self.num_digits

    @property
    def element_spec(self) -> ElementSpec:
        b, s = self.batch_size, self.seq_len
        return {
            "sources": ((b, s), np.dtype(np.int32)),
            "source_lengths": ((b,), np.dtype(np.int32)),
            "inputs": ((b, s + 1), np.dtype(np.int32)),
            "targets": ((b, s + 1), np.dtype(np.int32)),
            "weights": ((b, s + 1), np.dtype(np.float32)),
        }

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, s = self.global_batch_size, self.seq_len
        lengths = rng.integers(self.min_length, s + 1, size=b)
        digits = rng.integers(0, self.num_digits, size=(b, s))
        positions = np.arange(s)
        valid = positions[None, :] < lengths[:, None]
        sources = np.where(valid, digits + FIRST_DIGIT, PAD)
        target = seq2seq_target(digits, lengths, self.task)
        target_tokens = np.where(target >= 0, target + FIRST_DIGIT, PAD)
        rows = np.arange(b)
        targets = np.concatenate([target_tokens, np.full((b, 1), PAD)], axis=1)
        targets[rows, lengths] = EOS
        inputs = np.concatenate([np.full((b, 1), BOS), target_tokens], axis=1)
        weights = (np.arange(s + 1)[None, :] <= lengths[:, None]).astype(np.float32)
        return {
            "sources": sources.astype(np.int32),
            "source_lengths": lengths.astype(np.int32),
            "inputs": inputs.astype(np.int32),
            "targets": targets.astype(np.int32),
            "weights": weights,
        }
