"""BERT-style masked language modelling on the byte corpus, for encoders.

Token ids: bytes are 0..255 and the mask token is 256, so the model needs vocab_size >= 257.
In each row exactly `round(mask_rate * seq_len)` positions (at least one) are chosen; each chosen position
becomes the mask token with probability 0.8, a uniformly random byte with probability 0.1, and stays
unchanged with probability 0.1 (the 80/10/10 rule). The loss is on the chosen positions only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_fraction, check_int, token_prediction_spec
from .text import (
    VOCAB_SIZE,
    check_corpus_length,
    eval_batch_count,
    load_corpus,
    random_windows,
    strided_windows,
)

MASK_ID = VOCAB_SIZE  # 256, the first id after the bytes


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, mask_rate: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Applies the 80/10/10 masking rule to int tokens [B, T] (byte values).

    Returns (inputs int32 [B, T], chosen bool [B, T]); `tokens` itself is the target.
    """
    batch, length = tokens.shape
    count = max(1, int(round(mask_rate * length)))
    # The positions of the `count` smallest uniform keys in a row form a uniformly random subset.
    order = np.argsort(rng.random((batch, length)), axis=1)[:, :count]
    chosen = np.zeros((batch, length), dtype=bool)
    np.put_along_axis(chosen, order, True, axis=1)
    action = rng.random((batch, length))
    random_bytes = rng.integers(0, VOCAB_SIZE, size=(batch, length))
    inputs = tokens.astype(np.int32)
    inputs = np.where(chosen & (action < 0.8), MASK_ID, inputs)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_bytes, inputs)
    return inputs.astype(np.int32), chosen


class MaskedLMSource(DataSource):
    """Masked-LM batches from the byte corpus (same corpus options as the "text" source).

    Batch keys (B = per-process batch, T = seq_len):
      inputs  int32 [B, T]   bytes with the chosen positions masked (256), randomised or kept
      targets int32 [B, T]   the original bytes
      weights float32 [B, T] 1 at the chosen positions, 0 elsewhere (and on padding rows)

    split="train": random windows of the train split. split="valid": consecutive non-overlapping windows
    of the valid split (finite, `num_batches`, last batch padded with weight-0 rows); the masking of valid
    batch i is fixed by (seed, i, process_index).
    """

    name: ClassVar[str] = "masked_lm"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "path": None,
        "glob": None,
        "valid_fraction": 0.02,
        "num_batches": None,
        "mask_rate": 0.15,
        "vocab_size": VOCAB_SIZE + 1,
    }

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        split = self.split
        path, glob, valid_fraction, num_batches, mask_rate, vocab_size = (
            options["path"],
            options["glob"],
            options["valid_fraction"],
            options["num_batches"],
            options["mask_rate"],
            options["vocab_size"],
        )
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.mask_rate = check_fraction("mask_rate", mask_rate)
        # Larger vocabularies are allowed (e.g. padded to a multiple of 128); ids above 256 never occur.
        self.vocab_size = check_int("vocab_size", vocab_size, MASK_ID + 1)
        self.mask_id = MASK_ID
        self.corpus = load_corpus(path, glob=glob, valid_fraction=valid_fraction)
        self._data = self.corpus.split(split)
        check_corpus_length(self._data, self.seq_len, split, self.seq_len)
        if split == "valid":
            self._num_windows = len(self._data) // self.seq_len
            self.num_batches = eval_batch_count(self._num_windows, self.global_batch_size, num_batches)

    @property
    def element_spec(self) -> ElementSpec:
        return token_prediction_spec(self.batch_size, self.seq_len)

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        if self.split == "train":
            windows = random_windows(self._data, rng, self.global_batch_size, self.seq_len)
            real = np.ones(self.global_batch_size, dtype=bool)
        else:
            first = step * self.global_batch_size
            windows, real = strided_windows(
                self._data, first, self.global_batch_size, self.seq_len, self.seq_len, self._num_windows
            )
        inputs, chosen = mask_tokens(windows, rng, self.mask_rate)
        weights = (chosen & real[:, None]).astype(np.float32)
        return {"inputs": inputs, "targets": windows.astype(np.int32), "weights": weights}
