"""Ada-KV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference", arXiv 2407.11550) on SnapKV's scores (attn/kv/snapkv.py): the layer's budget of n b prompt keys (n kv
heads, b = budget - w) is shared among its heads by a top-k over every head's scores jointly, so a head whose
attention is concentrated gives slots to one whose attention is spread.

    s_{g, j}   SnapKV's pooled votes of the last w queries for key j in kv head g                  (j < P - w)
    m_g        = |{ j : s_{g, j} among the n b largest of all s }|                          (sum_g m_g = n b)
    b_g        = round(m_g (1 - alpha) + floor(alpha b))                 (the official code's floor_alpha safeguard)
    kept_g     = top_{b_g}(s_g) + the last w prompt tokens            if P >= budget (else every prompt token)

This is the official code's Ada-SnapKV (`AdaptiveSnapKVCluster.update_kv`; GQA as its gqa_support with
gqa_func="mean", scores averaged over the query heads of a kv head before pooling), without its optional
`normalize` reweighting, layer `skip` and pyramid mode. Ties of the joint top-k go to the lower head, then the
earlier key; rounding is half to even as torch.round.

Memory: heads keep ragged counts b_g + w (`cache_lengths` [B, KVH]), about n (b + w) entries per layer in all.
The cache protocol stores them in one [B, C, KVH, D] array with per-head lengths, so C must hold the largest head
the rule allows: C = round(n b (1 - alpha)) + floor(alpha b) + w + decode_budget (n the layer's kv heads; alpha = 1
gives SnapKV's budget + decode_budget). The official code packs the heads back to back for varlen flash attention,
which holds exactly the kept entries; a packed store is not part of the cache protocol yet. Decoding is SnapKV's
(append, then a sliding window after the prompt's selection).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attn.core.validation import in_range
from attn.kv.snapkv import SNAPKV_OPTION_DOCS, SNAPKV_VALIDATORS, SnapKVAttention, SnapKVPolicy, descending_rank
from attn.registry import register

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AdaKVPolicy(SnapKVPolicy):
    """SnapKV's selection with head-wise budgets from a joint top-k (see the module docstring)."""

    kv_heads: int = 1
    floor_alpha: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.floor_alpha <= 1.0:
            raise ValueError(f"floor_alpha={self.floor_alpha} must lie in [0, 1]")

    @property
    def floor_capacity(self) -> int:
        return int((self.budget - self.window) * self.floor_alpha)

    def compresses(self, prompt_length: Array) -> Array:
        return prompt_length >= self.budget  # the official code compresses once b <= P - w

    def prefix_budget(self, prompt_length: Array, scores: Array, prefix: Array) -> Array:
        """int32 [B, KVH]: b_g from the joint top-k of scores [B, KVH, E] (-inf outside the prefix)."""
        batch, kv_heads, entries = scores.shape
        layer_budget = kv_heads * (self.budget - self.window)
        joint = descending_rank(scores.reshape(batch, kv_heads * entries)) < layer_budget
        selected = jnp.sum(joint.reshape(batch, kv_heads, entries), axis=-1, dtype=jnp.int32)
        mixed = selected.astype(jnp.float32) * (1.0 - self.floor_alpha) + self.floor_capacity
        return jnp.round(mixed).astype(jnp.int32)

    @property
    def prefix_capacity(self) -> int:
        layer_budget = self.kv_heads * (self.budget - self.window)
        return int(round(layer_budget * (1.0 - self.floor_alpha) + self.floor_capacity))


@register(
    "adakv",
    family="kv",
    paper="Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
    catalog=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="SnapKV's prompt selection with head-wise budgets from a joint top-k over the layer's heads (ragged)",
    option_docs={
        **SNAPKV_OPTION_DOCS,
        "budget": "average prompt entries kept per (batch, kv head), window included (base_capacity)",
        "floor_alpha": "share of the average budget every head keeps at least (the official floor_alpha)",
    },
    validators={**SNAPKV_VALIDATORS, "floor_alpha": in_range(0.0, 1.0)},
    fidelity="official-code",
    reference=(
        "arXiv 2407.11550 (adaptive budget allocation by a joint top-k); "
        "github.com/FFY0/AdaKV adaptive_snapkv/monkeypatch/snapkv_utils.py "
        "(AdaptiveSnapKVCluster.update_kv_gqa, calcul_attn_sore)"
    ),
    has_attention_weights=True,
)
class AdaKVAttention(SnapKVAttention):
    """Ada-KV: SnapKV with head-wise adaptive budgets. x [B, T, E] -> [B, T, E]; cache [B, C, KVH, D] with ragged
    per-head lengths (C from the module docstring)."""

    floor_alpha: float = 0.2

    def cache_policy(self) -> AdaKVPolicy:
        return AdaKVPolicy(
            budget=self.budget,
            window=self.observation_window,
            kernel_size=self.kernel_size,
            pooling=self.pooling,
            decode_budget=self.decode_budget,
            kv_heads=self.kv_heads,
            floor_alpha=self.floor_alpha,
        )
