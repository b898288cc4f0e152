"""Block-sparse attention on GPU (Pallas on Triton): forward, dQ and dK/dV kernels tied by a custom VJP.

    block_sparse_attention_gpu(q, k, v, block_indices, q_offset, *, block_size, causal, scale, interpret)
        -> (out [B, Tq, H, D] in q.dtype, lse f32 [B, H, Tq])

Arguments arrive validated by `pallas_kernels.block_sparse.api`. The wrapper builds the index lists
(index_lists.py: sorted, unique, causal-pruned, -1 padded) and the blocked layout (layout.py: blocks padded to a
power of two >= 16 rows, head_dim to a power of two >= 16), then:

Forward, one program per (query block i, batch b, head h), grid (nq, B, H). count = #entries != -1 of the list
L[b, h, i]; for t < count, kv block j = L[b, h, i, t] of kv head h // G (GQA, K/V never repeated):
    s = scale q_i k_j^T, token mask (padding, causal j <= q_offset + i inside diagonal blocks) -> -inf
    m' = max(m, rowmax s);  p = exp(s - m');  l = l e^(m - m') + rowsum p;  acc = acc e^(m - m') + p v_j
    out = acc / l (0 where l = 0), lse = m + log l (-inf where l = 0: a row that sees no key)
dQ kernel: same grid and loop; P = exp(s - lse), dS = P * (dO v^T - delta), dq = scale sum_j dS k_j, where
    delta_i = dO_i . O_i - dlse_i (the lse output is differentiable: d lse_i / d s_ij = P_ij).
dK/dV kernel: one program per (kv block j, b, kv head g), grid (nk, B, KVH); for each of the G query heads of the
    group, loop over the transposed list (the query blocks that selected block j): dv += P^T dO, dk += scale dS^T q.
Time O(B H Tq D x selected keys per query block), memory O(B H T D) plus the [B, H, nq, nk] block mask.
A tile is one whole [bp, bp] block pair (no sub-tiling): block sizes up to 128 match the flash kernel's tiles,
larger ones make register-heavy tiles.

Verified in the Pallas interpreter on CPU and lowered to Triton IR (tests/pallas_kernels/test_block_sparse_kernel.py);
never run on a real GPU yet (the test marked `gpu` at T = 4096 does that when a GPU is available).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse.index_lists import index_lists
from pallas_kernels.block_sparse.layout import (
    BlockSparsePlan,
    cdiv,
    from_blocks,
    rows_from_blocks,
    to_blocks,
    token_mask,
)
from pallas_kernels.flash.gpu_plan import next_power_of_2, padded_dim
from pallas_kernels.flash.tiling import dot, tile_probs

Array = jax.Array


def _compiler_params(head_dim: int) -> Any:
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _count(list_row: Array) -> Array:
    return jnp.sum((list_row >= 0).astype(jnp.int32))


def _offsets(n: int) -> tuple[Array, Array]:
    r = jnp.arange(n, dtype=jnp.int32)
    return r[:, None], r[None, :]


def _forward_kernel(q_ref, k_ref, v_ref, list_ref, off_ref, o_ref, lse_ref, *, plan: BlockSparsePlan):
    bp = plan.block_padded
    q_block = pl.program_id(0)
    q, q_offset = q_ref[...], off_ref[0]
    rows, cols = _offsets(bp)

    def body(t, carry):
        acc, m, denom = carry
        k_block = list_ref[t]
        span = pl.ds(k_block * bp, bp)
        k, v = k_ref[span, :], v_ref[span, :]
        s = dot(q, k, trans_b=True) * plan.scale
        mask = token_mask(plan, q_offset, q_block, k_block, rows, cols)
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

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bp,), -jnp.inf, jnp.float32),
        jnp.zeros((bp,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, _count(list_ref[...]), body, init)
    empty = denom == 0.0
    denom = jnp.where(empty, 1.0, denom)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(denom))


def _query_specs(plan: BlockSparsePlan, q: Array, k: Array, width: int) -> list:
    """q block i of head h, the whole (blocked) K and V of kv head h // G, the index list of (b, h, i), q_offset."""
    bp, dim, kv_rows, groups = plan.block_padded, q.shape[-1], k.shape[1], plan.groups
    return [
        pl.BlockSpec((None, bp, None, dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, kv_rows, None, dim), lambda i, b, h: (b, 0, h // groups, 0)),
        pl.BlockSpec((None, kv_rows, None, dim), lambda i, b, h: (b, 0, h // groups, 0)),
        pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, h, i, 0)),
        pl.BlockSpec((1,), lambda i, b, h: (0,)),
    ]


def _forward(plan: BlockSparsePlan, q, k, v, lists, q_offset) -> tuple[Array, Array]:
    batch, rows, heads, dim = q.shape
    bp = plan.block_padded
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid=(plan.num_q_blocks, batch, heads),
        in_specs=_query_specs(plan, q, k, lists.shape[-1]),
        out_specs=[
            pl.BlockSpec((None, bp, None, dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bp), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, rows), jnp.float32)],
        compiler_params=_compiler_params(dim),
        interpret=plan.interpret,
        name="block_sparse_forward",
    )(q, k, v, lists, q_offset)


def _dq_kernel(q_ref, k_ref, v_ref, list_ref, off_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan: BlockSparsePlan):
    bp = plan.block_padded
    q_block = pl.program_id(0)
    q, do, lse, delta, q_offset = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], off_ref[0]
    rows, cols = _offsets(bp)

    def body(t, dq):
        k_block = list_ref[t]
        span = pl.ds(k_block * bp, bp)
        k, v = k_ref[span, :], v_ref[span, :]
        s = dot(q, k, trans_b=True) * plan.scale
        p = tile_probs(s, lse, token_mask(plan, q_offset, q_block, k_block, rows, cols))
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, _count(list_ref[...]), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, list_ref, off_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, plan):
    bp = plan.block_padded
    k_block = pl.program_id(0)
    k, v, q_offset = k_ref[...], v_ref[...], off_ref[0]
    rows, cols = _offsets(bp)

    def head_body(g, carry):
        def q_body(t, inner):
            dk, dv = inner
            q_block = list_ref[g, t]
            span = pl.ds(q_block * bp, bp)
            q, do = q_ref[span, g, :], do_ref[span, g, :]
            s = dot(q, k, trans_b=True) * plan.scale
            p = tile_probs(s, lse_ref[g, span], token_mask(plan, q_offset, q_block, k_block, rows, cols))
            dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (dot(do, v, trans_b=True) - delta_ref[g, span][:, None])
            dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        return lax.fori_loop(0, _count(list_ref[g, :]), q_body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, plan.groups, head_body, (zeros, zeros))
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(plan: BlockSparsePlan, q, k, v, lists, t_lists, q_offset, do, lse, delta):
    batch, q_rows, heads, dim = q.shape
    kv_heads, groups, bp = k.shape[2], plan.groups, plan.block_padded
    params = _compiler_params(dim)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=(plan.num_q_blocks, batch, heads),
        in_specs=[
            *_query_specs(plan, q, k, lists.shape[-1]),
            pl.BlockSpec((None, bp, None, dim), lambda i, b, h: (b, i, h, 0)),  # dO
            pl.BlockSpec((None, None, bp), lambda i, b, h: (b, h, i)),  # lse
            pl.BlockSpec((None, None, bp), lambda i, b, h: (b, h, i)),  # delta
        ],
        out_specs=pl.BlockSpec((None, bp, None, dim), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=plan.interpret,
        name="block_sparse_dq",
    )(q, k, v, lists, q_offset, do, lse, delta)
    group_rows = pl.BlockSpec((None, groups, q_rows), lambda j, b, g: (b, g, 0))
    kv_block = pl.BlockSpec((None, bp, None, dim), lambda j, b, g: (b, j, g, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid=(plan.num_k_blocks, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, q_rows, groups, dim), lambda j, b, g: (b, 0, g, 0)),
            kv_block,
            kv_block,
            pl.BlockSpec((None, groups, None, t_lists.shape[-1]), lambda j, b, g: (b, g, j, 0)),
            pl.BlockSpec((1,), lambda j, b, g: (0,)),
            pl.BlockSpec((None, q_rows, groups, dim), lambda j, b, g: (b, 0, g, 0)),  # dO
            group_rows,  # lse
            group_rows,  # delta
        ],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=plan.interpret,
        name="block_sparse_dkv",
    )(q, k, v, t_lists, q_offset, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan, q, k, v, lists, t_lists, q_offset):
    return _forward(plan, q, k, v, lists, q_offset)


def _attend_fwd(plan, q, k, v, lists, t_lists, q_offset):
    out, lse = _forward(plan, q, k, v, lists, q_offset)
    return (out, lse), (q, k, v, lists, t_lists, q_offset, out, lse)


def _attend_bwd(plan, residuals, cotangents):
    q, k, v, lists, t_lists, q_offset, out, lse = residuals
    d_out, d_lse = cotangents
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32)) - d_lse
    dq, dk, dv = _backward(plan, q, k, v, lists, t_lists, q_offset, d_out.astype(q.dtype), lse, delta)
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


@functools.partial(jax.jit, static_argnames=("block_size", "causal", "scale", "interpret"))
def block_sparse_attention_gpu(
    q: Array,
    k: Array,
    v: Array,
    block_indices: Array,
    q_offset: Array,
    *,
    block_size: int,
    causal: bool,
    scale: float,
    interpret: Any,
) -> tuple[Array, Array]:
    """Block-sparse attention on the Triton kernels (validated arguments; see the module docstring).

    q [B, Tq, H, D]; k, v [B, Tk, KVH, D]; block_indices int [B|1, H|1, nq, S] (-1 padded); q_offset int32 scalar
    (may be traced). Returns (out [B, Tq, H, D] in q.dtype, lse f32 [B, H, Tq]), both differentiable (q, k, v)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    bp = max(16, next_power_of_2(block_size))
    plan = BlockSparsePlan(
        block_size=block_size, block_padded=bp, q_len=q_len, kv_len=kv_len, num_q_blocks=cdiv(q_len, block_size),
        num_k_blocks=cdiv(kv_len, block_size), causal=causal, scale=scale, groups=heads // kv_heads,
        interpret=interpret,
    )  # fmt: skip
    nq, nk = plan.num_q_blocks, plan.num_k_blocks
    widths = (next_power_of_2(max(1, min(block_indices.shape[-1], nk))), next_power_of_2(nq))
    q_offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    lists, t_lists = index_lists(plan, block_indices, q_offset[0], batch, heads, widths)
    dp = padded_dim(head_dim)
    qb = to_blocks(q, block_size, bp, nq, dp)
    kb = to_blocks(k, block_size, bp, nk, dp)
    vb = to_blocks(v, block_size, bp, nk, dp)
    out, lse = _attend(plan, qb, kb, vb, lists, t_lists, q_offset)
    return from_blocks(out, block_size, q_len, head_dim), rows_from_blocks(lse, block_size, q_len)
