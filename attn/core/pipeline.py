"""The softmax-family attention pipeline, one pure function per stage.

    logits  = scores(q, k)                    scale * q k^T, optional softcap     float32 [B, H, Tq, Tk]
    logits  = logits + bias                   (score_mod: position biases, steering)
    logits  = mask(logits)                    -inf where the mask forbids
    weights = normalize(logits)               softmax (with optional per-head sinks), or a variant's normalizer
    weights = prob_mod(weights)               (e.g. clipped softmax)
    weights = dropout(weights)                attention dropout, off when deterministic
    heads   = mix(weights, v)                 [B, Tq, H, Dv], grouped over kv heads (GQA/MQA, v never repeated)

`attn.core.reference.reference_softmax_attention` is exactly these functions in sequence, and so is the explicit
path of `attn.core.softmax_layer.SoftmaxAttentionLayer` (whose stages are interceptable methods), so the two give
bit-identical results. Fully masked rows give weights 0, output 0 and lse -inf (never NaN).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn.core import dispatch
from attn.core.masks import Mask

Array = jax.Array


def accumulation_dtype(*arrays: Array) -> Any:
    """float32, or float64 when an input is float64: low precision (bf16/fp16) inputs accumulate in float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _dot_operands(*arrays: Array) -> tuple[Array, ...]:
    """The operands of a grouped einsum. XLA:CPU has no bf16 x bf16 -> f32 dot for some shapes ("Unsupported
    element type for DotThunk"), so on CPU low-precision operands are widened first (the accumulation is float32
    either way); on GPU/TPU they stay in their dtype."""
    if dispatch.platform() == "cpu" and any(jnp.dtype(a.dtype).itemsize < 4 for a in arrays):
        return tuple(a.astype(jnp.float32) if jnp.dtype(a.dtype).itemsize < 4 else a for a in arrays)
    return arrays


def grouped_logits(q: Array, k: Array) -> Array:
    """q [B, Tq, H, D] . k [B, Tk, KVH, D] -> float32 (float64 for float64 inputs) [B, H, Tq, Tk] (unscaled);
    query heads are grouped over the kv heads with a reshape, so k is never repeated (GQA/MQA).

    One `dot_general` with q as the left operand, so the product comes out query-major ([B, KVH, G, Tq, Tk])
    and no Tq x Tk transpose follows; only q ([B, Tq, H, D]) is moved into [B, KVH, G, Tq, D] first."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if kv_heads == heads:
        # No grouping: the 4-D product [B, H, Tq, Tk]. A unit group axis ([B, H, 1, Tq, Tk]) survives into XLA:CPU's
        # softmax fusion and costs it about 1.3x (measured against jax.nn.dot_product_attention at T=1K-2K).
        qq, kk = _dot_operands(q, k)
        # contract D (axis 3 of both); batch over B and H (axes 0, 2 of both) -> [B, H, Tq, Tk], as jax.nn's einsum
        return jax.lax.dot_general(
            qq, kk, (((3,), (3,)), ((0, 2), (0, 2))), preferred_element_type=accumulation_dtype(q, k)
        )
    grouped = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    qg, kk = _dot_operands(grouped, k)
    # contract D (axis 4 of qg, 3 of k); batch over B and KVH (axes 0, 1 of qg; 0, 2 of k) -> [B, KVH, G, Tq, Tk]
    logits = jax.lax.dot_general(
        qg, kk, (((4,), (3,)), ((0, 1), (0, 2))), preferred_element_type=accumulation_dtype(q, k)
    )
    return logits.reshape(batch, heads, q_len, k.shape[1])


def grouped_weighted_values(weights: Array, v: Array) -> Array:
    """Attention weights [B, H, Tq, Tk] times values [B, Tk, KVH, Dv] -> float32 [B, Tq, H, Dv], grouped like
    `grouped_logits` (v is never repeated).

    One `dot_general` with v as the left operand ([B, KVH, Dv, G, Tq] out, then a Tq x Dv transpose): the order
    `jax.nn.dot_product_attention` lowers to, with which XLA:CPU keeps no extra [Tq, H, Dv] buffer."""
    batch, heads, q_len, kv_len = weights.shape
    kv_heads = v.shape[2]
    if kv_heads == heads:  # no grouping: 4-D, as in grouped_logits
        ww, vv = _dot_operands(weights.astype(v.dtype), v)
        # contract Tk (axis 1 of v, 3 of weights); batch over B, H (axes 0, 2 of v; 0, 1 of weights) -> [B, H, Dv, Tq]
        out = jax.lax.dot_general(
            vv, ww, (((1,), (3,)), ((0, 2), (0, 1))), preferred_element_type=accumulation_dtype(weights, v)
        )
        return out.transpose(0, 3, 1, 2)
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, q_len, kv_len)
    wg, vv = _dot_operands(grouped.astype(v.dtype), v)
    # contract Tk (axis 1 of v, 4 of wg); batch over B and KVH (axes 0, 2 of v; 0, 1 of wg) -> [B, KVH, Dv, G, Tq]
    out = jax.lax.dot_general(
        vv, wg, (((1,), (4,)), ((0, 2), (0, 1))), preferred_element_type=accumulation_dtype(weights, v)
    )
    return out.transpose(0, 4, 1, 3, 2).reshape(batch, q_len, heads, v.shape[-1])


def scores(q: Array, k: Array, *, scale: float | None = None, softcap: float | None = None) -> Array:
    """Scaled (and optionally soft-capped) logits: float32 [B, H, Tq, Tk] from q [B, Tq, H, D], k [B, Tk, KVH, D].

    scale defaults to 1/sqrt(D); softcap maps logits -> softcap * tanh(logits / softcap) (before any bias, as in
    FlashAttention-2)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = grouped_logits(q, k) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def add_bias(logits: Array, bias: Array | None) -> Array:
    """logits [B, H, Tq, Tk] + bias broadcastable to it (float32); None leaves the logits unchanged."""
    if bias is None:
        return logits
    return logits + jnp.asarray(bias, logits.dtype)


def mask_logits(logits: Array, mask: Mask | None, *, q_offset: Any = 0) -> Array:
    """-inf where `mask` forbids (queries at absolute positions q_offset + i); logits [B, H, Tq, Tk]."""
    if mask is None:
        return logits
    allowed = mask.materialize(logits.shape[-2], logits.shape[-1], q_offset=q_offset)
    return jnp.where(allowed, logits, -jnp.inf)


def softmax_weights(logits: Array, *, sinks: Array | None = None) -> tuple[Array, Array]:
    """Softmax over keys of logits [B, H, Tq, Tk] -> (weights float32 [B, H, Tq, Tk], lse float32 [B, H, Tq]).

    sinks: float [H], a per-head logit that joins the denominator and takes no value (weights then sum to < 1).
    Rows with no finite logit (fully masked) give weights 0 and lse -inf, with gradient 0 (never NaN).

    Differentiated by its own rule (`_softmax_lse_jvp`), like `jax.nn.softmax`: the derivative is written in the
    outputs (d weights = weights (d logits - sum(weights d logits)), d lse = sum(weights d logits)), so the
    backward pass keeps only the weights and never differentiates the row max or the empty-row guards.
    """
    sink = None if sinks is None else jnp.asarray(sinks, logits.dtype).reshape(1, -1, 1, 1)
    return _softmax_lse(logits, sink)


def _softmax_parts(logits: Array, sink: Array | None, *, select_empty: bool) -> tuple[Array, Array]:
    """(weights [B, H, Tq, Tk], lse [B, H, Tq]) of logits [B, H, Tq, Tk] with an optional sink logit [1, H, 1, 1].

    Two spellings of the same numbers (bit-identical: a row with a finite logit or a sink has denom >= 1, so the
    floor never acts, and a fully masked row gets weights 0 either way); they differ only in what XLA:CPU makes of
    them. select_empty=False floors the denominator (1 / max(denom, tiny)): max, exp, sum and scaling then fuse into
    one pass over the logits, as for `jax.nn.softmax`. select_empty=True zeroes the row scale of empty rows with a
    select: the forward then takes a separate pass for the sum, but under differentiation XLA keeps one [B, H, Tq, Tk]
    buffer fewer (the floored form measured 1.3x jax.nn's forward+backward memory at T=1K-2K). The primal uses the
    first, the derivative rule the second.
    """
    # The max starts from the most negative finite value, so a fully masked row (all -inf) gets a finite max and
    # exp gives exact zeros (no inf - inf), while every row with a finite logit keeps its own max. A guard on the
    # max itself (where(isfinite)) would split max and exp into two passes that both read the logits.
    row_max = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.finfo(logits.dtype).max)
    if sink is not None:
        row_max = jnp.maximum(row_max, sink)
    unnormalized = jnp.exp(logits - row_max)
    denom = jnp.sum(unnormalized, axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + jnp.exp(sink - row_max)
    empty = denom == 0.0
    if select_empty:
        weights = unnormalized * jnp.where(empty, 0.0, 1.0 / denom)
    else:
        weights = unnormalized * (1.0 / jnp.maximum(denom, jnp.finfo(denom.dtype).tiny))
    lse = jnp.where(empty, -jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, denom)))[..., 0]
    return weights, lse


@jax.custom_jvp
def _softmax_lse(logits: Array, sink: Array | None) -> tuple[Array, Array]:
    """(weights [B, H, Tq, Tk], lse [B, H, Tq]) of logits [B, H, Tq, Tk] with an optional sink logit [1, H, 1, 1]."""
    return _softmax_parts(logits, sink, select_empty=False)


@_softmax_lse.defjvp
def _softmax_lse_jvp(primals, tangents):
    """With p_s = exp(sink - lse) the sink's share: d w_i = w_i (d x_i - sum_j w_j d x_j - p_s d sink) and
    d lse = sum_j w_j d x_j + p_s d sink. Masked keys and empty rows have w = 0, so their tangents are 0."""
    logits, sink = primals
    d_logits, d_sink = tangents
    weights, lse = _softmax_parts(logits, sink, select_empty=True)
    d_lse = jnp.sum(weights * d_logits, axis=-1, keepdims=True)
    if sink is not None:
        share = jnp.where(jnp.isfinite(lse), jnp.exp(sink[..., 0] - lse), 0.0)[..., None]  # p_s; 0 when all -inf
        d_lse = d_lse + share * d_sink
    return (weights, lse), (weights * (d_logits - d_lse), d_lse[..., 0])


def dropout_weights(weights: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout on attention weights; rate 0 (or rng None with rate 0) returns them unchanged."""
    if rate == 0.0:
        return weights
    if not 0.0 < rate < 1.0:
        raise ValueError(f"dropout_rate={rate!r} must be in [0, 1)")
    if rng is None:
        raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def mix(weights: Array, v: Array) -> Array:
    """weights [B, H, Tq, Tk] x v [B, Tk, KVH, Dv] -> float32 [B, Tq, H, Dv] (grouped, v never repeated)."""
    return grouped_weighted_values(weights, v)


def key_mass(weights: Array) -> Array:
    """Attention each key received, summed over queries: weights [B, H, Tq, Tk] -> float32 [B, H, Tk]."""
    return jnp.sum(weights, axis=-2, dtype=accumulation_dtype(weights))
