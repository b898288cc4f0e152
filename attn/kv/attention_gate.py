"""Attention-Gate [154] (Zeng et al. 2024, "In-context KV-Cache Eviction for LLMs via Attention-Gate"),
reconstructed: a small attention module (the gate, MHA' with `gate_heads` heads of `gate_dim`) reads the layer's input
and gives every token one eviction flag per kv head; the layer attends as usual except that a flagged token is seen
only by its own query, and the decode cache stores the unflagged tokens only.

    g_t    =  W_o MHA'(x)_t + b_o                  logits float32 [KVH] per token (causal attention inside the gate)
    keep_t =  g_t > 0              (sigmoid(g_t) > 1/2; flagged = evicted = not keep_t)
    a_ij   =  f_j exp(l_ij) / sum_{k <= i} f_k exp(l_ik)      f_j = keep_j for j < i, f_i = 1   (query i, key j)

Training (decode=False) uses the straight-through estimate f = keep + s - stop_gradient(s), s = sigmoid(g): the
forward is the hard eviction, the gradient reaches the gate through s. The eviction loss, sown as
"losses"/"attention_gate" (the trainer adds it to the LM loss), pulls the mean soft eviction rate towards
`target_rate`:  L_evict = (mean_{b, t, g} (1 - s) - target_rate)^2.

Decoding (the cache protocol, the KV cache allocated at `budget` entries per (batch, kv head)): the gate keeps its
own small cache (keys and values [B, T, gate_heads, gate_dim] for the T tokens the creating call is made for, as a
dense cache), so a chunk's flags are those of the forward whatever the chunk sizes; its queries see the cached
entries, the chunk's kept tokens and themselves (causally), and the cache then stores the cached entries and the
chunk's kept tokens in order; when they exceed `budget`, the oldest leave first. So decoding equals the forward
while the kept tokens fit the budget; a gate that keeps everything gives causal softmax attention.

Fidelity: reconstructed. Available: the abstract (arXiv 2410.12876 v1/v3: a lightweight Attention-Gate takes the
whole context as input and yields eviction flags per token, per head and layer; attention proceeds according to the
flags and only the kept KV states are cached; tuned by continual pre-training or SFT) and a summary of the method
(a reduced multi-head attention MHA' before each self-attention module, a gating function giving per-token, per-head
retention, an eviction loss aimed at a target eviction rate, straight-through estimation of the discrete flags). Not
available (the stored pages held only the paper's first page; no official code found): the gate's exact form (here
causal MHA' over the layer input, a linear map to one logit per kv head, flag at logit 0), the loss's exact form
(here the squared gap between the mean soft eviction rate and the target), what the gate sees while generating (here
every earlier token, through its own cache) and the cache limit (the paper's cache grows with the kept tokens; here
`budget`, oldest out first).
Time: the gate adds O(T^2 gate_heads gate_dim) per sequence; decoding O(budget H D + T gate_heads gate_dim) per
token; memory: budget KV entries per head plus 2 gate_heads gate_dim floats per token for the gate.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import pipeline
from attn.core.layer import AttentionCall, HeadProjection
from attn.core.softmax import softmax_attention
from attn.core.validation import in_range, positive_int
from attn.kv.policy_layer import PolicyAttention
from attn.kv.score_eviction import SCORE_OPTION_DOCS, SCORE_VALIDATORS, BudgetPolicy, causal_visible
from attn.registry import register

Array = jax.Array

GATE_STATE = ("gate_keys", "gate_values")  # the gate's own cache, side state of the KV cache
GATE_BIAS_INIT = 2.0  # the gate starts by keeping (sigmoid(2) = 0.88 before the kernel's term)


def latest_kept(keep: Array, budget: int) -> Array:
    """bool [B, KVH, E]: the latest `budget` entries where keep bool [B, KVH, E] is True (entries in position order)."""
    from_end = jnp.flip(jnp.cumsum(jnp.flip(keep.astype(jnp.int32), axis=-1), axis=-1), axis=-1)
    return keep & (from_end <= budget)


def straight_through(logits: Array) -> Array:
    """float32 flags of the same shape: the hard keep (logits > 0) forward, sigmoid(logits)'s gradient backward."""
    soft = jax.nn.sigmoid(logits)
    hard = (logits > 0).astype(soft.dtype)
    return hard + soft - jax.lax.stop_gradient(soft)


def eviction_loss(logits: Array, target_rate: float) -> Array:
    """The scalar (mean(1 - sigmoid(logits)) - target_rate)^2 over gate logits float32 [B, T, KVH]."""
    return (jnp.mean(1.0 - jax.nn.sigmoid(logits)) - target_rate) ** 2


@dataclasses.dataclass(frozen=True)
class AttentionGatePolicy(BudgetPolicy):
    """Cached entries stay; the chunk's tokens stay where the gate keeps them (chunk_keep bool [B, KVH, L]); beyond
    `budget` the oldest leave first. Queries see the cached entries, the chunk's kept tokens and themselves."""

    budget: int
    chunk_keep: Array

    def flags(self, cands: cache_lib.Candidates) -> Array:
        """bool [B, KVH, E]: every cached entry, and the chunk's tokens the gate keeps."""
        cached = jnp.ones((*self.chunk_keep.shape[:2], cands.valid.shape[-1] - self.chunk_keep.shape[-1]), bool)
        return jnp.concatenate([cached, self.chunk_keep], axis=-1)

    def visible(self, cands: cache_lib.Candidates, q_positions: Array) -> Array:
        own = cands.positions[:, :, None, :] == q_positions[:, None, :, None]
        return causal_visible(cands, q_positions) & (self.flags(cands)[:, :, None, :] | own)

    def keep(self, cands: cache_lib.Candidates) -> tuple[Array, Array]:
        return cache_lib.ordered_keep(latest_kept(cands.valid & self.flags(cands), self.budget), self.capacity)


@register(
    "attention_gate",
    family="kv",
    paper="In-context KV-Cache Eviction for LLMs via Attention-Gate",
    catalog=154,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="a learned in-context gate (small attention over the layer input) flags tokens per kv head; flagged "
    "tokens are evicted from the KV cache",
    option_docs={
        **SCORE_OPTION_DOCS,
        "budget": "cache entries per (batch, kv head); when the kept tokens exceed it, the oldest leave first",
        "gate_heads": "heads of the gate's attention (MHA')",
        "gate_dim": "head width of the gate's attention",
        "target_rate": "eviction rate the sown eviction loss pulls the gate towards, in [0, 1]",
    },
    validators={
        **SCORE_VALIDATORS,
        "gate_heads": positive_int,
        "gate_dim": positive_int,
        "target_rate": in_range(0.0, 1.0),
    },
    fidelity="reconstructed",
    reference=(
        "arXiv 2410.12876 abstract (v1, v3) and a method summary (reduced MHA' gate before each attention, per-token "
        "per-head flags, eviction loss to a target rate, STE); method section and official code not available: the "
        "gate's form, loss form, decode-time gate input and budget rule are this file's choices"
    ),
    has_attention_weights=True,
)
class AttentionGateAttention(PolicyAttention):
    """Attention-Gate: softmax attention whose keys are evicted where a learned gate flags them, per kv head.
    x [B, T, E] -> [B, T, E]; cache [B, budget, KVH, D]; sows "losses"/"attention_gate" on the forward."""

    budget: int = 256
    gate_heads: int = 1
    gate_dim: int = 16
    target_rate: float = 0.5

    def gate_logits(self, x: Array, cached: dict[str, Array] | None = None, index: Array | int = 0) -> Array:
        """x [B, T, E] -> float32 [B, T, KVH]: the gate's logits (keep where > 0), causal attention over x, or over
        the gate's cached keys/values and x when decoding (x at positions index..index+T-1; `cached` [B, N, gh, gd]
        are rewritten with this chunk's)."""
        xf = x.astype(jnp.float32)

        def heads(name: str) -> Array:  # kernel [E, gate_heads, gate_dim]; the gate's heads are not sharded
            return HeadProjection(self.gate_heads, self.gate_dim, heads_axis=None, param_dtype=self.param_dtype,
                                  name=name)(xf)  # fmt: skip

        q, k, v = heads("gate_query"), heads("gate_key"), heads("gate_value")
        if cached is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cached["gate_keys"], k, index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cached["gate_values"], v, index, axis=1)
            cache_lib.store_state(self, cache_lib.RecurrentState({"gate_keys": k, "gate_values": v}, index=None))
        mixed = softmax_attention(q, k, v, causal=True, q_offset=index)  # [B, T, gate_heads, gate_dim]
        kernel = self.param(
            "gate_out_kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
                                         (None, "head_dim", "kv_heads")),
            (self.gate_heads, self.gate_dim, self.kv_heads),
            self.param_dtype,
        )  # fmt: skip
        bias = self.param(
            "gate_out_bias",
            nn.with_logical_partitioning(nn.initializers.constant(GATE_BIAS_INIT), ("kv_heads",)),
            (self.kv_heads,),
            self.param_dtype,
        )
        logits = jnp.einsum("bthd,hdg->btg", mixed, jnp.asarray(kernel, jnp.float32))
        return logits + jnp.asarray(bias, jnp.float32)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The creating decode call also allocates the gate's own cache: keys and values float32
        [B, T, gate_heads, gate_dim] for the T tokens the call is made for (the gate sees the whole context)."""
        if call.decode and cache_lib.load(self) is None:
            batch, length = call.x.shape[:2]
            zeros = jnp.zeros((batch, length, self.gate_heads, self.gate_dim), jnp.float32)
            cache_lib.store_state(
                self, cache_lib.RecurrentState({"gate_keys": zeros, "gate_values": zeros}, index=None)
            )
        return super().prepare(q, k, v, call)

    def decode_policy(self, call: AttentionCall) -> AttentionGatePolicy:
        index = cache_lib.load(self).index
        gate = cache_lib.load_state(self, GATE_STATE, shared_index=True)
        keep = self.gate_logits(call.x, gate.state, index) > 0  # [B, L, KVH]
        return AttentionGatePolicy(budget=self.budget, chunk_keep=jnp.swapaxes(keep, 1, 2))

    def cache_policy(self) -> AttentionGatePolicy:
        """The policy before any chunk (what the creating call allocates the cache for)."""
        no_chunk = jnp.zeros((1, self.kv_heads, 0), bool)
        return AttentionGatePolicy(budget=self.budget, chunk_keep=no_chunk)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """The forward: causal softmax whose weights on flagged keys are zero except on the query's own token
        (straight-through flags, so the gate trains); a decode call on the cache: the policy (`policy_attend`)."""
        if call.decode:
            return self.policy_attend(q, k, v, call)
        logits = self.gate_logits(call.x)  # [B, T, KVH]
        self.sow("losses", "attention_gate", eviction_loss(logits, self.target_rate))
        flags = jnp.repeat(jnp.swapaxes(straight_through(logits), 1, 2), self.num_heads // self.kv_heads, axis=1)
        own = call.q_positions[:, :, None] == call.kv_positions[:, None, :]  # [B, Tq, Tk]
        gate = jnp.where(own[:, None], 1.0, flags[:, :, None, :])  # [B, H, Tq, Tk]
        weights = self.attention_weights(self.attention_logits(q, k, call), call) * gate
        weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
        self.sow_capture("attention_weights", weights)
        self.sow_capture("key_mass", pipeline.key_mass(weights))
        return self.mix(self.attention_dropout(weights, call.deterministic), v).astype(q.dtype)
