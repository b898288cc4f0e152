"""What the policies that evict by attention scores share (`h2o`, `a2sf`, `tova`): the causal view of the candidates,
the top-k choice among eligible entries, and the heavy-hitter-plus-recent-window policy with a forgetting factor.

Heavy hitters plus a recent window, per (batch, kv head), after each decode call that brings queries at positions
n-L..n-1 (n = tokens seen):

    s_j   <-  f^L s_j + sum_i f^(n-1-p_i) sum_{h in group} a_{h,i,j}         (s_j = 0 when token j arrives)
    keep  =   {j : j >= n - R}  union  top_{K-R} {s_j : j < n - R}           K = budget, R = recent

a_{h,i,j} is the attention query i of head h pays entry j (the entries it sees: the kept ones and the chunk up to
itself). f = 1 is H2O's accumulated attention; 0 <= f < 1 is A2SF's forgetting factor (the paper's
A_{n,k} = sum_q f^(n-q) S_{q,k}). Ties keep the earlier entry.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import pipeline
from attn.core.intervention_state import log_once
from attn.core.layer import AttentionCall
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS
from attn.core.validation import choice, non_negative_int, optional, positive_int
from attn.kv.policy_layer import POLICY_OPTION_DOCS, PolicyAttention

Array = jax.Array


def causal_visible(cands: cache_lib.Candidates, q_positions: Array) -> Array:
    """bool [B, KVH, Tq, E]: every filled entry not after the query (queries at q_positions [B, Tq])."""
    return cands.valid[:, :, None, :] & (cands.positions[:, :, None, :] <= q_positions[:, None, :, None])


@dataclasses.dataclass(frozen=True)
class BudgetPolicy(cache_lib.CachePolicy):
    """A policy whose cache holds `budget` entries per (batch, kv head) (the subclass declares the `budget` field) and
    whose queries see every kept entry not after them."""

    @property
    def capacity(self) -> int:
        return self.budget

    def visible(self, cands: cache_lib.Candidates, q_positions: Array) -> Array:
        return causal_visible(cands, q_positions)


def say_if_never_evicting(layer: PolicyAttention, call: AttentionCall, budget: int) -> None:
    """Logs once when the creating decode call (x [B, T, E]: T is the longest sequence the cache is made for) fits in
    `budget`: such a cache keeps every token, and decoding is causal softmax attention."""
    if call.decode and cache_lib.load(layer) is None and call.x.shape[1] <= budget:
        name = layer.registry_name or type(layer).__name__
        log_once(name, f"budget={budget} >= length {call.x.shape[1]} of the cache: nothing is evicted (full attention)")


def top_k_mask(score: Array, eligible: Array, k: int) -> Array:
    """bool [B, KVH, E]: the (at most) k eligible entries (eligible bool [B, KVH, E]) with the highest score float
    [B, KVH, E]; equal scores keep the earlier entry."""
    if k <= 0:
        return jnp.zeros_like(eligible)
    ranked = jnp.where(eligible, score, -jnp.inf)
    top = jax.lax.top_k(ranked, k)[1]  # [B, KVH, k], ties: lower index first
    batch, heads = jnp.indices(top.shape[:2])
    chosen = jnp.zeros_like(eligible).at[batch[..., None], heads[..., None], top].set(True)
    return chosen & eligible


@dataclasses.dataclass(frozen=True)
class HeavyRecentPolicy(BudgetPolicy):
    """Keep the `recent` latest tokens and the `budget - recent` older entries with the highest accumulated
    attention, per (batch, kv head), the score decayed by `forgetting` per query (see the module docstring)."""

    budget: int
    recent: int
    forgetting: float = 1.0
    stats = ("key_mass",)

    def __post_init__(self):
        if not 0 <= self.recent <= self.budget:
            raise ValueError(f"recent={self.recent!r} must be in [0, budget={self.budget}]")
        if not 0.0 <= self.forgetting <= 1.0:
            raise ValueError(f"forgetting={self.forgetting!r} must be in [0, 1]")

    def observe(self, cands: cache_lib.Candidates, weights: Array) -> cache_lib.Candidates:
        """s <- f^L s + sum_i f^(L-1-i) a_i over the chunk's L queries (weights [B, H, L, E])."""
        length = weights.shape[2]
        if self.forgetting != 1.0:
            age = jnp.arange(length - 1, -1, -1, dtype=jnp.float32)
            weights = weights * (self.forgetting**age)[:, None].astype(weights.dtype)
        mass = cache_lib.kv_head_mass(pipeline.key_mass(weights), cands.positions.shape[1])
        return cands.replace(key_mass=cands.key_mass * self.forgetting**length + mass)

    def keep(self, cands: cache_lib.Candidates) -> tuple[Array, Array]:
        recent = cands.valid & (cands.positions >= cands.index - self.recent)
        heavy = top_k_mask(cands.key_mass, cands.valid & ~recent, self.budget - self.recent)
        return cache_lib.ordered_keep(recent | heavy, self.capacity)


# Options every score-evicting layer shares. Heads that keep different entries cannot share one position bias (the
# layer reads the first kv head's positions for a bias), so per-head policies take RoPE or no positions.
SCORE_OPTION_DOCS = {
    **SOFTMAX_OPTION_DOCS,
    **POLICY_OPTION_DOCS,
    "window": "must be None (the policy decides what is seen)",
    "budget": "cache entries per (batch, kv head)",
}
SCORE_VALIDATORS = {
    **SOFTMAX_VALIDATORS,
    "budget": positive_int,
    "cache_bits": optional(choice(4, 8)),
}
# Heads keep different entries: bias positions (ALiBi, T5, Shaw) read each kv head's own
# (PolicyAttention.per_head_bias).
PER_HEAD_VALIDATORS = {**SCORE_VALIDATORS, "recent": non_negative_int}
