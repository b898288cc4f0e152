"""`softmax_attention`: exact softmax attention behind one call, dispatched to the Pallas flash kernel, cuDNN or the
jnp reference (`attn.core.reference`). `attn.functional.softmax_attention` is this function.

Layouts follow `jax.nn.dot_product_attention`: q [batch, q_len, heads, head_dim], k and v
[batch, kv_len, kv_heads, head_dim], heads a multiple of kv_heads (MHA, GQA, MQA); the output is shaped like q.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core import blockwise_softmax, dispatch, kernels
from attn.core.masks import Mask
from attn.core.reference import reference_softmax_attention
from attn.core.validation import check_qkv, normalize_window, shape_of

Array = jax.Array

__all__ = ["softmax_attention"]


def softmax_attention(
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
    softcap: float | None = None,
    sinks: Array | None = None,
    q_offset: Any = 0,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
    return_lse: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, dict[str, Array]]:
    """Exact softmax attention with masks, bias, softcap, sinks, GQA/MQA and dropout.

    Args:
      q: [B, Tq, H, D] query. k: [B, Tk, KVH, D] key. v: [B, Tk, KVH, Dv] value. H % KVH == 0.
      causal: key j is visible to query i only if j <= q_offset + i.
      mask: an `attn.Mask` (structured; preferred) or a boolean array broadcastable to [B, H, Tq, Tk].
      bias: float, broadcastable to [B, H, Tq, Tk]; added to the logits after softcap.
      window: sliding window, int w (= (w, w)) or (left, right) keys around the query.
      segment_ids: int [B, T] for self-attention, or a pair (q_segment_ids [B, Tq], kv_segment_ids [B, Tk]).
      scale: logit scale, default 1/sqrt(D). softcap: logits -> softcap * tanh(logits / softcap).
      sinks: float [H], a per-head logit that joins the softmax denominator and attends to nothing.
      q_offset: absolute position of the first query (decoding with a KV cache).
      dropout_rate, dropout_rng: dropout on the attention probabilities.
      return_probs, return_lse: also return a dict with "probs" float32 [B, H, Tq, Tk] and/or
        "lse" float32 [B, H, Tq] (log-sum-exp of the masked logits, -inf for rows with no visible key).
      implementation: None (fastest available: the Pallas flash kernel on GPU/TPU when the options allow it —
        see attn/core/kernels.py — then cuDNN, then "xla_blockwise" when the dense float32 score matrix
        [B, H, Tq, Tk] would exceed `blockwise_softmax.AUTO_THRESHOLD_BYTES` (256 MiB) and the options allow it,
        then XLA), "xla" (the jnp reference), "xla_blockwise" (`attn.core.blockwise_softmax`: online softmax over
        key blocks, O(T) memory, gradients by recomputation; structured masks, scale, q_offset and lse only — no
        bias, softcap, sinks, dropout, returned probabilities or dense boolean mask), "cudnn" (GPU), "pallas"
        (`pallas_kernels.flash_attention`; raises where it cannot serve the call, e.g. on CPU).
    Returns:
      [B, Tq, H, Dv] in q.dtype, or (out, aux) if return_probs or return_lse.
    Rows whose keys are all masked produce zeros.
    """
    heads, _ = check_qkv(q, k, v)
    q_len, kv_len = q.shape[1], k.shape[1]
    window = normalize_window(window, q_len=q_len, kv_len=kv_len)
    if isinstance(mask, Mask) and mask.window is not None:
        normalize_window(mask.window, q_len=q_len, kv_len=kv_len)
    if bias is not None:
        _check_broadcast("bias", bias, (q.shape[0], heads, q_len, kv_len))
    if mask is not None and not isinstance(mask, Mask):
        _check_broadcast("mask", mask, (q.shape[0], heads, q_len, kv_len))
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be a positive float or None")
    if sinks is not None and shape_of(sinks) != (heads,):
        raise ValueError(f"sinks must have shape (num_heads,) = ({heads},), got {shape_of(sinks)}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
    full_mask = Mask.from_args(causal=causal, mask=mask, window=window, segment_ids=segment_ids)

    wants_aux = return_probs or return_lse
    blockwise_reason = blockwise_softmax.blockwise_unavailable(
        full_mask, bias=bias, softcap=softcap, sinks=sinks, dropout_rate=dropout_rate, return_probs=return_probs
    )
    if implementation == blockwise_softmax.IMPLEMENTATION:
        if blockwise_reason is not None:
            raise ValueError(
                f"implementation={implementation!r} is not available for softmax_attention: {blockwise_reason}"
            )
        dispatch.log_choice_once("softmax_attention", implementation, "requested")
        choice = implementation
    else:
        if implementation not in dispatch.IMPLEMENTATIONS:
            expected = (*dispatch.IMPLEMENTATIONS, blockwise_softmax.IMPLEMENTATION)
            raise ValueError(f"implementation={implementation!r} is not supported; expected one of {expected}")
        choice = dispatch.select(
            "softmax_attention",
            implementation,
            {
                "pallas": kernels.flash_unavailable(
                    q, v, full_mask, dropout_rate=dropout_rate, return_probs=return_probs, q_offset=q_offset
                ),
                "cudnn": _cudnn_unavailable(full_mask, softcap, sinks, dropout_rate, wants_aux, q_offset, q.dtype),
                blockwise_softmax.IMPLEMENTATION: blockwise_reason or blockwise_softmax.small_scores_reason(q, k),
                "xla": None,
            },
        )
    if choice == blockwise_softmax.IMPLEMENTATION:
        return blockwise_softmax.blockwise_attention(
            q, k, v, mask=full_mask, scale=scale, q_offset=q_offset, return_lse=return_lse
        )
    if choice == "cudnn":
        return _cudnn_attention(q, k, v, full_mask, bias, scale)
    if choice == "pallas":
        return kernels.flash_attention_call(
            q, k, v, full_mask, bias=bias, scale=scale, softcap=softcap, sinks=sinks, return_lse=return_lse
        )
    return reference_softmax_attention(
        q,
        k,
        v,
        mask=full_mask,
        bias=bias,
        scale=scale,
        softcap=softcap,
        sinks=sinks,
        q_offset=q_offset,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        return_probs=return_probs,
        return_lse=return_lse,
    )


def _check_broadcast(name: str, x: Any, target: tuple[int, ...]) -> None:
    shape = shape_of(x)
    try:
        if len(shape) > 4:
            raise ValueError
        np.broadcast_shapes(shape, target)
    except ValueError:
        raise ValueError(f"{name} of shape {shape} does not broadcast to [B, H, Tq, Tk] = {target}") from None


def _cudnn_unavailable(mask, softcap, sinks, dropout_rate, wants_aux, q_offset, dtype) -> str | None:
    if dispatch.platform() != "gpu":
        return f"cuDNN attention needs a GPU, platform is {dispatch.platform()!r}"
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention needs bfloat16/float16 inputs, got {dtype}"
    if softcap is not None or sinks is not None or dropout_rate or wants_aux:
        return "softcap, sinks, dropout and returned probabilities/lse are not supported by cuDNN"
    if not (isinstance(q_offset, int) and q_offset == 0):
        return "a query offset (decoding) is not supported by cuDNN"
    if mask is not None:
        extra = [f for f in ("q_segment_ids", "prefix_lengths", "block_mask", "dense") if getattr(mask, f) is not None]
        if extra or mask.mask_fn is not None:
            return f"mask parts {extra or ['mask_fn']} are not supported by cuDNN"
    return None


def _cudnn_attention(q, k, v, mask: Mask | None, bias, scale) -> Array:
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs = dict(
            is_causal=mask.causal,
            query_seq_lengths=mask.q_lengths,
            key_value_seq_lengths=mask.kv_lengths,
            local_window_size=mask.window,
        )
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="cudnn", **kwargs)
