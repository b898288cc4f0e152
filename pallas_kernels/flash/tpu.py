"""Flash attention on TPU with Pallas Mosaic kernels: the backend entry `flash_attention_tpu` and its custom VJP.

The wrapper pads and re-lays the (already validated, normalised) inputs for the kernels — head-major
[B, H, T, D], lengths padded to block multiples (padded keys are masked by position in the kernels, padded
queries are sliced off), head_dim zero-padded to a multiple of 128 lanes (q.k and p.v are unchanged), bias-factor
rank zero-padded to a multiple of 128 — runs the forward kernel (tpu_forward.py), and differentiates with the
recomputing dK/dV and dQ kernels (tpu_backward.py). Padding, transposes and broadcast sums are plain jnp outside
the custom_vjp, so JAX maps the kernels' cotangents back to the caller's shapes.

Semantics (same as attn.core.reference.reference_softmax_attention): s = scale q.k; softcap; + bias + u v^T;
causal / window / segment mask -> -inf; softmax with an optional per-head sink logit in the denominator only.
Rows with no visible key give out 0 and lse -inf (lse = sink with sinks).

block_sizes keys (ints): "block_q" (default 256) and "block_kv" (default 512) for the forward kernel;
"block_q_bwd" (default 256) and "block_kv_bwd" (default 256) for the backward and key-mass kernels. q blocks
are multiples of 8 (16 when an input is 16-bit), kv blocks multiples of 128; blocks larger than the (rounded-up)
sequence shrink to it. TPU memory cost: O(B H T Dp) plus, with a dense bias, an f32 dS of [B, H, Tq, Tk] in the
backward pass (summed over the bias's broadcast dims).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash.tiling import MaskSpec
from pallas_kernels.flash.tpu_backward import backward_call
from pallas_kernels.flash.tpu_forward import forward_call, key_mass_call
from pallas_kernels.flash.tpu_tiles import LANES, SUBLANES, FlashConfig, round_up

DEFAULT_BLOCK_SIZES = {"block_q": 256, "block_kv": 512, "block_q_bwd": 256, "block_kv_bwd": 256}


def _block_sizes(block_sizes: dict | None, sublanes: int) -> dict:
    sizes = dict(DEFAULT_BLOCK_SIZES)
    for key, value in (block_sizes or {}).items():
        if key not in DEFAULT_BLOCK_SIZES:
            raise ValueError(f"block_sizes key {key!r} is unknown for the TPU kernel; expected some of {sorted(sizes)}")
        multiple = LANES if key.startswith("block_kv") else sublanes
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
            raise ValueError(f"block_sizes[{key!r}]={value!r} must be a positive int multiple of {multiple} on TPU")
        sizes[key] = value
    return sizes


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _head_major(x: jax.Array, length: int, width: int) -> jax.Array:
    """[B, T, H, D] -> [B, H, length, width], zero padded."""
    return _pad_axis(_pad_axis(jnp.swapaxes(x, 1, 2), 2, length), 3, width)


def _sum_broadcast(x: jax.Array, bcast: tuple[bool, bool]) -> jax.Array:
    axes = tuple(axis for axis, flag in enumerate(bcast) if flag)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _ops_dict(q, k, v, q_seg, kv_seg, bias, u, vf, sinks) -> dict:
    return {"q": q, "k": k, "v": v, "q_seg": q_seg, "kv_seg": kv_seg, "bias": bias, "u": u, "v_factor": vf,
            "sinks": sinks}  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_core(cfg, q, k, v, q_seg, kv_seg, bias, u, vf, sinks):
    out, lse = forward_call(cfg, _ops_dict(q, k, v, q_seg, kv_seg, bias, u, vf, sinks))
    return out, lse


def _flash_core_fwd(cfg, q, k, v, q_seg, kv_seg, bias, u, vf, sinks):
    out, lse = forward_call(cfg, _ops_dict(q, k, v, q_seg, kv_seg, bias, u, vf, sinks))
    return (out, lse), (q, k, v, q_seg, kv_seg, bias, u, vf, sinks, out, lse)


def _flash_core_bwd(cfg, residuals, cotangents):
    q, k, v, q_seg, kv_seg, bias, u, vf, sinks, out, lse = residuals
    d_out, d_lse = cotangents
    # d lse_i / d s_ij = p_ij, so the lse cotangent g enters as delta_i = dO_i . O_i - g_i (g = 0 on padded rows).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    delta = delta - d_lse.astype(jnp.float32)
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    ops = _ops_dict(q, k, v, q_seg, kv_seg, bias, u, vf, sinks)
    grads = backward_call(cfg, ops, lse_safe, delta, d_out.astype(q.dtype))
    d_bias = d_u = d_vf = d_sinks = None
    if cfg.has_bias:
        d_bias = _sum_broadcast(grads["ds"], cfg.bias_bcast).astype(bias.dtype)
    if cfg.has_factors:
        d_u = _sum_broadcast(grads["du"], cfg.u_bcast).astype(u.dtype)
        d_vf = _sum_broadcast(grads["dv_factor"], cfg.v_bcast).astype(vf.dtype)
    if cfg.has_sinks:
        # d lse_i / d sink = P_sink_i = exp(sink - lse_i) and d out_i / d sink = -P_sink_i out_i, so
        # d sink = sum_i P_sink_i (g_i - dO_i . O_i) = -sum_i P_sink_i delta_i (padded rows have delta = 0).
        p_sink = jnp.exp(sinks[None, :, None] - lse[..., 0])
        d_sinks = -jnp.sum(p_sink * delta[..., 0], axis=(0, 2)).astype(sinks.dtype)
    return (grads["dq"], grads["dk"], grads["dv"], None, None, d_bias, d_u, d_vf, d_sinks)


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


def flash_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    bias: jax.Array | None,
    bias_u: jax.Array | None,
    bias_v: jax.Array | None,
    sinks: jax.Array | None,
    *,
    causal: bool,
    window: tuple[int, int] | None,
    softcap: float | None,
    scale: float,
    return_stats: bool,
    block_sizes: dict | None,
    interpret: bool | pltpu.InterpretParams,
):
    """Flash attention with Pallas Mosaic TPU kernels (arguments already validated by `flash_attention`).

    Args:
      q [B, Tq, H, D]; k, v [B, Tk, KVH, D] (H % KVH == 0, kv head of query head h is h // (H // KVH)).
      q_segment_ids int [B, Tq] and kv_segment_ids int [B, Tk], or both None.
      bias [B|1, H|1, Tq, Tk] or None; bias_u [B|1, Tq, H|1, R] and bias_v [B|1, Tk, H|1, R] or both None.
      sinks float [H] or None. causal, window (left, right) or None, softcap > 0 or None, scale: float.
      block_sizes: see the module docstring. interpret: False (compile for TPU), True (Pallas TPU interpreter
        with default pltpu.InterpretParams) or a pltpu.InterpretParams.
    Returns:
      out [B, Tq, H, D] in q.dtype; with return_stats also lse f32 [B, H, Tq] and key_mass f32 [B, H, Tk]
      (column sums of the probabilities). out and lse are differentiable in q, k, v, bias, bias_u, bias_v and
      sinks; key_mass is a statistic (stop_gradient'ed).
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together (both None or both arrays)")
    if (bias_u is None) != (bias_v is None):
        raise ValueError("bias_u and bias_v must be given together (both None or both arrays)")
    # 16-bit (8-bit) arrays are tiled (16, 128) ((32, 128)) in TPU memory: q-side blocks follow the narrowest dtype.
    itemsize = min(jnp.dtype(x.dtype).itemsize for x in (q, k, v, bias, bias_u, bias_v) if x is not None)
    sublanes = SUBLANES * max(1, 4 // itemsize)
    sizes = _block_sizes(block_sizes, sublanes)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    bq = min(sizes["block_q"], round_up(q_len, sublanes))
    bq_bwd = min(sizes["block_q_bwd"], round_up(q_len, sublanes))
    bk = min(sizes["block_kv"], round_up(kv_len, LANES))
    bk_bwd = min(sizes["block_kv_bwd"], round_up(kv_len, LANES))
    q_len_p = round_up(q_len, math.lcm(bq, bq_bwd))
    kv_len_p = round_up(kv_len, math.lcm(bk, bk_bwd))
    dp = round_up(head_dim, LANES)

    def bcast(x, batch_axis, head_axis):
        return (x.shape[batch_axis] == 1 and batch > 1, x.shape[head_axis] == 1 and heads > 1)

    spec = MaskSpec(
        causal=bool(causal),
        window=None if window is None else (int(window[0]), int(window[1])),
        softcap=None if softcap is None else float(softcap),
        scale=float(scale),
        q_len=q_len,
        kv_len=kv_len,
        q_padded=q_len_p != q_len,
        kv_padded=kv_len_p != kv_len,
    )
    cfg = FlashConfig(
        spec=spec,
        q_len_padded=q_len_p,
        kv_len_padded=kv_len_p,
        groups=heads // kv_heads,
        block_q=bq,
        block_kv=bk,
        block_q_bwd=bq_bwd,
        block_kv_bwd=bk_bwd,
        has_segments=q_segment_ids is not None,
        has_bias=bias is not None,
        has_factors=bias_u is not None,
        has_sinks=sinks is not None,
        bias_bcast=(False, False) if bias is None else bcast(bias, 0, 1),
        u_bcast=(False, False) if bias_u is None else bcast(bias_u, 0, 2),
        v_bcast=(False, False) if bias_v is None else bcast(bias_v, 0, 2),
        interpret=interpret if isinstance(interpret, pltpu.InterpretParams) else bool(interpret),
    )

    qp = _head_major(q, q_len_p, dp)
    kp = _head_major(k, kv_len_p, dp)
    vp = _head_major(v, kv_len_p, dp)
    q_seg = kv_seg = bias_p = up = vfp = sinks_p = None
    if cfg.has_segments:
        q_seg = _pad_axis(jnp.asarray(q_segment_ids, jnp.int32), 1, q_len_p)[:, :, None]
        kv_seg = _pad_axis(jnp.asarray(kv_segment_ids, jnp.int32), 1, kv_len_p)[:, None, :]
    if cfg.has_bias:
        bias_p = _pad_axis(_pad_axis(bias, 2, q_len_p), 3, kv_len_p)
    if cfg.has_factors:
        rank_p = round_up(bias_u.shape[-1], LANES)
        up = _head_major(bias_u, q_len_p, rank_p)
        vfp = _head_major(bias_v, kv_len_p, rank_p)
    if cfg.has_sinks:
        sinks_p = jnp.asarray(sinks, jnp.float32)

    out_p, lse_p = _flash_core(cfg, qp, kp, vp, q_seg, kv_seg, bias_p, up, vfp, sinks_p)
    out = jnp.swapaxes(out_p[:, :, :q_len, :head_dim], 1, 2)
    if not return_stats:
        return out
    # lse keeps its gradient (through the custom VJP); key_mass is a statistic.
    lse_stat = jax.lax.stop_gradient(lse_p)
    ops = jax.lax.stop_gradient(_ops_dict(qp, kp, vp, q_seg, kv_seg, bias_p, up, vfp, sinks_p))
    mass = key_mass_call(dataclasses.replace(cfg, has_sinks=False), ops, jnp.where(lse_stat == -jnp.inf, 0.0, lse_stat))
    return out, lse_p[:, :, :q_len, 0], mass[:, :, 0, :kv_len]
