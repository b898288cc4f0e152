"""`softplus`: length-scaled Softplus attention (LSSA) with optional re-weighting (LSSAR).

Paper: "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models" (Gao,
Spratling, Gionfrida; arXiv 2501.13428, ICML 2026; code announced at github.com/iminfine/freeatten).

Softmax = exp followed by l1-normalisation; the paper finds the l1-normalisation is what matters and builds a
two-stage replacement. Stage 1 (normalisation, LSSA, the paper's Eq. 4):

    q_i <- q_i / ||q_i||_2,  k_j <- k_j / ||k_j||_2               (cosine=True: q k^T in [-1, 1])
    z_ij = log(d) * log(N_i) * q_i k_j^T + bias_ij               d = head_dim, N_i = keys row i attends to
    a_ij = softplus(z_ij) * M_ij / sum_j' softplus(z_ij') * M_ij'   (M the 0/1 mask: multiplied, not -inf)

Stage 2 (sharpening, re-weighting, the paper's Eq. 5), applied to the stage-1 rows and l1-normalised again:

    r_ij = relu(N_i * a_ij - O_i) ** p,   a_ij <- r_ij / sum_j' r_ij'        (reweight=True)
    O_i  = 1 (reweight_threshold), except O_i = 0 on the first 3 rows (reweight_warmup), p = 15 (or 3)
    o_i  = sum_j a_ij v_j

N_i * a_ij is the weight in units of the row mean 1/N_i, so weights above the mean are kept and raised to the
power p (a sharper, argmax-like row as p grows) and weights below it are cut to 0. At N_i <= 3 the offset is 0
because a row of 1-3 near-uniform weights would otherwise be cut to all zeros.

Verified (Jul 2025 lookup) against secondary sources, not the paper PDF itself, which was not reachable here:
the en.papernotes.org notes of the ICML 2026 version (L2-normalised Q, K; scale log d * log N; N row i = i;
softplus; multiplicative 0/1 mask; l1; re-weighting ReLU^p(A * N - O) with O all ones but its first 3 rows 0,
then l1; p = 3 and p = 15 reported), the public ICLR 2026 reviews (which name Eq. 4 for the log N scale and
Eq. 5 for the N scale and offset O and confirm "shifted ReLU-p" then l1), and a public re-implementation
(models/lssar.py). The official repository was not in the store.

Choices of ours: N_i is the number of visible keys of row i (the paper's causal N_i = i, 1-based; it also covers
padding and windows); the warm-up rows are those with N_i <= reweight_warmup (the first 3 rows in the causal
case); the natural log is assumed in log d * log N; an additive `bias` (e.g. ALiBi) is added after the scale;
a row whose re-weighted values are all zero (an exactly uniform row) keeps its stage-1 weights instead of
becoming 0; cosine=False with scale=None falls back to 1/sqrt(d) (not in the paper). The re-weighting divides by
the row maximum before the power (the l1 step makes this exact), so (N a)^15 never overflows float32.

Shapes: x [B, T, E] -> [B, T, E]; weights float32 [B, H, T, T]. Time O(B H T^2 D), memory O(B H T^2) (dense
reference; the stage-1 normaliser is a plain sum). No exact reduction to softmax (exp is replaced);
length_scale=False, reweight=False gives plain Softplus + l1 attention, and reweight_power=1,
reweight_threshold=0 makes the re-weighting the identity.

In the layer the method is the attention pipeline's stages (attn/core/softmax_layer.py): `scores` (cosine logits
times the constant scale), `score_mod` (log N_i, then the position bias), `normalize` (softplus + l1; the mask's
-inf gives softplus 0) and `prob_mod` (LSSAR); the functional `softplus_attention` runs the same functions.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.pipeline import add_bias, dropout_weights, grouped_logits, grouped_weighted_values, mask_logits
from attn.core.validation import check_qkv, choice, non_negative, non_negative_int, positive
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array


def unit_rows(x: Array) -> Array:
    """x / ||x||_2 over the last axis, in float32 (a zero row stays zero)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.where(norm > 0.0, norm, 1.0)


def visible_key_counts(allowed: Array | None, kv_len: int) -> Array:
    """N_i, the number of keys row i may attend to: float32 [B|1, H|1, Tq, 1] (kv_len everywhere when allowed is
    None); allowed: bool [B|1, H|1, Tq, Tk] or None."""
    if allowed is None:
        return jnp.full((1, 1, 1, 1), float(kv_len), jnp.float32)
    return jnp.sum(allowed, axis=-1, keepdims=True, dtype=jnp.float32)


def softplus_logit_scale(head_dim: int, scale: float | None, cosine: bool) -> float:
    """The constant logit scale: `scale`, else log(head_dim) (cosine, the paper's log d) or 1/sqrt(head_dim)."""
    if scale is not None:
        return scale
    if cosine and head_dim < 2:
        raise ValueError(f"head_dim={head_dim} must be >= 2 for the log(head_dim) scale of cosine=True (or pass scale)")
    return math.log(head_dim) if cosine else head_dim**-0.5


def softplus_scores(q: Array, k: Array, *, scale: float | None, cosine: bool) -> Array:
    """scale * q k^T, with q and k l2-normalised per head when cosine: float32 [B, H, Tq, Tk] (Eq. 4 without the
    length scale). q [B, Tq, H, D], k [B, Tk, KVH, D]."""
    scale = softplus_logit_scale(q.shape[-1], scale, cosine)
    if cosine:
        q, k = unit_rows(q), unit_rows(k)
    return grouped_logits(q, k) * scale


def length_scaled(logits: Array, counts: Array) -> Array:
    """logits of row i times log(N_i) (Eq. 4); counts N float32 broadcastable to [B, H, Tq, 1]."""
    return logits * jnp.log(jnp.maximum(counts, 1.0))


def softplus_weights(logits: Array) -> Array:
    """softplus(z) / sum_j softplus(z): float32 [B, H, Tq, Tk] from masked logits (-inf where masked, where
    softplus gives exactly 0: the paper's multiplicative 0/1 mask). A row with no visible key gives 0."""
    plus = jax.nn.softplus(logits)
    total = jnp.sum(plus, axis=-1, keepdims=True)
    return plus / jnp.where(total == 0.0, 1.0, total)


def reweighted(
    weights: Array, counts: Array, allowed: Array | None, *, threshold: float, power: float, warmup: int
) -> Array:
    """LSSAR (Eq. 5): relu(N_i a_ij - O_i)^power, l1-normalised; O_i = threshold where N_i > warmup, else 0.

    weights float32 [B, H, Tq, Tk]; counts N_i broadcastable to [B, H, Tq, 1]; allowed bool [B|1, H|1, Tq, Tk] or
    None. A row whose re-weighted values are all zero keeps its weights."""
    offset = jnp.where(counts > warmup, jnp.float32(threshold), 0.0)
    excess = counts * weights - offset
    if allowed is not None:
        excess = jnp.where(allowed, excess, 0.0)
    # dividing by the row max first is exact after the l1 step and keeps excess**15 inside float32
    top = jnp.max(excess, axis=-1, keepdims=True)
    ratio = excess / jnp.where(top > 0.0, top, 1.0)
    # power of the positive part only: a fractional power's gradient at 0 would be inf * 0 = nan
    sharp = jnp.where(ratio > 0.0, jnp.where(ratio > 0.0, ratio, 1.0) ** power, 0.0)
    sharp_total = jnp.sum(sharp, axis=-1, keepdims=True)
    return jnp.where(sharp_total > 0.0, sharp / jnp.where(sharp_total > 0.0, sharp_total, 1.0), weights)


def softplus_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    mask: Mask | Array | None = None,
    bias: Array | None = None,
    window: int | tuple[int, int] | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    scale: float | None = None,
    cosine: bool = True,
    length_scale: bool = True,
    reweight: bool = False,
    reweight_threshold: float = 1.0,
    reweight_power: float = 15.0,
    reweight_warmup: int = 3,
    q_offset: Any = 0,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
) -> Array | tuple[Array, dict[str, Array]]:
    """Length-scaled Softplus attention with l1 normalisation and optional LSSAR re-weighting.

    Args:
      q: [B, Tq, H, D]; k: [B, Tk, KVH, D]; v: [B, Tk, KVH, Dv] (H a multiple of KVH).
      causal, mask, window, segment_ids, q_offset: the visible keys (as in `attn.functional.softmax_attention`).
      bias: float broadcastable to [B, H, Tq, Tk], added after the length scale.
      scale: constant logit scale (default log(D) with cosine=True, the paper's log d; else 1/sqrt(D)).
      cosine: l2-normalise q and k per head before the dot product (Eq. 4).
      length_scale: multiply the logits of row i by log(N_i) (N_i visible keys; Eq. 4).
      reweight, reweight_threshold, reweight_power, reweight_warmup: the Eq. 5 sharpening relu(N a - O)^p with
        O = reweight_threshold on rows with N_i > reweight_warmup and 0 on the others (see the module doc).
      dropout_rate, dropout_rng: dropout on the weights.
      return_probs: also return {"probs": float32 [B, H, Tq, Tk]}.
    Returns:
      [B, Tq, H, Dv] in q.dtype (rows with no visible key give 0), or (out, aux).
    """
    heads, _ = check_qkv(q, k, v)
    q_len, kv_len = q.shape[1], k.shape[1]
    non_negative("reweight_threshold", reweight_threshold)
    positive("reweight_power", reweight_power)
    non_negative_int("reweight_warmup", reweight_warmup)
    full = Mask.from_args(causal=causal, mask=mask, window=window, segment_ids=segment_ids)
    allowed = None if full is None else full.materialize(q_len, kv_len, q_offset=q_offset)
    counts = visible_key_counts(allowed, kv_len)
    logits = softplus_scores(q, k, scale=scale, cosine=cosine)
    if length_scale:
        logits = length_scaled(logits, counts)
    logits = mask_logits(add_bias(logits, bias), full, q_offset=q_offset)
    weights = softplus_weights(logits)
    if reweight:
        weights = reweighted(
            weights,
            counts,
            allowed,
            threshold=reweight_threshold,
            power=reweight_power,
            warmup=reweight_warmup,
        )
    weights = jnp.broadcast_to(weights, (q.shape[0], heads, q_len, kv_len))
    out = grouped_weighted_values(dropout_weights(weights, dropout_rate, dropout_rng), v).astype(q.dtype)
    return (out, {"probs": weights}) if return_probs else out


@register(
    "softplus",
    family="softmax",
    paper="Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models",
    catalog=115,
    op=softplus_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="LSSA: cosine logits x log(d) log(N_i), softplus + l1 normalisation; optional LSSAR re-weighting",
    option_docs={
        "cosine": "l2-normalise q and k before the dot product (paper Eq. 4); scale=None then means log(head_dim)",
        "length_scale": "multiply logits of row i by log(N_i), N_i = number of visible keys (paper Eq. 4)",
        "reweight": "LSSAR (paper Eq. 5): relu(N_i a - O_i)^power, renormalised",
        "reweight_threshold": "offset O of the re-weighting in units of the row mean 1/N_i (paper: 1)",
        "reweight_power": "re-weighting exponent p (> 0; paper: 15, or 3)",
        "reweight_warmup": "rows with N_i <= this get offset 0 (paper: the first 3 rows)",
        "softcap": "must be None (softplus attention has no soft-capping)",
    },
    fidelity="reconstructed",
    reference="secondary sources only (en.papernotes.org notes, public ICLR 2026 reviews naming Eqs. 4-5, a public "
    "re-implementation models/lssar.py); the paper PDF and official code were not read",
    validators={
        "reweight_threshold": non_negative,
        "reweight_power": positive,
        "reweight_warmup": non_negative_int,
        "softcap": choice(None),
    },
    has_attention_weights=True,
)
class SoftplusAttention(MultiHeadAttention):
    """Length-scaled Softplus attention (LSSA / LSSAR). x [B, T, E] -> [B, T, E]."""

    cosine: bool = True
    length_scale: bool = True
    reweight: bool = False
    reweight_threshold: float = 1.0
    reweight_power: float = 15.0
    reweight_warmup: int = 3

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        softplus_logit_scale(self.head_dim, self.scale, self.cosine)

    def visible_keys(self, call: AttentionCall, kv_len: int) -> tuple[Array | None, Array]:
        """(allowed bool [B|1, H|1, Tq, Tk] or None, N_i float32 [B|1, H|1, Tq, 1]) of this call's mask."""
        full = self.full_mask(call)
        q_len = call.q_positions.shape[-1]
        allowed = None if full is None else full.materialize(q_len, kv_len, q_offset=call.q_offset)
        return allowed, visible_key_counts(allowed, kv_len)

    def scores(self, q: Array, k: Array) -> Array:
        return softplus_scores(q, k, scale=self.scale, cosine=self.cosine)

    def score_mod(self, logits: Array, call: AttentionCall) -> Array:
        """log(N_i) length scale (Eq. 4), then the position bias."""
        if self.length_scale:
            logits = length_scaled(logits, self.visible_keys(call, logits.shape[-1])[1])
        return add_bias(logits, call.bias)

    def normalize(self, logits: Array) -> tuple[Array, None]:
        return softplus_weights(logits), None

    def prob_mod(self, weights: Array, call: AttentionCall) -> Array:
        """LSSAR re-weighting (Eq. 5) when reweight=True."""
        if not self.reweight:
            return weights
        allowed, counts = self.visible_keys(call, weights.shape[-1])
        return reweighted(
            weights,
            counts,
            allowed,
            threshold=self.reweight_threshold,
            power=self.reweight_power,
            warmup=self.reweight_warmup,
        )
