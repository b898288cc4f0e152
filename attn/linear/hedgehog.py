"""`hedgehog`: learnable spiky linear attention ([217] "The Hedgehog & the Porcupine: Expressive Linear Attentions
with Softmax Mimicry").

Per head, a trainable feature map (W identity-initialised, b zero) mimics the spiky, monotonic weights of softmax
attention. The paper's map (its listing, and HazyResearch/lolcats `Exp`):

    phi(x) = exp(x W + b) ⊕ exp(-(x W + b))                                   (feature_map="exp", the default)
    a_ij   = phi_q(q_i) . phi_k(k_j) / sum_{j' allowed} phi_q(q_i) . phi_k(k_j')
    o_i    = sum_j a_ij v_j                               (computed linearly: normalised chunked-scan core)

with separate maps for queries (one per query head) and keys (one per kv head); phi is positive and has 2D
features (state [B, H, 2D, D + 1], the last column being the normaliser). Stabilisation: query i's features are
computed as exp(±y_i - c_i) with c_i = max |y_i| (y = x W + b), and every key's with one shift m = max |y_k| over all
keys and features of its (batch, kv head) — decoding keeps the m of its first call in "cache"/"key_shift". Both are
positive factors common to a query row's numerator and denominator, so a_ij is the unshifted formula's, and no
feature exceeds 1. The core's eps (added to the denominator) defaults to 1e-12 here: the shifted denominator is
exp(-(c_i + m)) times the unshifted one, and a larger eps would no longer be negligible against it. (LoLCATs'
`Exp` shifts each half and each key by its own max/min, which does not cancel; it is not used.)

feature_map="softmax" is LoLCATs' form, phi(x) = softmax(xW + b) ⊕ softmax(-(xW + b)) (each half normalised over the
features: a different, bounded map).

Attention distillation (the paper's conversion recipe). With distill=True the layer also computes the softmax
teacher weights p = softmax(q k^T / sqrt(D)) from its own (stop-gradient) queries and keys and the student
weights a above from phi of the same stop-gradient q, k, and sows

    attention_distillation_loss(a, p) = mean over rows of KL(p || a) = cross-entropy(p, a) - H(p)

under "losses"/"hedgehog_distillation". It differs from the paper's cross-entropy by the teacher's entropy, a
constant for the feature maps, so the gradients are the same, and it is exactly 0 when the student equals the
teacher. Only the feature maps receive its gradient. This step is O(T^2) (it builds both weight matrices).

Converting a trained `softmax` model (position="none" or "rope"): build the same model with
attention="hedgehog" (and position equal to the teacher's), init it, and copy every parameter of the softmax
layers — `query`, `key`, `value`, `out` have the same names and shapes — keeping the `query_feature_map` /
`key_feature_map` parameters of the init. Stage 1: train with attention_options={"distill": True} and an
optimizer restricted to the feature-map parameters (e.g. optax.multi_transform) on the sum of the sown
"losses" (apply with mutable=["losses"]). Stage 2: set distill=False and fine-tune end to end on the task loss.

Shapes: x [B, T, E] -> [B, T, E]. Time O(B H T (C D + D^2)), memory O(B H T (C + D)); decoding O(H D^2) per token
with the state in "cache". Nothing reduces it exactly to softmax attention (it approximates it after
distillation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core import positions as pos
from attn.core.distillation import attention_distillation_loss
from attn.core.feature_maps import spiky_exp, spiky_softmax
from attn.core.headwise_linear import HeadwiseLinear
from attn.core.layer import AttentionCall
from attn.core.linear_scan import repeat_kv
from attn.core.masks import Mask
from attn.core.validation import choice, positive, positive_int
from attn.linear.linear import BASE_OPTION_DOCS, LinearAttentionBase
from attn.registry import register

Array = jax.Array

POSITIONS = ("none", "rope")
FEATURE_ACTIVATIONS = ("exp", "softmax")


def hedgehog_attention_weights(
    q_features: Array, k_features: Array, *, causal: bool, kv_lengths: Array | None = None
) -> Array:
    """The normalised linear-attention weights a_ij, float32 [B, H, Tq, Tk] (quadratic; for distillation/tests).

    q_features [B, Tq, H, F], k_features [B, Tk, KVH, F], positive. Rows without any allowed key are 0.
    """
    k_features = repeat_kv(k_features, q_features.shape[2])
    scores = jnp.einsum("bthf,bshf->bhts", q_features.astype(jnp.float32), k_features.astype(jnp.float32))
    allowed = jnp.ones(scores.shape[-2:], jnp.bool_)
    if causal:
        allowed = jnp.tril(allowed)
    allowed = allowed[None, None]
    if kv_lengths is not None:
        allowed = allowed & (jnp.arange(scores.shape[-1]) < jnp.asarray(kv_lengths)[:, None, None, None])
    scores = jnp.where(allowed, scores, 0.0)
    total = jnp.sum(scores, axis=-1, keepdims=True)
    return scores / jnp.where(total == 0.0, 1.0, total)


@register(
    "hedgehog",
    family="linear",
    paper="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
    catalog=217,
    op=F.linear_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="linear attention with learnable spiky maps exp(xW + b) ⊕ exp(-xW - b); attention distillation loss",
    option_docs={
        "feature_map": "'exp' (the paper's exp(xW + b) ⊕ exp(-xW - b), max-shifted) or 'softmax' (LoLCATs' "
        "softmax(xW + b) ⊕ softmax(-xW - b))",
        "distill": "also sow the attention-distillation loss against the layer's own softmax weights under 'losses'",
        "position": "'none' or 'rope' (rotary q/k before the feature maps; match the softmax model being converted)",
        "rope_base": "RoPE base (theta) when position='rope'",
        **BASE_OPTION_DOCS,
    },
    fidelity="paper",
    reference="arXiv 2402.04347 (Sec. 4: map exp(xW + b) ⊕ exp(-xW - b), attention-distillation cross-entropy with "
    "the rest of the model frozen, then end-to-end finetuning); HazyResearch/lolcats src/model/feature_map.py (Exp, "
    "SoftmaxDim); distillation as KL (the paper's cross-entropy gradients)",
    validators={
        "chunk_size": positive_int,
        "eps": positive,
        "position": choice(*POSITIONS),
        "feature_map": choice(*FEATURE_ACTIVATIONS),
    },
)
class HedgehogAttention(LinearAttentionBase):
    """Hedgehog linear attention with optional attention distillation. x [B, T, E] -> [B, T, E]."""

    distill: bool = False
    feature_map: str = "exp"
    eps: float = 1e-12
    position: str = "none"
    rope_base: float = 10000.0

    mechanism_name = "hedgehog"

    def uses_denominator(self) -> bool:
        return True

    def feature_maps(self) -> tuple[HeadwiseLinear, HeadwiseLinear]:
        common = dict(features=self.head_dim, dtype=jnp.float32, param_dtype=self.param_dtype)
        return (
            HeadwiseLinear(groups=self.num_heads, heads_axis="heads", name="query_feature_map", **common),
            HeadwiseLinear(groups=self.kv_heads, heads_axis="kv_heads", name="key_feature_map", **common),
        )

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The base positions, then RoPE on self-attention q and k when position='rope'."""
        q, k, v, call = super().prepare(q, k, v, call)
        if self.position == "rope" and k.shape[1] == q.shape[1]:
            inv_freq, _ = pos.rope_frequencies(self.head_dim, base=self.rope_base)
            q, k = pos.apply_rope(q, call.q_positions, inv_freq), pos.apply_rope(k, call.q_positions, inv_freq)
        return q, k, v, call

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, Dv]: normalised linear attention of the spiky features
        (and, with distill, the distillation loss sown under "losses")."""
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        query_map, key_map = self.feature_maps()
        q_features, k_features = self.spiky(
            query_map(q), key_map(k), decode_offset=call.q_offset if call.decode else None
        )
        if self.distill and not call.decode:
            self.sow_distillation_loss(q, k, v, query_map, key_map, causal=causal, kv_lengths=kv_lengths)
        return self.linear_core(
            q_features,
            k_features,
            v,
            causal=causal,
            decay=None,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            decode=call.decode,
        )

    def spiky(self, q_proj: Array, k_proj: Array, *, decode_offset: Array | int | None = None) -> tuple[Array, Array]:
        """phi of the mapped q [B, T, H, D] and k [B, S, KVH, D] -> float32 [B, T, H, 2D], [B, S, KVH, 2D].

        "exp": per-query-row shift, one key shift per (batch, kv head); when decoding (decode_offset = the first
        position of this call) the key shift of the call at position 0 is kept in "cache" and reused."""
        if self.feature_map == "softmax":
            return spiky_softmax(q_proj), spiky_softmax(k_proj)
        key_shift = jnp.max(jnp.abs(k_proj.astype(jnp.float32)), axis=(1, 3), keepdims=True)  # [B, 1, KVH, 1]
        if decode_offset is not None:
            if self.has_variable("cache", "key_shift"):
                stored = self.get_variable("cache", "key_shift")
                key_shift = jnp.where(jnp.asarray(decode_offset) == 0, key_shift, stored)
            self.put_variable("cache", "key_shift", key_shift)
        return spiky_exp(q_proj), spiky_exp(k_proj, key_shift)

    def sow_distillation_loss(self, q, k, v, query_map, key_map, *, causal, kv_lengths) -> None:
        """Teacher: softmax weights of the frozen q, k; student: Hedgehog weights of phi(frozen q, k)."""
        q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
        _, aux = F.softmax_attention(
            q,
            k,
            v,
            causal=causal,
            mask=None if kv_lengths is None else Mask(kv_lengths=kv_lengths),
            return_probs=True,
            implementation=self.implementation,
        )
        student = hedgehog_attention_weights(
            *self.spiky(query_map(q), key_map(k)), causal=causal, kv_lengths=kv_lengths
        )
        self.sow("losses", "hedgehog_distillation", attention_distillation_loss(student, aux["probs"]))
