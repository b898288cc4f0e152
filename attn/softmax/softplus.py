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
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attn.core.masks import Mask
from attn.core.reference import grouped_logits, grouped_weighted_values
from attn.core.validation import check_positive, check_qkv
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array


def unit_rows(x: Array) -> Array:
    """x / ||x||_2 over the last axis, in float32 (a zero row stays zero)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.where(norm > 0.0, norm, 1.0)


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
    out_dtype = q.dtype
    q_len, kv_len, dim = q.shape[1], k.shape[1], q.shape[-1]
    check_positive("reweight_power", reweight_power)
    check_positive("reweight_threshold", reweight_threshold, allow_zero=True)
    if not (isinstance(reweight_warmup, int) and reweight_warmup >= 0):
        raise ValueError(f"reweight_warmup={reweight_warmup!r} must be an int >= 0 (rows with no re-weighting offset)")
    if cosine and dim < 2 and scale is None:
        raise ValueError(f"head_dim={dim} must be >= 2 for the log(head_dim) scale of cosine=True (or pass scale)")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
    if scale is None:
        scale = math.log(dim) if cosine else dim**-0.5
    if cosine:
        q, k = unit_rows(q), unit_rows(k)

    full = Mask.from_args(causal=causal, mask=mask, window=window, segment_ids=segment_ids)
    if full is None:
        allowed = jnp.ones((1, 1, q_len, kv_len), jnp.bool_)
    else:
        allowed = full.materialize(q_len, kv_len, q_offset=q_offset)
    n = jnp.sum(allowed, axis=-1, keepdims=True, dtype=jnp.float32)  # [B|1, H|1, Tq, 1]

    logits = grouped_logits(q, k) * scale
    if length_scale:
        logits = logits * jnp.log(jnp.maximum(n, 1.0))
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)
    positive = jnp.where(allowed, jax.nn.softplus(logits), 0.0)
    total = jnp.sum(positive, axis=-1, keepdims=True)
    weights = positive / jnp.where(total == 0.0, 1.0, total)
    if reweight:
        offset = jnp.where(n > reweight_warmup, jnp.float32(reweight_threshold), 0.0)
        excess = jnp.where(allowed, n * weights - offset, 0.0)
        # dividing by the row max first is exact after the l1 step and keeps excess**15 inside float32
        top = jnp.max(excess, axis=-1, keepdims=True)
        ratio = excess / jnp.where(top > 0.0, top, 1.0)
        # power of the positive part only: a fractional power's gradient at 0 would be inf * 0 = nan
        sharp = jnp.where(ratio > 0.0, jnp.where(ratio > 0.0, ratio, 1.0) ** reweight_power, 0.0)
        sharp_total = jnp.sum(sharp, axis=-1, keepdims=True)
        weights = jnp.where(sharp_total > 0.0, sharp / jnp.where(sharp_total > 0.0, sharp_total, 1.0), weights)
    weights = jnp.broadcast_to(weights, (q.shape[0], heads, q_len, kv_len))

    attended = weights
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        attended = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = grouped_weighted_values(attended, v).astype(out_dtype)
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
    },
)
class SoftplusAttention(MultiHeadAttention):
    """Length-scaled Softplus attention (LSSA / LSSAR). x [B, T, E] -> [B, T, E]."""

    cosine: bool = True
    length_scale: bool = True
    reweight: bool = False
    reweight_threshold: float = 1.0
    reweight_power: float = 15.0
    reweight_warmup: int = 3

    def attend(
        self,
        q: Array,
        k: Array,
        v: Array,
        *,
        mask: Mask | None,
        bias: Array | None,
        q_offset,
        deterministic: bool,
    ) -> Array:
        if self.softcap is not None:
            raise ValueError(f"softcap={self.softcap!r} is not supported by softplus attention; use softcap=None")
        out, aux = softplus_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            window=self.window,
            scale=self.scale,
            cosine=self.cosine,
            length_scale=self.length_scale,
            reweight=self.reweight,
            reweight_threshold=self.reweight_threshold,
            reweight_power=self.reweight_power,
            reweight_warmup=self.reweight_warmup,
            q_offset=q_offset,
            dropout_rate=0.0 if deterministic else self.dropout_rate,
            dropout_rng=self.dropout_rng(deterministic),
            return_probs=True,
        )
        if self.wants_weights():
            self.sow("intermediates", "attention_weights", aux["probs"])
        return out
