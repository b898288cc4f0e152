"""The bridge from the functional ops to the Pallas kernels: which calls a kernel can take, and the call itself.

`attn.functional.softmax_attention` and `attn.functional.linear_attention` ask `flash_unavailable` /
`lightning_unavailable` for the reason a kernel cannot serve a call (None when it can) and hand that to
`dispatch.select`, so `implementation=None` uses the kernel on GPU/TPU whenever the options allow and otherwise
falls back to XLA, logging why once; `implementation="pallas"` raises that reason as the error.

Kernel coverage (pallas_kernels.flash_attention): causal (query offset 0), sliding window, q/kv segment ids,
q/kv padding lengths (folded into segment ids), bias, softcap, sinks, lse; not: prefix-LM, block or dense masks,
mask functions, dropout, returned probabilities, a query offset (decoding), head_dim > 256, Dv != D.
pallas_kernels.lightning_attention: causal linear attention with no decay or a per-head constant decay, any
feature map and normaliser applied outside, initial / final state; not: non-causal, a data-dependent decay, the
"quadratic"/"recurrent" reference forms, head dims > 256.

Setting the environment variable ATTN_KERNELS=0 makes every kernel unavailable (the reason says so), so
`implementation=None` never picks one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core import dispatch
from attn.core.masks import Mask
from attn.core.padding import valid_tokens

Array = jax.Array

KERNEL_PLATFORMS = ("gpu", "tpu")
# ATTN_KERNELS=0 keeps every op on XLA/cuDNN (an escape hatch should a kernel not compile on some device).
DISABLE_ENV = "ATTN_KERNELS"
MAX_KERNEL_HEAD_DIM = 256
# Segment ids given to padded rows / keys: distinct, so a padded query never matches a padded key.
_PAD_QUERY, _PAD_KEY = np.iinfo(np.int32).min, np.iinfo(np.int32).min + 1


def _platform_reason(op: str) -> str | None:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"Pallas kernels are switched off ({DISABLE_ENV}=0 in the environment)"
    platform = dispatch.platform()
    if platform not in KERNEL_PLATFORMS:
        return f"no Pallas {op} kernel for platform {platform!r} (kernels run on {' and '.join(KERNEL_PLATFORMS)})"
    return None


def flash_unavailable(
    q: Array,
    v: Array,
    mask: Mask | None,
    *,
    dropout_rate: float,
    return_probs: bool,
    q_offset: Any,
) -> str | None:
    """Why the flash kernel cannot compute this softmax-attention call, or None when it can."""
    reason = _platform_reason("flash attention")
    if reason:
        return reason
    if dropout_rate:
        return "attention dropout is not supported by the flash kernel"
    if return_probs:
        return "return_probs needs the full probability matrix, which the flash kernel never builds"
    if not (isinstance(q_offset, (int, np.integer)) and q_offset == 0):
        return "a query offset (decoding with a KV cache) is not supported by the flash kernel"
    if q.shape[-1] > MAX_KERNEL_HEAD_DIM or v.shape[-1] != q.shape[-1]:
        dims = f"D={q.shape[-1]}, Dv={v.shape[-1]}"
        return f"the flash kernel needs head_dim <= {MAX_KERNEL_HEAD_DIM} and Dv == D, got {dims}"
    if mask is not None:
        parts = [
            name for name in ("prefix_lengths", "block_mask", "dense", "mask_fn") if getattr(mask, name) is not None
        ]
        if parts:
            return f"mask parts {parts} are not supported by the flash kernel"
    return None


def _segment_ids(mask: Mask, batch: int, q_len: int, kv_len: int) -> tuple[Array, Array] | None:
    """(q_ids [B, Tq], kv_ids [B, Tk]) expressing the mask's segment ids and padding lengths, or None."""
    if all(getattr(mask, f) is None for f in ("q_segment_ids", "kv_segment_ids", "q_lengths", "kv_lengths")):
        return None

    def ids(segment, lengths, length, pad):
        out = jnp.zeros((batch, length), jnp.int32) if segment is None else jnp.asarray(segment, jnp.int32)
        out = jnp.broadcast_to(out, (batch, length))
        if lengths is not None:
            out = jnp.where(valid_tokens(lengths, batch, length), out, pad)
        return out

    return (
        ids(mask.q_segment_ids, mask.q_lengths, q_len, _PAD_QUERY),
        ids(mask.kv_segment_ids, mask.kv_lengths, kv_len, _PAD_KEY),
    )


def flash_attention_call(
    q: Array,
    k: Array,
    v: Array,
    mask: Mask | None,
    *,
    bias: Array | None,
    scale: float | None,
    softcap: float | None,
    sinks: Array | None,
    return_lse: bool,
) -> Array | tuple[Array, dict[str, Array]]:
    """softmax_attention through `pallas_kernels.flash_attention` (call only when `flash_unavailable` is None)."""
    from pallas_kernels import flash_attention

    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    if bias is not None:
        bias = jnp.asarray(bias)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, kv_len))
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs = dict(causal=mask.causal, window=mask.window, segment_ids=_segment_ids(mask, batch, q_len, kv_len))
    result = flash_attention(
        q, k, v, bias=bias, scale=scale, softcap=softcap, sinks=sinks, return_stats=return_lse, **kwargs
    )
    if not return_lse:
        return result
    out, stats = result
    return out, {"lse": stats["lse"]}


def lightning_unavailable(causal: bool, decay: Any, form: str | None, heads: int, dk: int, dv: int) -> str | None:
    """Why the lightning kernel cannot compute this linear-attention call, or None when it can.

    decay: the `decay` argument of linear_attention (None, a scalar, [H] or a data-dependent [B, T, H]).
    """
    reason = _platform_reason("lightning attention")
    if reason:
        return reason
    if not causal:
        return "the lightning kernel is causal only"
    if form not in (None, "chunked"):
        return f"form={form!r} asks for a reference form, not the chunked kernel"
    if decay is not None and np.ndim(decay) != 0 and np.shape(decay) != (heads,):
        return "a data-dependent decay [batch, length, heads] is not supported by the lightning kernel"
    if dk > MAX_KERNEL_HEAD_DIM or dv > MAX_KERNEL_HEAD_DIM:
        return f"the lightning kernel needs feature and value dims <= {MAX_KERNEL_HEAD_DIM}, got {dk} and {dv}"
    return None


def lightning_attention_call(
    q: Array, k: Array, v: Array, log_decay: Array | None, state: Array
) -> tuple[Array, Array]:
    """Causal chunked linear attention through `pallas_kernels.lightning_attention`.

    q, k [B, H, T, Dk], v [B, H, T, Dv] (the core's head-major layout), log_decay [1, H, T] (constant over T) or
    None, state f32 [B, H, Dk, Dv]. Returns (out [B, H, T, Dv], final state), like the core's causal forms. The
    kernel picks its own chunk (a tile size of its backend); the result does not depend on it.
    """
    from pallas_kernels import lightning_attention

    decay = None if log_decay is None else jnp.exp(log_decay[0, :, 0])
    out, final = lightning_attention(
        *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)),
        decay=decay,
        initial_state=state,
        return_state=True,
    )
    return jnp.swapaxes(out, 1, 2), final
