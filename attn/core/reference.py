"""Reference softmax attention in plain jnp: the ground truth every kernel and mechanism is checked against.

    logits = scale * q k^T                      (scale defaults to 1/sqrt(head_dim))
    logits = softcap * tanh(logits / softcap)   (if softcap)
    logits = logits + bias                      (if bias)
    logits = -inf where the mask forbids        (rows with no allowed key give output 0 and lse -inf)
    p      = softmax(logits) over keys, with an optional per-head sink logit in the denominator only
    out    = dropout(p) v

GQA/MQA group the query heads over the kv heads with a reshape; k and v are never repeated in memory. The stages
are the functions of `attn.core.pipeline`, called in sequence (the layers' explicit path calls the same ones).
Time O(B H Tq Tk D), memory O(B H Tq Tk).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn.core import pipeline
from attn.core.masks import Mask

Array = jax.Array


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
    heads = q.shape[2]
    if sinks is not None:
        sinks = jnp.asarray(sinks, jnp.float32).reshape(heads)
    logits = pipeline.scores(q, k, scale=scale, softcap=softcap)
    logits = pipeline.add_bias(logits, bias)
    logits = pipeline.mask_logits(logits, mask, q_offset=q_offset)
    probs, lse = pipeline.softmax_weights(logits, sinks=sinks)
    attended = pipeline.dropout_weights(probs, dropout_rate, dropout_rng)
    out = pipeline.mix(attended, v).astype(q.dtype)
    if not (return_probs or return_lse):
        return out
    aux: dict[str, Array] = {}
    if return_probs:
        aux["probs"] = probs
    if return_lse:
        aux["lse"] = lse
    return out, aux
