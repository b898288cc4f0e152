"""EMS [173] (Li et al. 2024, "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on
Global-Local Importance"), reconstructed: each (batch, kv head) ranks its entries by a Global-Local score, keeps the
`recent` latest tokens and the best-scored others up to its budget, then merges every evicted entry that is redundant
with a kept one (similar key and value) into that entry, score-weighted, and drops the rest (the "zero class").

After each decode call (queries at positions n-L..n-1, n = tokens seen), per (batch, kv head), a_{h,i,j} the attention
query i of query head h pays entry j (summed over the kv head's query heads, as H2O):

    m_j   <-  m_j + sum_{i, h} a_{h,i,j}                                  global: accumulated attention
    r_j   <-  g^L r_j + sum_{i, h} g^(n-1-p_i) a_{h,i,j}          local: attention of recent queries, g = decay
    G_j    =  m_j / (n - p_j)                   mean attention per query that has seen j (no causal-mask bias)
    s_j    =  G_j / mean_k G_k  +  r_j / mean_k r_k                        mean-aligned Global-Local score
    keep   =  {j : p_j >= n - R}  union  top_{B-R} {s_j : p_j < n - R}       B = budget, R = recent
    for every evicted e:   rho_e = max_{c kept} cos(K_e, K_c) cos(V_e, V_c),   c_e its argmax
    merged = {e : rho_e >= tau}            (the others join the zero class: dropped)
    K_c   <-  (s_c K_c + sum_{e merged into c} s_e K_e) / (s_c + sum_e s_e)      and V alike; m_c, r_c add theirs

Means run over the candidates (kept entries and the chunk); s uses max(., 1e-6) in the weights so an entry nobody
attended keeps its own key. Per-head: every kv head has its own scores, kept set and merges (the cache stores per-head
positions), so how many entries a head merges or drops depends on its own redundancy. Time per decode call
O((B + L)^2 D) for the redundancy matrix (O(B D) per token for attention); memory B entries per head plus two
float32 statistics per entry (key_mass, key_recent).

Fidelity: reconstructed. Available: the abstract (arXiv 2412.08521; Global-Local score from accumulated attention of
global and local tokens, head-wise evict-then-merge for sparsity and redundancy, a zero-class mechanism for parallel
compression) and the ICLR 2025 OpenReview reviews, which describe the score as the mean-aligned sum of a global and a
local accumulated score, three classes of tokens per head (important: kept; to be merged into class centres by
similarity; irrelevant: merged into a zero class), and redundancy as the product of key and value cosine
similarities. Not available (the arXiv HTML held in the search store gave only its front matter; no official code
found): the exact normalisation of the global score, the local window's form (here an exponentially decayed sum,
`decay`), the merge weights (here the Global-Local scores), the per-head budget allocation (here one budget per
head) and the threshold value. budget >= the generated length keeps everything: decoding is causal softmax attention.
The forward (decode=False) is causal softmax attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import pipeline
from attn.core.layer import AttentionCall
from attn.core.validation import choice, in_range
from attn.kv.d2o import kept_mask
from attn.kv.policy_layer import PolicyAttention
from attn.kv.score_eviction import (
    PER_HEAD_VALIDATORS,
    SCORE_OPTION_DOCS,
    BudgetPolicy,
    say_if_never_evicting,
    top_k_mask,
)
from attn.registry import register

Array = jax.Array


def global_local_score(cands: cache_lib.Candidates) -> Array:
    """s float32 [B, KVH, E]: the mean-aligned Global-Local score of every candidate (0 where invalid)."""
    seen = jnp.maximum(cands.index - cands.positions, 1).astype(jnp.float32)
    glo = jnp.where(cands.valid, cands.key_mass / seen, 0.0)
    loc = jnp.where(cands.valid, cands.key_recent, 0.0)
    count = jnp.maximum(jnp.sum(cands.valid, axis=-1, keepdims=True), 1)

    def aligned(x: Array) -> Array:
        return x / jnp.maximum(jnp.sum(x, axis=-1, keepdims=True) / count, 1e-12)

    return aligned(glo) + aligned(loc)


def unit(x: Array) -> Array:
    """x [B, E, KVH, D] -> float32 [B, KVH, E, D] of unit rows."""
    x = jnp.swapaxes(x.astype(jnp.float32), 1, 2)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def merge_redundant(
    cands: cache_lib.Candidates, kept: Array, score: Array, threshold: float
) -> tuple[Array, Array, Array, Array]:
    """EMS's evict-then-merge: (keys, values, key_mass, key_recent) of the candidates after every evicted entry whose
    redundancy with its best kept entry reaches `threshold` is folded into it, weighted by the scores (see the module
    docstring). kept bool [B, KVH, E]; score float32 [B, KVH, E]."""
    evicted = cands.valid & ~kept
    redundancy = jnp.einsum("bged,bgkd->bgek", unit(cands.keys), unit(cands.keys))
    redundancy = redundancy * jnp.einsum("bged,bgkd->bgek", unit(cands.values), unit(cands.values))
    redundancy = jnp.where(kept[:, :, None, :], redundancy, -jnp.inf)
    best, target = jnp.max(redundancy, axis=-1), jnp.argmax(redundancy, axis=-1)  # [B, KVH, E]
    merged = evicted & (best >= threshold)
    entries = cands.valid.shape[-1]
    assign = ((target[..., None] == jnp.arange(entries)) & merged[..., None]).astype(jnp.float32)  # [B, KVH, e, c]
    weight = jnp.maximum(score, 1e-6)
    total = weight + jnp.einsum("bgec,bge->bgc", assign, weight)  # own weight + the merged partners'

    def fold(x: Array) -> Array:
        xf = jnp.swapaxes(x.astype(jnp.float32), 1, 2)  # [B, KVH, E, D]
        summed = weight[..., None] * xf + jnp.einsum("bgec,bge,bged->bgcd", assign, weight, xf)
        folded = jnp.where(kept[..., None], summed / total[..., None], xf)
        return jnp.swapaxes(folded, 1, 2).astype(x.dtype)

    def add(stat: Array) -> Array:
        return jnp.where(kept, stat + jnp.einsum("bgec,bge->bgc", assign, stat), stat)

    return fold(cands.keys), fold(cands.values), add(cands.key_mass), add(cands.key_recent)


@dataclasses.dataclass(frozen=True)
class EMSPolicy(BudgetPolicy):
    """Keep the `recent` latest tokens and the `budget - recent` others with the best Global-Local score, per (batch,
    kv head); merge redundant evicted entries (redundancy >= `threshold`) into kept ones (see the module docstring)."""

    budget: int
    recent: int
    decay: float = 0.9
    threshold: float = 0.5
    stats = ("key_mass", "key_recent")

    def __post_init__(self):
        if not 0 <= self.recent <= self.budget:
            raise ValueError(f"recent={self.recent!r} must be in [0, budget={self.budget}]")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay={self.decay!r} must be in [0, 1)")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} must be in [-1, 1] (a product of two cosines)")

    def observe(self, cands: cache_lib.Candidates, weights: Array) -> cache_lib.Candidates:
        """m += the call's attention; r <- decay^L r + its decayed attention (weights [B, H, L, E], query heads)."""
        kv_heads, length = cands.positions.shape[1], weights.shape[2]
        mass = cache_lib.kv_head_mass(pipeline.key_mass(weights), kv_heads)
        age = jnp.arange(length - 1, -1, -1, dtype=jnp.float32)
        decayed = weights.astype(jnp.float32) * (self.decay**age)[:, None]
        recent = cache_lib.kv_head_mass(pipeline.key_mass(decayed), kv_heads)
        return cands.replace(key_mass=cands.key_mass + mass, key_recent=cands.key_recent * self.decay**length + recent)

    def keep(self, cands: cache_lib.Candidates) -> tuple[Array, Array]:
        recent = cands.valid & (cands.positions >= cands.index - self.recent)
        important = top_k_mask(global_local_score(cands), cands.valid & ~recent, self.budget - self.recent)
        return cache_lib.ordered_keep(recent | important, self.capacity)

    def merge(self, cands: cache_lib.Candidates, indices: Array, counts: Array) -> cache_lib.Candidates:
        kept = kept_mask(indices, counts, cands.valid.shape[-1])
        keys, values, mass, recent = merge_redundant(cands, kept, global_local_score(cands), self.threshold)
        return cands.replace(keys=keys, values=values, stored_keys=keys, stored_values=values, key_mass=mass,
                             key_recent=recent)  # fmt: skip


@register(
    "ems",
    family="kv",
    paper=(
        "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local Importance"
    ),
    catalog=173,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="head-wise KV cache: Global-Local scores pick what stays; redundant evicted entries merge into kept ones",
    option_docs={
        **SCORE_OPTION_DOCS,
        "cache_bits": "must be None (merged entries are stored in the layer's dtype)",
        "recent": "latest tokens always kept; the other budget - recent slots hold the best Global-Local scores",
        "decay": "forgetting factor of the local score (attention of recent queries), in [0, 1)",
        "threshold": "an evicted entry merges when cos(K) cos(V) with its closest kept entry reaches it, in [-1, 1]",
    },
    validators={
        **PER_HEAD_VALIDATORS,
        "cache_bits": choice(None),
        "decay": in_range(0.0, 1.0, high_inclusive=False),
        "threshold": in_range(-1.0, 1.0),
    },
    fidelity="reconstructed",
    reference=(
        "arXiv 2412.08521 abstract; ICLR 2025 OpenReview reviews (mean-aligned global + local scores, three token "
        "classes per head, zero class, redundancy = cos(K) cos(V)); method text and official code not available: "
        "score normalisation, local window, merge weights and per-head allocation are this file's choices"
    ),
    has_attention_weights=True,
)
class EMSAttention(PolicyAttention):
    """EMS: softmax attention whose decode cache keeps `recent` latest + `budget - recent` best Global-Local entries
    per (batch, kv head), redundant evicted entries merged into them. x [B, T, E] -> [B, T, E]; cache
    [B, budget, KVH, D]."""

    budget: int = 256
    recent: int = 32
    decay: float = 0.9
    threshold: float = 0.5

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.cache_policy()  # recent <= budget, decay and threshold in range
        say_if_never_evicting(self, call, self.budget)

    def cache_policy(self) -> EMSPolicy:
        return EMSPolicy(budget=self.budget, recent=self.recent, decay=self.decay, threshold=self.threshold)
