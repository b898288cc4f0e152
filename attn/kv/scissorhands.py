"""Scissorhands [164] (Liu et al. 2023, "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV
Cache Compression at Test Time"): tokens that were unimportant in the recent past stay unimportant, so when the
cache is full it drops the keys that most often received less than average attention over a history window, never
the most recent tokens, `drop` of them at once; memory stays at `budget` entries per (batch, kv head).

Per (batch, kv head), for every query i (position p_i, one decode step) and every entry j it attends to:

    low_ij   =  mean_{h in group} a_{h,i,j}  <  1 / t_i            t_i = the entries query i attends to
    u_j      =  sum_{i in the latest w queries} low_ij             (queries before j arrived count 0)

and after each decode call, with n valid entries (the kept ones and the chunk) and N = tokens seen:

    n <= B   keep everything
    n >  B   drop the d = max(n - B, m) entries with the largest u_j among {j : p_j < N - r} (ties: the earlier
             entry goes first); keep the rest in order                          B = budget, m = drop, r = recent

So the cache fills to B, then drops m at once and refills (the paper's budgeted drops: compression runs once every
m steps, not at every token). The statistic is a per-slot bit history (`KVCache.key_history`, uint32: bit s is
low_ij of the query s steps ago), so u_j is a population count over the lowest w bits and w <= 32.

Paper vs this code: the paper (arXiv 2305.17118, Sec. 4, Algorithms 1-2) counts, per head, how often a token's
attention score over the history window falls below the threshold 1/t, excludes the recent window and drops the m
tokens with the largest counts when the budget is reached; no official code was released. Reconstructed here: t
is the number of entries the query attends to (t = p_i + 1 while nothing has been evicted, the paper's average), a
kv head shared by G query heads (GQA) thresholds the group's mean attention (the paper is MHA: G = 1), w is at
most 32 (one uint32 per slot; the paper's windows are longer), ties drop the earlier entry, and a chunk of several
tokens (a prompt) attends causally to the cache and to itself and is compressed once after it, every one of its
queries one step of the history. budget >= the generated length keeps everything: decoding is causal softmax
attention. The forward (decode=False) is causal softmax attention: eviction depends on the decode history.
Time per decoded token O(B H D); memory B entries (+ 4 bytes of history) per (batch, kv head).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.validation import positive_int
from attn.kv.policy_layer import PolicyAttention
from attn.kv.score_eviction import (
    PER_HEAD_VALIDATORS,
    SCORE_OPTION_DOCS,
    BudgetPolicy,
    causal_visible,
    say_if_never_evicting,
)
from attn.registry import register

Array = jax.Array

HISTORY_BITS = 32  # bits of the uint32 per-slot history


def history_counts(history: Array, window: int) -> Array:
    """int32 [...]: the set bits among the lowest `window` bits of history uint32 [...] (the flags of the latest
    `window` steps)."""
    mask = jnp.uint32(0xFFFFFFFF if window >= HISTORY_BITS else (1 << window) - 1)
    return jax.lax.population_count(history & mask).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class ScissorhandsPolicy(BudgetPolicy):
    """Drop the `drop` (or more) entries most often below average attention over the latest `history` steps once the
    cache holds more than `budget`, sparing the `recent` latest tokens (see the module docstring)."""

    budget: int
    history: int
    recent: int
    drop: int
    stats = ("key_history",)

    def __post_init__(self):
        if not 1 <= self.history <= HISTORY_BITS:
            raise ValueError(f"history={self.history!r} must be in [1, {HISTORY_BITS}] (steps in one uint32 per slot)")
        if self.recent < 0 or self.drop < 1 or self.recent + self.drop > self.budget:
            raise ValueError(
                f"recent={self.recent!r} and drop={self.drop!r} must satisfy recent >= 0, drop >= 1 and "
                f"recent + drop <= budget={self.budget} (a full cache must hold drop entries outside the recent window)"
            )

    def observe(self, cands: cache_lib.Candidates, weights: Array) -> cache_lib.Candidates:
        """Shifts every entry's history by the chunk's L queries (weights [B, H, L, E]) and sets the bit of each query
        that gave the entry less than 1 / (entries it attends to), averaged over the kv head's query heads."""
        batch, heads, length, entries = weights.shape
        kv_heads = cands.positions.shape[1]
        q_pos = cands.index - length + jnp.arange(length, dtype=jnp.int32)
        seen = causal_visible(cands, jnp.broadcast_to(q_pos, (batch, length)))  # [B, KVH, L, E]
        mean = jnp.mean(weights.astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads, length, entries), 2)
        attended = jnp.sum(seen, axis=-1, keepdims=True)
        low = seen & (mean * attended < 1.0)  # a < 1 / t without dividing
        shift = length - 1 - jnp.arange(length)  # the chunk's last query is the latest step: bit 0
        kept = shift < HISTORY_BITS
        bits = jnp.where(
            kept, jnp.left_shift(jnp.uint32(1), jnp.minimum(shift, HISTORY_BITS - 1).astype(jnp.uint32)), 0
        )
        flags = jnp.sum(jnp.where(low, bits.astype(jnp.uint32)[:, None], jnp.uint32(0)), axis=2, dtype=jnp.uint32)
        older = cands.key_history << jnp.uint32(length) if length < HISTORY_BITS else jnp.zeros_like(cands.key_history)
        return cands.replace(key_history=older | flags)

    def keep(self, cands: cache_lib.Candidates) -> tuple[Array, Array]:
        counts = history_counts(cands.key_history, self.history)
        filled = jnp.sum(cands.valid, axis=-1, dtype=jnp.int32)  # [B, KVH]
        over = filled - self.budget
        dropped_count = jnp.where(over > 0, jnp.maximum(over, self.drop), 0)
        eligible = cands.valid & (cands.positions < cands.index - self.recent)
        # rank the eligible entries: the most low-attention steps first, ties the earlier entry first
        order = jnp.argsort(jnp.where(eligible, -counts, HISTORY_BITS + 1), axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1)
        dropped = eligible & (rank < dropped_count[..., None])
        return cache_lib.ordered_keep(cands.valid & ~dropped, self.capacity)


@register(
    "scissorhands",
    family="kv",
    paper="Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at Test Time",
    catalog=164,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="KV cache at a budget: drops, m at a time, the keys most often below average attention over a window",
    option_docs={
        **SCORE_OPTION_DOCS,
        "history": f"w: the latest decode steps whose low-attention flags are counted (1..{HISTORY_BITS})",
        "recent": "r: latest tokens never dropped",
        "drop": "m: entries dropped at once when the cache is over budget (then it refills)",
    },
    validators={**PER_HEAD_VALIDATORS, "history": positive_int, "drop": positive_int},
    fidelity="reconstructed",
    reference=(
        "arXiv 2305.17118 Sec. 4 (Algorithm 1: budget KV cache, Algorithm 2: compress by counts of attention below "
        "1/t over a history window, recent window spared, m dropped); no official code was released"
    ),
    has_attention_weights=True,
)
class ScissorhandsAttention(PolicyAttention):
    """Scissorhands: softmax attention whose decode cache holds at most `budget` entries per (batch, kv head),
    dropping the persistently unimportant ones. x [B, T, E] -> [B, T, E]."""

    budget: int = 256
    history: int = 32
    recent: int = 32
    drop: int = 32

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.cache_policy()  # history <= 32, recent + drop <= budget
        say_if_never_evicting(self, call, self.budget)

    def cache_policy(self) -> ScissorhandsPolicy:
        return ScissorhandsPolicy(budget=self.budget, history=self.history, recent=self.recent, drop=self.drop)
