"""Ordinal succession: list tokens of ordinal sequences, then write each one's successor (a successor-head probe).

Token ids: 0 is the padding, 1 the "now their successors" marker, and the ordinal tokens form `num_orders`
sequences of `order_length` consecutive ids each: order k is 2 + k * order_length, ..., 2 + (k + 1) * order_length - 1
(like the digits, the letters, the months of a natural vocabulary). succ(t) = t + 1 inside an order. With
n = num_items, the sequence S (length T+1) of a row is

  S[0 : n]        = x_1 ... x_n        ordinal tokens drawn uniformly from all that have a successor
  S[n]            = marker 1
  S[n+1 : 2n+1]   = succ(x_1) ... succ(x_n)
  S[2n+1 :]       = padding 0

inputs = S[:T], targets = S[1:]; weights are 1 at positions n .. 2n-1, whose targets are the successors. The token
at each of those positions is unrelated to its target (a random x's successor, or the marker), so the model must
read x_i from n positions back and increment it: the job of a successor head ("Successor Heads", Gould et al.
2024). vocab_size = 2 + num_orders * order_length. Needs seq_len >= 2 * num_items.

Batch keys (B = per-process batch, T = seq_len): inputs int32 [B, T], targets int32 [B, T], weights float32 [B, T].
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int, token_prediction_spec


class OrdinalSuccessorSource(DataSource):
    """Ordinal tokens, a marker, then their successors in the same order (see the module docstring)."""

    name: ClassVar[str] = "ordinal_successor"
    OPTIONS: ClassVar[dict[str, Any]] = {"num_orders": 3, "order_length": 10, "num_items": 8}
    PAD, MARKER, FIRST_ORDINAL = 0, 1, 2

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.num_orders = check_int("num_orders", options["num_orders"], 1)
        self.order_length = check_int("order_length", options["order_length"], 2)
        self.num_items = check_int("num_items", options["num_items"], 1)
        if self.seq_len < 2 * self.num_items:
            raise ValueError(
                f"seq_len={self.seq_len} is too small for ordinal_successor: need seq_len >= 2 * num_items = "
                f"{2 * self.num_items}"
            )
        self.vocab_size = self.FIRST_ORDINAL + self.num_orders * self.order_length

    def orders(self) -> list[list[int]]:
        """The ordinal sequences as token ids: num_orders lists of order_length consecutive ids."""
        first = self.FIRST_ORDINAL
        return [
            list(range(first + k * self.order_length, first + (k + 1) * self.order_length))
            for k in range(self.num_orders)
        ]

    @property
    def element_spec(self) -> ElementSpec:
        return token_prediction_spec(self.batch_size, self.seq_len)

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, t, n, length = self.global_batch_size, self.seq_len, self.num_items, self.order_length
        order = rng.integers(0, self.num_orders, size=(b, n))
        rank = rng.integers(0, length - 1, size=(b, n))  # the last of an order has no successor
        items = self.FIRST_ORDINAL + order * length + rank
        seq = np.full((b, t + 1), self.PAD, dtype=np.int64)
        seq[:, :n] = items
        seq[:, n] = self.MARKER
        seq[:, n + 1 : 2 * n + 1] = items + 1
        weights = np.zeros((b, t), dtype=np.float32)
        weights[:, n : 2 * n] = 1.0
        return {
            "inputs": np.ascontiguousarray(seq[:, :-1], dtype=np.int32),
            "targets": np.ascontiguousarray(seq[:, 1:], dtype=np.int32),
            "weights": weights,
        }
