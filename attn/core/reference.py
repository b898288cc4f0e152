"""Reference softmax attention in plain jnp: the ground truth every kernel and mechanism is checked against.

    logits = scale * q k^T                      (scale defaults to 1/sqrt(head_dim))
    logits = softcap * tanh(logits / softcap)   (if softcap)
    logits = logits + bias                      (if bias)
    logits = -inf where the mask forbids        (rows with no allowed key give output 0 and lse -inf)
    p      = softmax(logits) over keys, with an optional per-head sink logit in the denominator only
    out    = dropout(p) v

GQA/MQA group the query heads over the kv heads with a reshape; k and v are never repeated in memory.
Time O(B H Tq Tk D), memory O(B H Tq Tk).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn.core.masks import Mask

Array = jax.Array


def grouped_logits(q: Array, k: Array) -> Array:
    """q [B, Tq, H, D] . k [B, Tk, KVH, D] -> float32 [B, H, Tq, Tk] (unscaled); query heads are grouped over the
    kv heads with a reshape, so k is never repeated (GQA/MQA)."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    return logits.reshape(batch, heads, q_len, k.shape[1])


def grouped_weighted_values(weights: Array, v: Array) -> Array:
    """Attention weights [B, H, Tq, Tk] times values [B, Tk, KVH, Dv] -> float32 [B, Tq, H, Dv], grouped like
    `grouped_logits` (v is never repeated)."""
    batch, heads, q_len, kv_len = weights.shape
    kv_heads = v.shape[2]
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, q_len, kv_len)
    out = jnp.einsum("bkgts,bskd->btkgd", grouped.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, v.shape[-1])


def _grouped(x: Array, batch: int, kv_heads: int, groups: int) -> Array:
    """Broadcasts a [B|1, H|1, Tq, Tk] array to the grouped layout [B|1, KVH|1, G|1, Tq, Tk]."""
    b, h, tq, tk = x.shape
    if h == 1:
        return x[:, :, None]
    return x.reshape(b, kv_heads, groups, tq, tk)


def reference_softmax_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Mask | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Array | None = None,
    q_offset: Any = 0,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
    return_lse: bool = False,
) -> Array | tuple[Array, dict[str, Array]]:
    """Softmax attention, computed densely in float32.

    Args:
      q: [B, Tq, H, D]; k: [B, Tk, KVH, D]; v: [B, Tk, KVH, Dv], H a multiple of KVH.
      mask: structured mask (see `attn.Mask`), evaluated with queries at absolute positions q_offset + i.
      bias: additive logits bias broadcastable to [B, H, Tq, Tk].
      sinks: float [H] per-head sink logit (attention "off" mass that takes no value).
      dropout_rate / dropout_rng: dropout on the probabilities.
      return_probs / return_lse: also return {"probs": float32 [B, H, Tq, Tk], "lse": float32 [B, H, Tq]}.
    Returns:
      out [B, Tq, H, Dv] in q.dtype, or (out, aux) when a return_* flag is set.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale

    logits = grouped_logits(q, k).reshape(batch, kv_heads, groups, q_len, kv_len) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        bias = jnp.broadcast_to(bias, (bias.shape[0] if bias.ndim == 4 else 1, heads, q_len, kv_len))
        logits = logits + _grouped(bias, batch, kv_heads, groups)
    if mask is not None:
        allowed = _grouped(mask.materialize(q_len, kv_len, q_offset=q_offset), batch, kv_heads, groups)
        logits = jnp.where(allowed, logits, -jnp.inf)

    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if sinks is not None:
        sink = jnp.asarray(sinks, jnp.float32).reshape(1, kv_heads, groups, 1, 1)
        row_max = jnp.maximum(row_max, sink)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalized = jnp.exp(logits - row_max)
    denom = jnp.sum(unnormalized, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - row_max)
    probs = unnormalized / jnp.where(denom == 0.0, 1.0, denom)
    lse = jnp.where(denom == 0.0, -jnp.inf, row_max + jnp.log(jnp.where(denom == 0.0, 1.0, denom)))[..., 0]

    attended = probs
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        attended = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = grouped_weighted_values(attended.reshape(batch, heads, q_len, kv_len), v).astype(q.dtype)
    if not (return_probs or return_lse):
        return out
    aux: dict[str, Array] = {}
    if return_probs:
        aux["probs"] = probs.reshape(batch, heads, q_len, kv_len)
    if return_lse:
        aux["lse"] = lse.reshape(batch, heads, q_len)
    return out, aux
