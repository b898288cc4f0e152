"""Synthetic long-context tasks: multi-query associative recall, selective copy, passkey retrieval.

Each task builds a token sequence S of length T+1 per row and yields it as a language-modelling pair
`inputs = S[:T]`, `targets = S[1:]`, with `weights` 1 only at the positions whose target is an answer
token (so the loss and accuracy measure the task, not the filler). Every source is an endless stream;
split="valid" draws from a random stream disjoint from "train" (same seed, different stream id).

Batch keys of every task (B = per-process batch, T = seq_len):
  inputs  int32 [B, T], targets int32 [B, T] (values in [0, vocab_size)), weights float32 [B, T].
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int, token_prediction_spec


def _distinct(rng: np.random.Generator, batch: int, population: int, count: int) -> np.ndarray:
    """`count` distinct ints in [0, population) per row, in random order: int64 [batch, count]."""
    if count * count > population:
        return np.argsort(rng.random((batch, population)), axis=1)[:, :count]
    # Sparse case (long sequences): redraw only the rows that collided; cheaper than sorting a
    # [batch, population] key array, and still a pure function of `rng`.
    out = rng.integers(0, population, size=(batch, count))
    while True:
        ordered = np.sort(out, axis=1)
        clash = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not clash.any():
            return out
        out[clash] = rng.integers(0, population, size=(int(clash.sum()), count))


class _TokenTask(DataSource):
    """Shared plumbing: seq_len/vocab checks, element spec, and S -> (inputs, targets)."""

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.vocab_size = check_int("vocab_size", options["vocab_size"], 1)

    def _require(self, name: str, value: int, minimum: int, why: str) -> None:
        if value < minimum:
            raise ValueError(f"{name}={value} is too small for {self.name}: need {name} >= {minimum} ({why})")

    @property
    def element_spec(self) -> ElementSpec:
        return token_prediction_spec(self.batch_size, self.seq_len)

    @staticmethod
    def _pack(sequence: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "inputs": np.ascontiguousarray(sequence[:, :-1], dtype=np.int32),
            "targets": np.ascontiguousarray(sequence[:, 1:], dtype=np.int32),
            "weights": weights.astype(np.float32),
        }


class MQARSource(_TokenTask):
    """Multi-query associative recall (Zoology, Arora et al. 2023).

    Token ids: 0 is the filler; keys are drawn from [1, vocab_size // 2), values from
    [vocab_size // 2, vocab_size) (disjoint halves). With N = num_kv_pairs, the sequence S (length T+1) is

      S[0 : 2N]  = k_1 v_1 k_2 v_2 ... k_N v_N      N distinct keys, each with a random value
      S[2N : ]   = filler 0, except Q query slots at random distinct even offsets 2N + 2j, each holding
                   a queried key k followed by its value v

    inputs = S[:T], targets = S[1:]; weights are 1 exactly at the query-key positions, where the target is
    the value that was paired with that key in the first 2N tokens. Values are present in `inputs` after
    the query (teacher forcing), so the task is meant for causal models.

    Which keys the Q slots ask (`query_keys`): "each_once" (the default, Zoology's layout: Q = N, every key once in
    random order) or "random" (each slot's key drawn uniformly from the N pairs, with replacement; Q =
    `num_queries`, default N). With "each_once" a model can score without recall: the j-th query's answer is one of
    the N - j values not yet asked for (1/(N - j), 0.34 on average for N = 8); "random" leaves recall the only way
    above 1/N. Needs seq_len >= 2 * num_kv_pairs + 2 * Q and vocab_size >= 2 * (num_kv_pairs + 1).
    """

    name: ClassVar[str] = "mqar"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "num_kv_pairs": 8,
        "vocab_size": 8192,
        "query_keys": "each_once",
        "num_queries": None,
    }
    QUERY_KEYS: ClassVar[tuple[str, ...]] = ("each_once", "random")

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        super()._configure(seq_len, options)
        self.num_kv_pairs = check_int("num_kv_pairs", options["num_kv_pairs"], 1)
        n = self.num_kv_pairs
        self.query_keys = options["query_keys"]
        if self.query_keys not in self.QUERY_KEYS:
            raise ValueError(f"query_keys must be one of {self.QUERY_KEYS}, got {self.query_keys!r}")
        queries = options["num_queries"]
        if self.query_keys == "each_once" and queries not in (None, n):
            raise ValueError(
                f"num_queries={queries!r} needs query_keys='random': with 'each_once' every one of the "
                f"num_kv_pairs={n} keys is asked exactly once"
            )
        self.num_queries = n if queries is None else check_int("num_queries", queries, 1)
        q = self.num_queries
        self._require(
            "seq_len", self.seq_len, 2 * n + 2 * q, f"2 * num_kv_pairs + 2 * num_queries with {n} pairs, {q} queries"
        )
        self._require("vocab_size", self.vocab_size, 2 * (n + 1), f"num_kv_pairs={n} distinct keys in [1, vocab/2)")

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, t, n, v = self.global_batch_size, self.seq_len, self.num_kv_pairs, self.vocab_size
        half = v // 2
        keys = _distinct(rng, b, half - 1, n) + 1
        values = rng.integers(half, v, size=(b, n))
        seq = np.zeros((b, t + 1), dtype=np.int64)
        seq[:, 0 : 2 * n : 2] = keys
        seq[:, 1 : 2 * n : 2] = values
        q = self.num_queries
        slots = _distinct(rng, b, (t - 2 * n) // 2, q)
        positions = 2 * n + 2 * slots  # [b, q] input positions of the queried keys
        rows = np.arange(b)[:, None]
        if self.query_keys == "each_once":
            queried = _distinct(rng, b, n, n)  # which pair each query slot asks about: a permutation
        else:
            queried = rng.integers(0, n, size=(b, q))  # any pair, with replacement
        seq[rows, positions] = np.take_along_axis(keys, queried, axis=1)
        seq[rows, positions + 1] = np.take_along_axis(values, queried, axis=1)
        weights = np.zeros((b, t), dtype=np.float32)
        weights[rows, positions] = 1.0
        return self._pack(seq, weights)


class SelectiveCopySource(_TokenTask):
    """Selective copying (Mamba, Gu & Dao 2023): copy the scattered data tokens, in order, after a marker.

    Token ids: 0 is the noise (blank) token, 1 the copy marker, data tokens are drawn from [2, vocab_size).
    With n = num_tokens and R = T - n, the sequence S (length T+1) is

      S[0 : R]        = noise 0 with the n data tokens at random distinct positions (kept in order)
      S[R]            = marker 1
      S[R+1 : R+1+n]  = the n data tokens again, in order of appearance

    inputs = S[:T], targets = S[1:]; weights are 1 at positions R .. T-1, whose targets are the data
    tokens in order. Needs seq_len >= 2 * num_tokens and vocab_size >= 3.
    """

    name: ClassVar[str] = "selective_copy"
    OPTIONS: ClassVar[dict[str, Any]] = {"num_tokens": 16, "vocab_size": 16}
    NOISE, MARKER, FIRST_DATA = 0, 1, 2

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        super()._configure(seq_len, options)
        self.num_tokens = check_int("num_tokens", options["num_tokens"], 1)
        n = self.num_tokens
        self._require("seq_len", self.seq_len, 2 * n, f"2 * num_tokens with num_tokens={n}")
        self._require("vocab_size", self.vocab_size, 3, "noise, marker and at least one data token")

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, t, n = self.global_batch_size, self.seq_len, self.num_tokens
        region = t - n
        rows = np.arange(b)[:, None]
        positions = np.sort(_distinct(rng, b, region, n), axis=1)
        tokens = rng.integers(self.FIRST_DATA, self.vocab_size, size=(b, n))
        seq = np.full((b, t + 1), self.NOISE, dtype=np.int64)
        seq[rows, positions] = tokens
        seq[:, region] = self.MARKER
        seq[:, region + 1 :] = tokens
        weights = np.zeros((b, t), dtype=np.float32)
        weights[:, region:] = 1.0
        return self._pack(seq, weights)


class PasskeySource(_TokenTask):
    """Passkey retrieval at any length (Mohtashami & Jaggi 2023, token-level).

    Token ids: 0..9 are digits, 10 the "the passkey is" marker, 11 the "what is the passkey?" query marker,
    and [12, vocab_size) the filler. With d = num_digits, the sequence S (length T+1) is

      filler everywhere (uniform random filler tokens, or with filler="repeat" the fixed cycle
      12, 13, ..., 12+P-1 with P = min(16, vocab_size - 12), like a repeated sentence), except
      S[p : p+1+d]      = 10 digit_1 ... digit_d     at depth p (uniform in [0, T-2d-1], or
                          round(depth * (T-2d-1)) when `depth` in [0, 1] is given)
      S[T-d : T+1]      = 11 digit_1 ... digit_d     at the end

    inputs = S[:T], targets = S[1:]; weights are 1 at positions T-d .. T-1 (the query marker and the
    first d-1 digits), whose targets are the d passkey digits. Needs seq_len >= 2 * num_digits + 1 and
    vocab_size >= 13.
    """

    name: ClassVar[str] = "passkey"
    OPTIONS: ClassVar[dict[str, Any]] = {"num_digits": 5, "vocab_size": 64, "depth": None, "filler": "random"}
    NEEDLE, QUERY, FIRST_FILLER = 10, 11, 12

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        super()._configure(seq_len, options)
        depth, filler = options["depth"], options["filler"]
        self.num_digits = check_int("num_digits", options["num_digits"], 1)
        d = self.num_digits
        self._require("seq_len", self.seq_len, 2 * d + 1, f"2 * num_digits + 1 with num_digits={d}")
        self._require("vocab_size", self.vocab_size, self.FIRST_FILLER + 1, "10 digits, 2 markers, 1 filler")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int | float) or not 0 <= depth <= 1):
            raise ValueError(f"depth must be None (random) or a number in [0, 1], got {depth!r}")
        if filler not in ("random", "repeat"):
            raise ValueError(f"filler must be 'random' or 'repeat', got {filler!r}")
        self.depth = None if depth is None else float(depth)
        self.filler = filler

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, t, d = self.global_batch_size, self.seq_len, self.num_digits
        rows = np.arange(b)[:, None]
        if self.filler == "random":
            seq = rng.integers(self.FIRST_FILLER, self.vocab_size, size=(b, t + 1))
        else:
            period = min(16, self.vocab_size - self.FIRST_FILLER)
            seq = np.tile(self.FIRST_FILLER + np.arange(t + 1) % period, (b, 1))
        digits = rng.integers(0, 10, size=(b, d))
        last_start = t - 2 * d - 1  # the needle ends before the query block starts
        if self.depth is None:
            starts = rng.integers(0, last_start + 1, size=(b, 1))
        else:
            starts = np.full((b, 1), int(round(self.depth * last_start)))
        seq[rows, starts] = self.NEEDLE
        seq[rows, starts + 1 + np.arange(d)] = digits
        seq[:, t - d] = self.QUERY
        seq[:, t - d + 1 :] = digits
        weights = np.zeros((b, t), dtype=np.float32)
        weights[:, t - d :] = 1.0
        return self._pack(seq, weights)
