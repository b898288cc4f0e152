"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469): at the
prefill, the last `observation_window` prompt queries vote for the earlier prompt keys, and each head keeps the
keys with the most votes plus the observation window itself.

    votes_j   = 1/(w G) sum_{i in last w queries} sum_{g in group} softmax_j(q_i^g . k_j / sqrt(D))     j < P - w
    score_j   = pool_{|j' - j| <= kernel_size // 2} votes_j'         (max or average, stride 1, zero / -inf padding)
    kept      = top_{budget - w}(score) per kv head  +  the last w prompt tokens                         if P > budget
    kept      = every prompt token                                                                       if P <= budget

P is the prompt length (the tokens of the first decode call on an empty cache), w = observation_window, G the query
heads of a kv head (GQA: the mean of the group's votes before pooling, Ada-KV's `gqa_support` with gqa_func="mean";
the official code repeats the kv heads and selects per query head, which stores G copies). The votes are the
softmax weights of the layer's own logits (RoPE, scale, softcap, bias), as the official code recomputes them for
the window. Pooling as torch's avg_pool1d / max_pool1d with padding kernel_size // 2 (odd kernel: one score per
key; average pooling divides by kernel_size at the edges, count_include_pad). Ties go to the earlier key.

Decoding appends (the paper's generation phase) into `decode_budget` slots after the prompt's `budget`: the cache
is allocated at capacity = budget + decode_budget per (batch, kv head), never at the generated length. Once those
slots are full, the cache keeps its first capacity - w - decode_budget entries (the prompt's selection) and the
latest w + decode_budget tokens, so memory stays at the capacity. The prompt must arrive in one decode call (as
`attn.models.generate` sends it); a prompt split over calls is compressed at its first call only.

Per-head selection gives every kv head its own kept positions (`cache_positions` [B, KVH, C]); RoPE rotates each key
at its original position, as the official code caches rotated keys. Position biases (ALiBi, T5, Shaw) read one
head's positions and are exact only for a policy that keeps the same entries in every head, so this layer takes
position "rope" or "none".

The forward (decode=False) is causal softmax attention over the whole sequence: the prefill attends to the full
prompt before compressing. A prompt of at most `budget` tokens followed by at most `decode_budget` generated tokens
decodes exactly as full attention. Cost: the prefill's explicit weights O(P^2 H) (the selection itself
O(P log P) per head); a decode step O(capacity).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS
from attn.core.validation import choice, non_negative_int, optional, positive_int
from attn.kv.policy_layer import POLICY_OPTION_DOCS, PolicyAttention
from attn.registry import register

Array = jax.Array

POOLINGS = ("max", "avg")
# Bias positions read one head's positions; per-head selections keep different positions in every head.
PER_HEAD_POSITIONS = ("rope", "none")


def pool_scores(scores: Array, include: Array, kernel_size: int, pooling: str) -> Array:
    """scores float32 [..., E] pooled along E over the entries where include bool [..., E] (the others count as
    padding: 0 for "avg", which always divides by kernel_size, -inf for "max"), window kernel_size centred on each
    entry, stride 1 -> float32 [..., E] (torch's avg_pool1d / max_pool1d with padding kernel_size // 2)."""
    pad = kernel_size // 2
    dims = (1,) * (scores.ndim - 1) + (kernel_size,)
    padding = ((0, 0),) * (scores.ndim - 1) + ((pad, pad),)
    strides = (1,) * scores.ndim
    if pooling == "avg":
        summed = jax.lax.reduce_window(jnp.where(include, scores, 0.0), 0.0, jax.lax.add, dims, strides, padding)
        return summed / kernel_size
    return jax.lax.reduce_window(jnp.where(include, scores, -jnp.inf), -jnp.inf, jax.lax.max, dims, strides, padding)


def descending_rank(scores: Array) -> Array:
    """int32 [..., E]: the rank of every entry when sorted by scores [..., E] in descending order (ties: the earlier
    entry first)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SnapKVPolicy(cache_lib.CachePolicy):
    """SnapKV's prompt selection (see the module docstring). Subclasses change how many prompt keys each head keeps
    (`prefix_budget`) and the capacity that holds the largest selection (`prefix_capacity`)."""

    budget: int
    window: int
    kernel_size: int
    pooling: str
    decode_budget: int

    stats = ("key_mass",)

    def __post_init__(self):
        if not 0 < self.window < self.budget:
            raise ValueError(
                f"observation_window={self.window} must be in [1, budget={self.budget}) (budget counts the window)"
            )
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} must be odd (one pooled score per key)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} must be one of {POOLINGS}")

    # ------------------------------------------------------------------ what a variant changes
    def prefix_budget(self, prompt_length: Array, scores: Array, prefix: Array) -> Array:
        """int32, broadcastable to [B, KVH]: prompt keys kept per head before the window, for a prompt of
        prompt_length > budget tokens (scores [B, KVH, E] and prefix bool [B, KVH, E]: the pooled votes and the
        keys before the window)."""
        return jnp.asarray(self.budget - self.window, jnp.int32)

    @property
    def prefix_capacity(self) -> int:
        """The most prompt keys a head keeps before the window."""
        return self.budget - self.window

    def compresses(self, prompt_length: Array) -> Array:
        """bool []: whether a prompt of this length is compressed (SnapKV: longer than the budget)."""
        return prompt_length > self.budget

    # ------------------------------------------------------------------ the protocol
    @property
    def capacity(self) -> int:
        return max(self.budget, self.prefix_capacity + self.window) + self.decode_budget

    @staticmethod
    def is_prefill(cands: cache_lib.Candidates) -> Array:
        """bool []: this call is the first on an empty cache (its chunk holds every token seen)."""
        return cands.index == cands.valid.shape[-1] - cands.capacity

    def prefix(self, cands: cache_lib.Candidates) -> Array:
        """bool [B, KVH, E]: the prompt keys before the observation window."""
        return cands.valid & (cands.positions < cands.index - self.window)

    def visible(self, cands: cache_lib.Candidates, q_positions: Array) -> Array:
        return cands.valid[:, :, None, :] & (cands.positions[:, :, None, :] <= q_positions[:, None, :, None])

    def observe(self, cands: cache_lib.Candidates, weights: Array) -> cache_lib.Candidates:
        """At the prefill, key_mass = the pooled votes of the last `window` queries of weights [B, H, Tq, E] for the
        keys before the window (0 elsewhere); later calls leave the stored votes as they are."""
        kv_heads = cands.positions.shape[1]
        group = weights.shape[1] // kv_heads
        window = weights[:, :, -self.window :].astype(jnp.float32)  # the chunk's last queries are the latest tokens
        votes = cache_lib.kv_head_mass(jnp.sum(window, axis=2), kv_heads) / (self.window * group)
        prefix = self.prefix(cands)
        scores = jnp.where(prefix, pool_scores(votes, prefix, self.kernel_size, self.pooling), 0.0)
        return cands.replace(key_mass=jnp.where(self.is_prefill(cands), scores, cands.key_mass))

    def keep(self, cands: cache_lib.Candidates) -> tuple[Array, Array]:
        prefix = self.prefix(cands)
        scores = jnp.where(prefix, cands.key_mass, -jnp.inf)
        count = self.prefix_budget(cands.index, scores, prefix)
        chosen = prefix & (descending_rank(scores) < jnp.asarray(count)[..., None])
        at_prefill = cands.valid & (~prefix | chosen | ~self.compresses(cands.index))
        # decoding: the prompt's selection (the first slots) stays, the latest tokens slide through the rest
        recent = self.window + self.decode_budget
        slot = jnp.cumsum(cands.valid, axis=-1)
        decoding = cands.valid & ((slot <= self.capacity - recent) | (cands.positions >= cands.index - recent))
        return cache_lib.ordered_keep(jnp.where(self.is_prefill(cands), at_prefill, decoding), self.capacity)


SNAPKV_OPTION_DOCS = {
    **SOFTMAX_OPTION_DOCS,
    **POLICY_OPTION_DOCS,
    "position": "rope or none (per-head selections keep different positions in every head)",
    "window": "must be None (the policy decides what is seen)",
    "budget": "prompt entries kept per (batch, kv head), the observation window included (max_capacity_prompt)",
    "observation_window": "the last prompt queries that vote, kept whole (window_size)",
    "kernel_size": "odd width of the pooling over neighbouring keys' votes",
    "pooling": "max or avg pooling of the votes",
    "decode_budget": "cache slots for generated tokens after the prompt's budget (then a sliding window)",
}

SNAPKV_VALIDATORS = {
    **SOFTMAX_VALIDATORS,
    "position": choice(*PER_HEAD_POSITIONS),
    "budget": positive_int,
    "observation_window": positive_int,
    "kernel_size": positive_int,
    "pooling": choice(*POOLINGS),
    "decode_budget": non_negative_int,
    "cache_bits": optional(choice(4, 8)),
}


@register(
    "snapkv",
    family="kv",
    paper="SnapKV: LLM Knows What You are Looking for Before Generation",
    catalog=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="prompt KV cache compressed per head by the votes of an observation window, pooled, top-k",
    option_docs=SNAPKV_OPTION_DOCS,
    validators=SNAPKV_VALIDATORS,
    fidelity="official-code",
    reference=(
        "arXiv 2404.14469 (observation-window voting, pooling, top-k per head); "
        "github.com/FasterDecoding/SnapKV snapkv/monkeypatch/snapkv_utils.py "
        "(SnapKVCluster.update_kv); GQA as github.com/FFY0/AdaKV adaptive_snapkv/monkeypatch/snapkv_utils.py "
        "(gqa_support, gqa_func='mean')"
    ),
    has_attention_weights=True,
)
class SnapKVAttention(PolicyAttention):
    """SnapKV: softmax attention whose prompt cache keeps, per kv head, the keys the observation window votes for.
    x [B, T, E] -> [B, T, E]; cache [B, budget + decode_budget, KVH, D]."""

    budget: int = 1024
    observation_window: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    decode_budget: int = 256

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.cache_policy()  # window < budget, odd kernel

    def cache_policy(self) -> SnapKVPolicy:
        return SnapKVPolicy(
            budget=self.budget,
            window=self.observation_window,
            kernel_size=self.kernel_size,
            pooling=self.pooling,
            decode_budget=self.decode_budget,
        )
