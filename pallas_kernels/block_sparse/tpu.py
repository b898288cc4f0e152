"""Block-sparse attention on TPU (Pallas Mosaic): index lists scalar-prefetched into SMEM drive the K/V BlockSpec
index maps (data-dependent block maps, as in splash attention), so only the selected blocks are ever copied to VMEM.

    block_sparse_attention_tpu(q, k, v, block_indices, q_offset, *, block_size, causal, scale, interpret)
        -> (out [B, Tq, H, D] in q.dtype, lse f32 [B, H, Tq])

Layout inside the kernels: q, dO, out [B, H, nq * bp, Dp]; k, v [B, KVH, nk * bp, Dp]; lse, delta f32
[B, H, nq * bp, 1] (bp = block_size rounded up to the sublane tile, 8 for 32-bit and 16 for 16-bit inputs; Dp =
head_dim rounded up to 128 lanes; layout.py). Scalar prefetch: the lists of index_lists.py flattened to int32 1-D
arrays, with their counts (#entries != -1) beside them, and q_offset (int32 [1], so it may be traced).

Forward: grid (B, H, nq, W), W = list width, the last axis "arbitrary". Step t of query block i reads key block
L[b, h, i, min(t, count - 1)] of kv head h // G; steps t >= count repeat the previous block index (no DMA) and are
skipped with pl.when. VMEM scratch m, l, acc carry the online softmax (the same update as gpu.py) and the last step
writes out = acc / l and lse = m + log l (0 and -inf for a row that sees no key).
dQ: the same grid, recomputing P = exp(s - lse), dS = P (dO v^T - delta) with delta = dO . O - dlse; dq in scratch.
dK/dV: grid (B, KVH, nk, G * nq): step s walks query head g = s // nq of the group and slot s % nq of the transposed
list (the query blocks that selected key block j), so GQA sums stay in VMEM scratch.
Time O(B H Tq D x selected keys) of MXU work; grid steps O(B H nq W) forward and O(B H nk nq) for dK/dV (skipped
steps cost only the step overhead).

Limit: the prefetched lists take B H nq min(S, nk) + B H nk nq int32 words of SMEM, which is small next to HBM:
long sequences with many batch rows and heads would have to be split into several calls (not done here).
Verified in the TPU interpreter (pltpu.InterpretParams) and lowered to Mosaic by jax.export on CPU
(tests/pallas_kernels/test_block_sparse_kernel.py); never run on a real TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse.index_lists import index_lists
from pallas_kernels.block_sparse.layout import (
    BlockSparsePlan,
    cdiv,
    from_blocks,
    rows_from_blocks,
    to_blocks,
    token_mask,
)
from pallas_kernels.flash.tpu_tiles import (
    LANES,
    SUBLANES,
    compiler_params,
    dot_nn,
    dot_nt,
    dot_tn,
    interpret_arg,
    round_up,
)

Array = jax.Array


def _slot(lists_ref, counts_ref, row, t, width: int):
    """Block id at slot t of list `row`, clamped into the valid slots (skipped steps keep the last block, no DMA);
    0 for an empty list."""
    last = jnp.maximum(counts_ref[row] - 1, 0)
    return jnp.maximum(lists_ref[row * width + jnp.minimum(t, last)], 0)


def _masked_logits(plan: BlockSparsePlan, q, k, q_offset, q_block, k_block):
    """f32 [bp, bp] scale q k^T with -inf outside the token mask."""
    s = dot_nt(q, k) * plan.scale
    shape = s.shape
    mask = token_mask(
        plan,
        q_offset,
        q_block,
        k_block,
        lax.broadcasted_iota(jnp.int32, shape, 0),
        lax.broadcasted_iota(jnp.int32, shape, 1),
    )
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _forward_kernel(
    lists_ref, counts_ref, off_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *, plan, width
):
    b, h, i, t = (pl.program_id(a) for a in range(4))
    row = (b * pl.num_programs(1) + h) * plan.num_q_blocks + i

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(t < counts_ref[row])
    def _compute():
        k_block = lists_ref[row * width + t]
        s = _masked_logits(plan, q_ref[...], k_ref[...], off_ref[0], i, k_block)
        v = v_ref[...]
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # no visible key yet: exp gives 0, not nan
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + dot_nn(p.astype(v.dtype), v)
        m_ref[...] = m_next

    @pl.when(t == width - 1)
    def _finish():
        denom = l_ref[...]
        empty = denom == 0.0
        safe = jnp.where(empty, 1.0, denom)
        o_ref[...] = (acc_ref[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(safe))


def _query_grid_specs(plan: BlockSparsePlan, heads: int, width: int, dim: int, extra_rows: int) -> list:
    """q block, K/V blocks chosen by the prefetched list, and `extra_rows` per-query operands ([bp, dim] dO then
    [bp, 1] stats), for the grid (B, H, nq, W)."""
    bp, groups = plan.block_padded, plan.groups

    def q_map(b, h, i, t, lists, counts, q_offset):
        return b, h, i, 0

    def kv_map(b, h, i, t, lists, counts, q_offset):
        row = (b * heads + h) * plan.num_q_blocks + i
        return b, lax.div(h, groups), _slot(lists, counts, row, t, width), 0

    specs = [pl.BlockSpec((None, None, bp, dim), q_map)] + [pl.BlockSpec((None, None, bp, dim), kv_map)] * 2
    if extra_rows:
        specs += [pl.BlockSpec((None, None, bp, dim), q_map)] + [pl.BlockSpec((None, None, bp, 1), q_map)] * 2
    return specs


def _forward(plan: BlockSparsePlan, q, k, v, lists, counts, q_offset) -> tuple[Array, Array]:
    batch, heads, rows, dim = q.shape
    width, bp = lists.shape[-1], plan.block_padded

    def out_map(b, h, i, t, lists, counts, q_offset):
        return b, h, i, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, heads, plan.num_q_blocks, width),
        in_specs=_query_grid_specs(plan, heads, width, dim, 0),
        out_specs=[pl.BlockSpec((None, None, bp, dim), out_map), pl.BlockSpec((None, None, bp, 1), out_map)],
        scratch_shapes=[pltpu.VMEM((bp, 1), jnp.float32)] * 2 + [pltpu.VMEM((bp, dim), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan, width=width),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, rows, 1), jnp.float32),
        ],
        compiler_params=compiler_params(),
        interpret=interpret_arg(plan.interpret),
        name="block_sparse_forward",
    )(lists.reshape(-1), counts.reshape(-1), q_offset, q, k, v)


def _dq_kernel(
    lists_ref, counts_ref, off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc, *, plan, width
):
    b, h, i, t = (pl.program_id(a) for a in range(4))
    row = (b * pl.num_programs(1) + h) * plan.num_q_blocks + i

    @pl.when(t == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    @pl.when(t < counts_ref[row])
    def _compute():
        k_block = lists_ref[row * width + t]
        k, v = k_ref[...], v_ref[...]
        p = jnp.exp(_masked_logits(plan, q_ref[...], k, off_ref[0], i, k_block) - lse_ref[...])
        ds = p * (dot_nt(do_ref[...], v) - delta_ref[...])
        dq_acc[...] += dot_nn(ds.astype(k.dtype), k)

    @pl.when(t == width - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    lists_ref,
    counts_ref,
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dk_acc,
    dv_acc,
    *,
    plan,
):
    b, g, j, s = (pl.program_id(a) for a in range(4))
    nq = plan.num_q_blocks
    h = g * plan.groups + lax.div(s, nq)
    t = lax.rem(s, nq)
    row = (b * pl.num_programs(1) * plan.groups + h) * plan.num_k_blocks + j

    @pl.when(s == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(t < counts_ref[row])
    def _compute():
        q_block = lists_ref[row * nq + t]
        q, do = q_ref[...], do_ref[...]
        p = jnp.exp(_masked_logits(plan, q, k_ref[...], off_ref[0], q_block, j) - lse_ref[...])
        dv_acc[...] += dot_tn(p, do)
        ds = p * (dot_nt(do, v_ref[...]) - delta_ref[...])
        dk_acc[...] += dot_tn(ds, q)

    @pl.when(s == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * plan.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward(plan: BlockSparsePlan, q, k, v, lists, counts, t_lists, t_counts, q_offset, do, lse, delta):
    batch, heads, _, dim = q.shape
    kv_heads, bp, groups, nq = k.shape[1], plan.block_padded, plan.groups, plan.num_q_blocks
    width = lists.shape[-1]
    params, interpret = compiler_params(), interpret_arg(plan.interpret)

    def q_out_map(b, h, i, t, lists, counts, q_offset):
        return b, h, i, 0

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan, width=width),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, heads, nq, width),
            in_specs=_query_grid_specs(plan, heads, width, dim, 3),
            out_specs=pl.BlockSpec((None, None, bp, dim), q_out_map),
            scratch_shapes=[pltpu.VMEM((bp, dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_dq",
    )(lists.reshape(-1), counts.reshape(-1), q_offset, q, k, v, do, lse, delta)

    def q_map(b, g, j, s, lists, counts, q_offset):
        h = g * groups + lax.div(s, nq)
        row = (b * heads + h) * plan.num_k_blocks + j
        return b, h, _slot(lists, counts, row, lax.rem(s, nq), nq), 0

    def kv_map(b, g, j, s, lists, counts, q_offset):
        return b, g, j, 0

    rows_spec = pl.BlockSpec((None, None, bp, dim), q_map)
    stat_spec = pl.BlockSpec((None, None, bp, 1), q_map)
    kv_spec = pl.BlockSpec((None, None, bp, dim), kv_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, kv_heads, plan.num_k_blocks, groups * nq),
            in_specs=[rows_spec, kv_spec, kv_spec, rows_spec, stat_spec, stat_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bp, dim), jnp.float32)] * 2,
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_dkv",
    )(t_lists.reshape(-1), t_counts.reshape(-1), q_offset, q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan, q, k, v, lists, counts, t_lists, t_counts, q_offset):
    return _forward(plan, q, k, v, lists, counts, q_offset)


def _attend_fwd(plan, q, k, v, lists, counts, t_lists, t_counts, q_offset):
    out, lse = _forward(plan, q, k, v, lists, counts, q_offset)
    return (out, lse), (q, k, v, lists, counts, t_lists, t_counts, q_offset, out, lse)


def _attend_bwd(plan, residuals, cotangents):
    q, k, v, lists, counts, t_lists, t_counts, q_offset, out, lse = residuals
    d_out, d_lse = cotangents
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True) - d_lse
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)  # such rows are fully masked: p = exp(-inf) = 0 anyway
    grads = _backward(plan, q, k, v, lists, counts, t_lists, t_counts, q_offset, d_out.astype(q.dtype), lse_safe, delta)
    return (*grads, None, None, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _head_major(x: Array, block_size: int, block_padded: int, num_blocks: int, width: int) -> Array:
    return jnp.swapaxes(to_blocks(x, block_size, block_padded, num_blocks, width), 1, 2)


@functools.partial(jax.jit, static_argnames=("block_size", "causal", "scale", "interpret"))
def block_sparse_attention_tpu(
    q: Array,
    k: Array,
    v: Array,
    block_indices: Array,
    q_offset: Array,
    *,
    block_size: int,
    causal: bool,
    scale: float,
    interpret: bool | pltpu.InterpretParams,
) -> tuple[Array, Array]:
    """Block-sparse attention on the Mosaic kernels (validated arguments; see the module docstring).

    q [B, Tq, H, D]; k, v [B, Tk, KVH, D]; block_indices int [B|1, H|1, nq, S] (-1 padded); q_offset int32 scalar
    (may be traced). interpret: False (compile), True (default pltpu.InterpretParams) or a pltpu.InterpretParams.
    Returns (out [B, Tq, H, D] in q.dtype, lse f32 [B, H, Tq]), both differentiable (q, k, v)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    sublanes = SUBLANES * max(1, 4 // min(q.dtype.itemsize, k.dtype.itemsize))
    bp = round_up(block_size, sublanes)
    plan = BlockSparsePlan(
        block_size=block_size, block_padded=bp, q_len=q_len, kv_len=kv_len, num_q_blocks=cdiv(q_len, block_size),
        num_k_blocks=cdiv(kv_len, block_size), causal=causal, scale=scale,
        groups=heads // kv_heads, interpret=interpret,
    )  # fmt: skip
    nq, nk = plan.num_q_blocks, plan.num_k_blocks
    q_offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    lists, t_lists = index_lists(plan, block_indices, q_offset[0], batch, heads, (min(block_indices.shape[-1], nk), nq))
    counts = jnp.sum(lists >= 0, axis=-1, dtype=jnp.int32)
    t_counts = jnp.sum(t_lists >= 0, axis=-1, dtype=jnp.int32)
    dp = round_up(head_dim, LANES)
    qh = _head_major(q, block_size, bp, nq, dp)
    kh = _head_major(k, block_size, bp, nk, dp)
    vh = _head_major(v, block_size, bp, nk, dp)
    out, lse = _attend(plan, qh, kh, vh, lists, counts, t_lists, t_counts, q_offset)
    out = from_blocks(jnp.swapaxes(out, 1, 2), block_size, q_len, head_dim)
    return out, rows_from_blocks(lse[..., 0], block_size, q_len)
