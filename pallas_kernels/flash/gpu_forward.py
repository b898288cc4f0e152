"""GPU (Pallas on Triton) flash attention forward kernel and the key_mass statistics kernel.

Forward, one program per (query block i, batch b, head h), grid (Tq/bq, B, H):

    m = sink_h (or -inf), l = 1 (or 0), acc = 0                              [bq], [bq], [bq, D]
    for kv block j in [lo, hi)  (bounds from causal/window: fully masked blocks are never visited)
        s = logits(q_i, k_j) masked to -inf;  m' = max(m, rowmax s);  p = exp(s - m')
        l = l e^(m - m') + rowsum p;  acc = acc e^(m - m') + p v_j;  m = m'
    out = acc / l (0 where l = 0),  lse = m + log l (-inf where l = 0)

The sink enters only as the starting state (its exp(sink - m) sits in l and it carries no value). K/V of kv head
h // (H / KVH) are read in place (GQA/MQA without repeating them). Time O(B H Tq Tk D) over the visible blocks,
extra memory O(B H Tq) for lse.

key_mass, one program per (kv block j, b, h), grid (Tk/bk, B, H): key_mass[b, h, j] = sum_i exp(s_ij - lse_i),
recomputing s tile by tile from the saved lse, over the q blocks that can see block j; no Tq x Tk array in HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash.gpu_plan import GpuPlan, broadcast_index, query_block_specs
from pallas_kernels.flash.tiling import dot, kv_block_range, q_block_range, tile_logits, tile_mask, tile_probs

Array = jax.Array


def _forward_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, bias_ref, u_ref, vf_ref, sink_ref, o_ref, lse_ref, *, plan):
    spec, bq, bk = plan.spec, plan.block_q, plan.block_k
    q_start = pl.program_id(0) * bq
    q = q_ref[...]
    q_idx = q_start + jnp.arange(bq, dtype=jnp.int32)
    q_seg = None if qs_ref is None else qs_ref[...]
    u = None if u_ref is None else u_ref[...]
    if sink_ref is None:
        m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
        l0 = jnp.zeros((bq,), jnp.float32)
    else:
        m0 = sink_ref[...].astype(jnp.float32)
        l0 = jnp.ones((bq,), jnp.float32)
    acc0 = jnp.zeros((bq, q.shape[-1]), jnp.float32)

    def body(j, carry):
        acc, m, denom = carry
        k_start = j * bk
        cols = pl.ds(k_start, bk)
        k = k_ref[cols, :]
        v = v_ref[cols, :]
        bias = None if bias_ref is None else bias_ref[:, cols]
        vf = None if vf_ref is None else vf_ref[cols, :]
        s, _ = tile_logits(spec, q, k, bias, u, vf)
        kv_seg = None if ks_ref is None else ks_ref[cols]
        mask = tile_mask(spec, q_idx, k_start + jnp.arange(bk, dtype=jnp.int32), q_seg, kv_seg)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 so exp gives 0, not nan.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_shift)
        p = jnp.exp(s - m_shift[:, None])
        denom = alpha * denom + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
        return acc, m_new, denom

    lo, hi = kv_block_range(spec, q_start, bq, bk)
    acc, m, denom = lax.fori_loop(lo, hi, body, (acc0, m0, l0))
    empty = denom == 0.0
    denom = jnp.where(empty, 1.0, denom)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(denom))


def forward(plan: GpuPlan, q, k, v, q_seg, kv_seg, bias, u, vf, sinks) -> tuple[Array, Array]:
    """Padded inputs (see gpu.py) -> (out [B, Tq_p, H, Dp] in q.dtype, lse f32 [B, H, Tq_p])."""
    batch, q_len, heads, dim = q.shape
    groups = heads // k.shape[2]
    bq = plan.block_q
    grid = (q_len // bq, batch, heads)

    in_specs = query_block_specs(q, k, q_seg, kv_seg, bias, u, vf, groups, bq)
    sink_rows = None
    if sinks is None:
        in_specs.append(None)
    else:
        # One row of bq copies per head: the kernel loads it as the [bq] starting maximum.
        sink_rows = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None], (heads, bq))
        in_specs.append(pl.BlockSpec((None, bq), lambda i, b, h: (h, 0)))

    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid=grid,
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
        ],
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name="flash_attention_forward",
    )(q, k, v, q_seg, kv_seg, bias, u, vf, sink_rows)


def _key_mass_kernel(q_ref, k_ref, qs_ref, ks_ref, bias_ref, u_ref, vf_ref, lse_ref, km_ref, *, plan):
    spec, bq, bk = plan.spec, plan.block_q_dkv, plan.block_k_dkv
    k_start = pl.program_id(0) * bk
    k = k_ref[...]
    kv_idx = k_start + jnp.arange(bk, dtype=jnp.int32)
    kv_seg = None if ks_ref is None else ks_ref[...]
    vf = None if vf_ref is None else vf_ref[...]

    def body(i, mass):
        q_start = i * bq
        rows = pl.ds(q_start, bq)
        bias = None if bias_ref is None else bias_ref[rows, :]
        u = None if u_ref is None else u_ref[rows, :]
        s, _ = tile_logits(spec, q_ref[rows, :], k, bias, u, vf)
        q_seg = None if qs_ref is None else qs_ref[rows]
        mask = tile_mask(spec, q_start + jnp.arange(bq, dtype=jnp.int32), kv_idx, q_seg, kv_seg)
        return mass + jnp.sum(tile_probs(s, lse_ref[rows], mask), axis=0)

    lo, hi = q_block_range(spec, k_start, bk, bq)
    km_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros((bk,), jnp.float32))


def key_mass(plan: GpuPlan, q, k, q_seg, kv_seg, bias, u, vf, lse) -> Array:
    """Column sums of the probabilities, f32 [B, H, Tk_p], from padded inputs and the forward's lse [B, H, Tq_p]."""
    batch, q_len, heads, dim = q.shape
    kv_len = k.shape[1]
    groups = heads // k.shape[2]
    bk = plan.block_k_dkv
    in_specs = [
        pl.BlockSpec((None, q_len, None, dim), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, bk, None, dim), lambda j, b, h: (b, j, h // groups, 0)),
        None if q_seg is None else pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
        None if kv_seg is None else pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
    ]
    if bias is None:
        in_specs.append(None)
    else:
        bidx = broadcast_index(bias.shape, 0, 1)
        in_specs.append(pl.BlockSpec((None, None, q_len, bk), lambda j, b, h: (*bidx(b, h), 0, j)))
    if u is None:
        in_specs += [None, None]
    else:
        uidx, vidx = broadcast_index(u.shape, 0, 2), broadcast_index(vf.shape, 0, 2)
        rank = u.shape[-1]
        in_specs.append(pl.BlockSpec((None, q_len, None, rank), lambda j, b, h: (uidx(b, h)[0], 0, uidx(b, h)[1], 0)))
        in_specs.append(pl.BlockSpec((None, bk, None, rank), lambda j, b, h: (vidx(b, h)[0], j, vidx(b, h)[1], 0)))
    in_specs.append(pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0)))
    return pl.pallas_call(
        functools.partial(_key_mass_kernel, plan=plan),
        grid=(kv_len // bk, batch, heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bk), lambda j, b, h: (b, h, j)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, kv_len), jnp.float32),
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name="flash_attention_key_mass",
    )(q, k, q_seg, kv_seg, bias, u, vf, lse)
