"""Byte-level text with passkeys hidden in it: language modelling and long-range retrieval in one stream.

Training rows are windows of the text corpus (train.data.text); a `passkey_rate` share of them carries a passkey
of `num_digits` random digits, written into the text at a random depth and asked for at the end of the window:

    needle  b" The pass key is 48213. Remember it. 48213 is the pass key. "   (overwrites bytes at depth p)
    query   b" What is the pass key? The pass key is 48213"                   (the last bytes of the window)

so the last `num_digits` targets of such a row are the digits, which only the needle (up to T bytes back) tells.
Every byte is a target with weight 1, as in `text`, except the answer digits of a training row with a passkey, which
weigh `passkey_weight` (default 1: plain language modelling; > 1 puts more of the loss on retrieval, the lever of
configs/sparse_long.py: 5 answer bytes in a 1024-byte row are otherwise 0.5% of the loss).

split="valid" is the held-out text walk of `text` unchanged (no passkeys): the validation loss of a run measures
language modelling on held-out files. `passkey_batch` builds passkey rows from held-out text for retrieval
accuracy (`passkey_answer_slice` locates the answer targets).

Batch keys (B = per-process batch, T = seq_len): inputs int32 [B, T], targets int32 [B, T], weights float32 [B, T].
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import check_int
from .text import TextSource, random_windows

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUERY = " What is the pass key? The pass key is {key}"


def passkey_answer_slice(seq_len: int, num_digits: int) -> slice:
    """Positions of `targets` [B, seq_len] that hold the passkey digits in a passkey row."""
    return slice(seq_len - num_digits, seq_len)


def insert_passkeys(
    windows: np.ndarray, rows: np.ndarray, rng: np.random.Generator, num_digits: int, depth: float | None = None
) -> np.ndarray:
    """Writes a needle and the final query into `windows[rows]` (uint8 [B, T+1]); returns int64 [len(rows)] keys.

    The needle starts at round(depth * last) (depth in [0, 1]) or a uniform random start in [0, last], with last the
    latest start that keeps it clear of the query."""
    length = windows.shape[1]
    keys = rng.integers(10 ** (num_digits - 1), 10**num_digits, size=len(rows))
    for row, key in zip(rows, keys, strict=True):
        needle = np.frombuffer(NEEDLE.format(key=key).encode(), dtype=np.uint8)
        query = np.frombuffer(QUERY.format(key=key).encode(), dtype=np.uint8)
        last = length - len(query) - len(needle)
        if last < 0:
            raise ValueError(
                f"seq_len={length - 1} is too short for a passkey row: needle and query take {len(needle) + len(query)}"
                " bytes"
            )
        start = int(rng.integers(0, last + 1)) if depth is None else int(round(depth * last))
        windows[row, start : start + len(needle)] = needle
        windows[row, length - len(query) :] = query
    return keys


def passkey_batch(
    data: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int, num_digits: int, depth: float | None = None
) -> dict[str, np.ndarray]:
    """`batch` passkey rows cut from byte array `data` (e.g. `load_corpus().valid`): inputs/targets int32 [batch,
    seq_len], weights float32 [batch, seq_len] (1 on the answer digits only) and keys int64 [batch]."""
    windows = random_windows(data, rng, batch, seq_len + 1).copy()
    keys = insert_passkeys(windows, np.arange(batch), rng, num_digits, depth)
    weights = np.zeros((batch, seq_len), dtype=np.float32)
    weights[:, passkey_answer_slice(seq_len, num_digits)] = 1.0
    windows = windows.astype(np.int32)
    return {
        "inputs": np.ascontiguousarray(windows[:, :-1]),
        "targets": np.ascontiguousarray(windows[:, 1:]),
        "weights": weights,
        "keys": keys,
    }


class TextPasskeySource(TextSource):
    """`text` whose training rows carry passkeys at rate `passkey_rate` (see the module docstring)."""

    name: ClassVar[str] = "text_passkey"
    OPTIONS: ClassVar[dict[str, Any]] = {
        **TextSource.OPTIONS,
        "passkey_rate": 0.5,
        "num_digits": 5,
        "passkey_weight": 1.0,
    }

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        super()._configure(seq_len, options)
        rate, digits = options["passkey_rate"], options["num_digits"]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ValueError(f"passkey_rate must be a number in [0, 1], got {rate!r}")
        self.passkey_rate = float(rate)
        self.num_digits = check_int("num_digits", digits, 1)
        if self.num_digits > 18:
            raise ValueError(f"num_digits={digits} must be at most 18 (keys are int64)")
        weight = options["passkey_weight"]
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ValueError(f"passkey_weight must be a number > 0 (1 = every byte alike), got {weight!r}")
        self.passkey_weight = float(weight)

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        if self.split != "train":
            return super()._make_batch(rng, step)
        windows = random_windows(self._data, rng, self.global_batch_size, self.seq_len + 1).copy()
        rows = np.flatnonzero(rng.random(self.global_batch_size) < self.passkey_rate)
        insert_passkeys(windows, rows, rng, self.num_digits)
        windows = windows.astype(np.int32)
        weights = np.ones((self.global_batch_size, self.seq_len), dtype=np.float32)
        weights[rows, self.answer_slice] = self.passkey_weight
        return {
            "inputs": np.ascontiguousarray(windows[:, :-1]),
            "targets": np.ascontiguousarray(windows[:, 1:]),
            "weights": weights,
        }

    def passkey_batch(self, rng: np.random.Generator, rows: int, depth: float | None = None) -> dict[str, np.ndarray]:
        """`rows` passkey rows of this source's split and length (`passkey_batch` on its bytes; weights on the
        answer digits only, keys int64 [rows])."""
        return passkey_batch(self._data, rng, check_int("rows", rows, 1), self.seq_len, self.num_digits, depth)

    @property
    def answer_slice(self) -> slice:
        """Positions of `targets` holding the digits in a passkey row (`passkey_answer_slice`)."""
        return passkey_answer_slice(self.seq_len, self.num_digits)
