"""`recycled`: Recycled Attention, decoding that alternates full attention with attention over the top-K keys of the
last full step (its attention pattern "recycled") plus the tokens generated since.

Paper: "Recycled Attention: Efficient inference for long-context language models" (Xu, Goyal, Choi, 2024, arXiv
2411.05787). Training-free: no parameters beyond the softmax layer's. The forward (decode=False) is causal softmax;
the method acts on decode calls (`attn.models.generate`), over a cache that keeps every token (`capacity` slots).

Per (batch row b, kv head g), with f = the position of the last query that ran full attention (-1 before any):

    a decode call whose queries are several tokens (a prompt or a chunk) or whose query p has p - f >= stride is a
    full step: every query attends causally to every cached token; afterwards
        m_j = sum_{h in group g} a_{h, last query, j}          the last query's attention, per kv head
        f   = the last query's position
    any other call (one token at p, p - f < stride) is a recycled step: the query attends to
        { j <= f : m_j among the top_k largest of { m_j' : j' <= f } }  U  { j : f < j <= p }

(top_k ties keep the earlier token.) stride = 1 makes every step full, and top_k >= the context keeps every token:
both reduce decoding to causal `softmax` exactly (tests/sparse/test_recycled.py).

Fidelity (spec "paper"): the fixed schedule (a full step every `stride` generated tokens) and the recycled set (the
top-K most attended tokens of the last full step, plus the newly generated tokens, in a second cache) follow the
paper's description (Sec. 3); the paper's query-similarity schedule and continued pre-training are not reproduced.
The paper keeps one top-K set per query head; here a kv head's query heads share one (their attention summed, the
convention of this library's cache policies, `attn.core.cache`), which is the paper's choice for GQA models only
when they aggregate the group (not verified: no official code was found). The recycled step is computed on the
dense per-head mask of the cache protocol (exact, but it reads every cached key: the method's saving in data
movement is not realized on this path).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS
from attn.core.validation import choice, optional, positive_int
from attn.kv.policy_layer import POLICY_OPTION_DOCS, PolicyAttention
from attn.kv.score_eviction import causal_visible, top_k_mask
from attn.registry import register

Array = jax.Array

_LAST_FULL = "recycled_from"  # side state: int32 [B], position of the last query that ran full attention


def full_step(q_positions: Array, last_full: Array, stride: int) -> Array:
    """bool [B]: whether the decode call with queries at q_positions int [B, Tq] runs full attention (several
    queries, or the query at least `stride` positions after the last full step at last_full int [B])."""
    if q_positions.shape[1] > 1:
        return jnp.ones(q_positions.shape[:1], bool)
    return q_positions[:, 0] - last_full >= stride


@dataclasses.dataclass(frozen=True)
class RecycledPolicy(cache_lib.CachePolicy):
    """Keep every token; full steps see all of them, recycled steps the top_k of the last full step's attention
    (key_mass) and the tokens after it. `last_full` int32 [B] is the layer's side state."""

    slots: int
    top_k: int
    stride: int
    last_full: Any
    stats = ("key_mass",)

    @property
    def capacity(self) -> int:
        return self.slots

    def visible(self, cands: cache_lib.Candidates, q_positions: Array) -> Array:
        causal = causal_visible(cands, q_positions)  # [B, KVH, Tq, E]
        full = full_step(q_positions, self.last_full, self.stride)  # [B]
        old = cands.valid & (cands.positions <= self.last_full[:, None, None])
        recycled = top_k_mask(cands.key_mass, old, self.top_k) | (cands.positions > self.last_full[:, None, None])
        return causal & (full[:, None, None, None] | recycled[:, :, None, :])

    def observe(self, cands: cache_lib.Candidates, weights: Array) -> cache_lib.Candidates:
        """Full steps: key_mass = the last query's weights [B, H, Tq, E] summed over each kv head's query heads;
        recycled steps leave it (the chunk's entries get 0, never read before the next full step)."""
        length = weights.shape[2]
        q_positions = cands.index - length + jnp.arange(length, dtype=jnp.int32)
        full = full_step(jnp.broadcast_to(q_positions, (weights.shape[0], length)), self.last_full, self.stride)
        mass = cache_lib.kv_head_mass(weights[:, :, -1, :].astype(jnp.float32), cands.positions.shape[1])
        return cands.replace(key_mass=jnp.where(full[:, None, None], mass, cands.key_mass))

    def keep(self, cands: cache_lib.Candidates) -> tuple[Array, Array]:
        return cache_lib.ordered_keep(cands.valid, self.capacity)


@register(
    "recycled",
    family="sparse",
    paper="Recycled Attention: Efficient inference for long-context language models",
    catalog=155,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="decoding alternates full attention (every stride tokens) with attention over the top_k keys of the last "
    "full step plus the tokens since; the forward is causal softmax",
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        **POLICY_OPTION_DOCS,
        "window": "must be None (the cache policy decides what is seen)",
        "capacity": "cache slots: the longest prompt plus generation (every token is kept)",
        "top_k": "keys recycled from the last full step, per kv head",
        "stride": "a full-attention step every stride generated tokens (1: always full)",
    },
    validators={
        **SOFTMAX_VALIDATORS,
        "capacity": positive_int,
        "top_k": positive_int,
        "stride": positive_int,
        "cache_bits": optional(choice(4, 8)),
    },
    fidelity="paper",
    reference="arXiv 2411.05787 (Sec. 3: alternating full and recycled steps on a fixed stride, top-K most attended "
    "tokens of the last full step, newly generated tokens added to the recycled cache); no official code found",
    has_attention_weights=True,
)
class RecycledAttention(PolicyAttention):
    """Recycled Attention: causal softmax; while decoding, steps between full ones attend to the recycled top_k keys
    and the tokens since the last full step. x [B, T, E] -> [B, T, E]."""

    capacity: int = 4096
    top_k: int = 256
    stride: int = 8

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.decode and cache_lib.load(self) is None and call.x.shape[1] > self.capacity:
            raise ValueError(
                f"capacity={self.capacity} is below the length {call.x.shape[1]} of the creating decode call; recycled "
                "keeps every token, so capacity must be at least the prompt plus the generated length"
            )

    def cache_policy(self) -> RecycledPolicy:
        last_full = self.get_variable("cache", _LAST_FULL)
        return RecycledPolicy(slots=self.capacity, top_k=self.top_k, stride=self.stride, last_full=last_full)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The policy layer's prepare; the creating decode call also creates the side state (no full step yet)."""
        if call.decode and not self.has_variable("cache", _LAST_FULL):
            self.put_variable("cache", _LAST_FULL, jnp.full((q.shape[0],), -1, jnp.int32))
        return super().prepare(q, k, v, call)

    def policy_attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """The policy's decode call, then the side state: f = the last query's position after a full step."""
        last_full = self.get_variable("cache", _LAST_FULL)
        y = super().policy_attend(q, k, v, call)
        full = full_step(call.q_positions, last_full, self.stride)
        self.put_variable("cache", _LAST_FULL, jnp.where(full, call.q_positions[:, -1], last_full).astype(jnp.int32))
        return y
