"""`softplus`: length-scaled Softplus attention (LSSA) with optional re-weighting (LSSAR).

Paper: "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models" (Gao and
Spratling, 2025; code github.com/iminfine/freeatten).

Softmax = exp followed by l1-normalisation; the paper finds the l1-normalisation is what matters and swaps exp
for Softplus, with a length-dependent scale from entropy invariance (LSSA):

    s_ij  = scale q_i k_j^T                                   (scale = 1/sqrt(d))
    z_ij  = log_b(n_i) * s_ij + bias_ij                       n_i = number of keys row i attends to
                                                              (i + 1 causal), b = length_base (head_dim)
    a_ij  = softplus(z_ij) / sum_j' softplus(z_ij')           over the visible keys (masked a_ij = 0)

and, at inference without fine-tuning, re-weights the normalised row to sharpen it (LSSAR):

    r_ij  = relu(n_i * a_ij - threshold) ** power,  a_ij <- r_ij / sum_j' r_ij'     (reweight=True)

(weights above threshold x the row mean are amplified, the rest suppressed; a row whose r is all zero keeps a).
    o_i   = sum_j a_ij v_j

Softplus is linear for large inputs, so no max-subtraction is needed and large logits never overflow.

Verification note: the official repository is not reachable from here; the Softplus + l1 form, the
entropy-invariance length scale and the sharpening re-weighting follow the paper's description, but the exact
base of the logarithm (log_d n here, d = head_dim, i.e. scale 1 at n = d) and the re-weighting hyper-parameters
(`reweight_threshold`, `reweight_power`) could not be checked and are options.

Shapes: x [B, T, E] -> [B, T, E]; weights float32 [B, H, T, T]. Time O(B H T^2 D), memory O(B H T^2) (dense
reference; the normaliser is a plain running sum, so a flash-style kernel fits). No exact reduction to softmax
(exp is replaced); length_scale=False, reweight=False gives plain Softplus + l1 attention, and
reweight_power=1, reweight_threshold=0 makes the re-weighting the identity.
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
    length_scale: bool = True,
    length_base: float | None = None,
    reweight: bool = False,
    reweight_threshold: float = 1.0,
    reweight_power: float = 2.0,
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
      scale: logit scale (default 1/sqrt(D)).
      length_scale: multiply the scaled logits of row i by log_b(n_i) (n_i visible keys, b = length_base,
        default D). reweight, reweight_threshold, reweight_power: the LSSAR sharpening (see the module doc).
      dropout_rate, dropout_rng: dropout on the weights.
      return_probs: also return {"probs": float32 [B, H, Tq, Tk]}.
    Returns:
      [B, Tq, H, Dv] in q.dtype (rows with no visible key give 0), or (out, aux).
    """
    heads, _ = check_qkv(q, k, v)
    q_len, kv_len, dim = q.shape[1], k.shape[1], q.shape[-1]
    base = float(dim) if length_base is None else float(length_base)
    if length_scale and not base > 1.0:
        raise ValueError(f"length_base={length_base!r} must be > 1 (the base of the log-length scale)")
    check_positive("reweight_power", reweight_power)
    check_positive("reweight_threshold", reweight_threshold, allow_zero=True)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
    scale = dim**-0.5 if scale is None else scale

    full = Mask.from_args(causal=causal, mask=mask, window=window, segment_ids=segment_ids)
    if full is None:
        allowed = jnp.ones((1, 1, q_len, kv_len), jnp.bool_)
    else:
        allowed = full.materialize(q_len, kv_len, q_offset=q_offset)
    n = jnp.sum(allowed, axis=-1, keepdims=True, dtype=jnp.float32)  # [B|1, H|1, Tq, 1]

    logits = grouped_logits(q, k) * scale
    if length_scale:
        logits = logits * (jnp.log(jnp.maximum(n, 1.0)) / math.log(base))
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)
    positive = jnp.where(allowed, jax.nn.softplus(logits), 0.0)
    total = jnp.sum(positive, axis=-1, keepdims=True)
    weights = positive / jnp.where(total == 0.0, 1.0, total)
    if reweight:
        excess = n * weights - reweight_threshold
        # power of the positive part only: a fractional power's gradient at 0 would be inf * 0 = nan
        sharp = jnp.where(excess > 0.0, jnp.where(excess > 0.0, excess, 1.0) ** reweight_power, 0.0)
        sharp_total = jnp.sum(sharp, axis=-1, keepdims=True)
        weights = jnp.where(sharp_total > 0.0, sharp / jnp.where(sharp_total > 0.0, sharp_total, 1.0), weights)
    weights = jnp.broadcast_to(weights, (q.shape[0], heads, q_len, kv_len))

    attended = weights
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        attended = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = grouped_weighted_values(attended, v).astype(q.dtype)
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
    summary="LSSA: softplus + l1 normalisation with a log-length logit scale; optional LSSAR re-weighting",
    option_docs={
        "length_scale": "multiply logits of row i by log_b(n_i), n_i = number of visible keys",
        "length_base": "base b of the log-length scale (None = head_dim, so the scale is 1 at n = head_dim)",
        "reweight": "LSSAR: sharpen the normalised weights, relu(n a - threshold)^power, renormalised",
        "reweight_threshold": "re-weighting threshold in units of the row mean 1/n (0 with power 1 = identity)",
        "reweight_power": "re-weighting exponent (> 0)",
    },
)
class SoftplusAttention(MultiHeadAttention):
    """Length-scaled Softplus attention (LSSA / LSSAR). x [B, T, E] -> [B, T, E]."""

    length_scale: bool = True
    length_base: float | None = None
    reweight: bool = False
    reweight_threshold: float = 1.0
    reweight_power: float = 2.0

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
            length_scale=self.length_scale,
            length_base=self.length_base,
            reweight=self.reweight,
            reweight_threshold=self.reweight_threshold,
            reweight_power=self.reweight_power,
            q_offset=q_offset,
            dropout_rate=0.0 if deterministic else self.dropout_rate,
            dropout_rng=self.dropout_rng(deterministic),
            return_probs=True,
        )
        if self.wants_weights():
            self.sow("intermediates", "attention_weights", aux["probs"])
        return out
