"""GPU flash attention (Pallas on Triton): padding, the custom VJP that ties the kernels together, and stats.

    flash_attention_gpu(q, k, v, q_segment_ids, kv_segment_ids, bias, bias_u, bias_v, sinks, *, causal, window,
                        softcap, scale, return_stats, block_sizes, interpret) -> out | (out, lse, key_mass)

Arguments arrive validated and normalised by `pallas_kernels.flash.api.flash_attention`:
q [B, Tq, H, D]; k, v [B, Tk, KVH, D]; segment ids int [B, Tq] / [B, Tk] or None; bias [B|1, H|1, Tq, Tk];
bias_u [B|1, Tq, H|1, R], bias_v [B|1, Tk, H|1, R]; sinks [H]. Sequences are padded to block multiples, D and R
to powers of two >= 16 (zeros; skipped entirely when already aligned, e.g. D = 128 and T a multiple of 128),
which adds no logits: padded keys and queries are masked, padded features contribute 0 to every dot product.

Kernels (see gpu_forward.py and gpu_backward.py): forward saving lse; backward = delta (XLA, O(B T H D)) + fused
dK/dV kernel + dQ kernel, all recomputing P from lse; key_mass kernel for the stats.
lse is differentiable: with g = its cotangent [B, H, Tq] (0 on padded rows) and d lse_i / d s_ij = p_ij, the logit
gradient is dS_ij = p_ij (dP_ij - delta_i) with delta_i = dO_i . O_i - g_i, so the kernels run unchanged on that
delta (which also makes the bias, bias-factor and sink gradients of lse exact). Sink gradient, exact and
O(B H Tq): d sink_h = -sum_{b,i} exp(sink_h - lse_bhi) delta_bhi (the sink is a key with value 0 and
d lse / d sink = P_sink). key_mass is a statistic: returned under stop_gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.flash import gpu_backward, gpu_forward
from pallas_kernels.flash.gpu_plan import GpuPlan, make_plan, padded_dim
from pallas_kernels.flash.tiling import MaskSpec

Array = jax.Array


def _pad_axis(x: Array | None, axis: int, size: int, value: Any = 0) -> Array | None:
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: GpuPlan, q, k, v, q_seg, kv_seg, bias, u, vf, sinks):
    return gpu_forward.forward(plan, q, k, v, q_seg, kv_seg, bias, u, vf, sinks)


def _flash_fwd(plan, q, k, v, q_seg, kv_seg, bias, u, vf, sinks):
    out, lse = gpu_forward.forward(plan, q, k, v, q_seg, kv_seg, bias, u, vf, sinks)
    return (out, lse), (q, k, v, q_seg, kv_seg, bias, u, vf, sinks, out, lse)


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums a gradient over the axes along which its operand was broadcast (size 1 in `shape`)."""
    axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _flash_bwd(plan, residuals, cotangents):
    q, k, v, q_seg, kv_seg, bias, u, vf, sinks, out, lse = residuals
    do, d_lse = cotangents
    # d lse_i / d s_ij = p_ij: the lse cotangent enters as -g_i in delta (padded rows get g = 0 from the slice).
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)
    do = do.astype(q.dtype)
    dq, dk, dv, ds, du, dvf = gpu_backward.backward(plan, q, k, v, q_seg, kv_seg, bias, u, vf, do, lse, delta)
    dbias = None if bias is None else _reduce_to(ds, bias.shape).astype(bias.dtype)
    d_u = None if u is None else _reduce_to(du, u.shape).astype(u.dtype)
    d_vf = None if vf is None else _reduce_to(dvf, vf.shape).astype(vf.dtype)
    dsinks = None
    if sinks is not None:
        sink = sinks.astype(jnp.float32)[None, :, None]
        dsinks = (-jnp.sum(jnp.exp(sink - lse) * delta, axis=(0, 2))).astype(sinks.dtype)
    return dq, dk, dv, None, None, dbias, d_u, d_vf, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(
    jax.jit, static_argnames=("causal", "window", "softcap", "scale", "return_stats", "block_items", "interpret")
)
def _flash_attention_gpu(
    q,
    k,
    v,
    q_segment_ids,
    kv_segment_ids,
    bias,
    bias_u,
    bias_v,
    sinks,
    *,
    causal,
    window,
    softcap,
    scale,
    return_stats,
    block_items,
    interpret,
):
    q_len, head_dim = q.shape[1], q.shape[-1]
    kv_len = k.shape[1]
    spec = MaskSpec(causal, window, softcap, scale, q_len, kv_len, q_padded=False, kv_padded=False)
    plan = make_plan(spec, head_dim, dict(block_items), interpret)
    tq, tk, dp = plan.q_len_padded, plan.kv_len_padded, plan.head_dim_padded

    qp = _pad_axis(_pad_axis(q, 1, tq), 3, dp)
    kp = _pad_axis(_pad_axis(k, 1, tk), 3, dp)
    vp = _pad_axis(_pad_axis(v, 1, tk), 3, dp)
    q_seg = None if q_segment_ids is None else _pad_axis(q_segment_ids.astype(jnp.int32), 1, tq)
    kv_seg = None if kv_segment_ids is None else _pad_axis(kv_segment_ids.astype(jnp.int32), 1, tk)
    bias_p = None if bias is None else _pad_axis(_pad_axis(bias, 2, tq), 3, tk)
    u_p = vf_p = None
    if bias_u is not None:
        rank = padded_dim(bias_u.shape[-1])
        u_p = _pad_axis(_pad_axis(bias_u, 1, tq), 3, rank)
        vf_p = _pad_axis(_pad_axis(bias_v, 1, tk), 3, rank)

    out_p, lse_p = _flash(plan, qp, kp, vp, q_seg, kv_seg, bias_p, u_p, vf_p, sinks)
    out = out_p[:, :q_len, :, :head_dim]
    if not return_stats:
        return out
    stop = jax.lax.stop_gradient  # key_mass is a statistic; lse keeps its gradient
    mass = gpu_forward.key_mass(
        plan, stop(qp), stop(kp), q_seg, kv_seg, None if bias_p is None else stop(bias_p),
        None if u_p is None else stop(u_p), None if vf_p is None else stop(vf_p), stop(lse_p),
    )  # fmt: skip
    return out, lse_p[:, :, :q_len], mass[:, :, :kv_len]


def flash_attention_gpu(
    q: Array,
    k: Array,
    v: Array,
    q_segment_ids: Array | None,
    kv_segment_ids: Array | None,
    bias: Array | None,
    bias_u: Array | None,
    bias_v: Array | None,
    sinks: Array | None,
    *,
    causal: bool,
    window: tuple[int, int] | None,
    softcap: float | None,
    scale: float,
    return_stats: bool,
    block_sizes: dict[str, int] | None,
    interpret: Any,
) -> Array | tuple[Array, Array, Array]:
    """Flash attention on the GPU kernels (validated, normalised arguments; see the module docstring).

    Returns out [B, Tq, H, D] in q.dtype, or (out, lse f32 [B, H, Tq], key_mass f32 [B, H, Tk]) when
    return_stats; lse is differentiable, key_mass is stop_gradient'ed. `interpret=True` runs the kernels in the
    Pallas interpreter (any platform, e.g. CPU tests).
    """
    return _flash_attention_gpu(
        q, k, v, q_segment_ids, kv_segment_ids, bias, bias_u, bias_v, sinks,
        causal=causal, window=window, softcap=softcap, scale=float(scale), return_stats=return_stats,
        block_items=tuple(sorted((block_sizes or {}).items())), interpret=interpret,
    )  # fmt: skip
