"""GPU (Pallas on Triton) flash attention backward: a fused dK/dV kernel and a dQ kernel, both recomputing P.

With the forward's lse and delta_i = dO_i . O_i - g_i (computed outside, O(B Tq H D);
g the lse cotangent), for every visible tile:

    P = exp(S - lse);  dP = dO V^T;  dS = P * (dP - delta)          (dS = gradient w.r.t. the final logits)
    dS_raw = dS * (1 - tanh^2)  (through the soft cap, else dS_raw = dS)
    dV += P^T dO;  dK += scale dS_raw^T Q;  dQ += scale dS_raw K
    dbias = dS (summed over broadcast axes outside);  du += dS v_f;  dv_f += dS^T u   (low-rank bias factors)

dK/dV kernel: one program per (kv block j, b, kv head g), grid (Tk/bk, B, KVH). It loops over the H/KVH query
heads of the group and, for each, over the q blocks that can see block j (causal/window bounds), so GQA gradients
are summed in registers and K/V are never repeated. dv_f is written per query head.
dQ kernel: one program per (q block i, b, h), grid (Tq/bq, B, H), looping over the visible kv blocks; it also
writes the dS tile to the dense dbias buffer when a bias is given (and zeros for the skipped tiles).
Time O(B H Tq Tk D) over visible blocks (about 2.5x the forward); memory O(B H T D), plus B H Tq Tk floats for
dbias only when a dense bias is given.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash.gpu_plan import GpuPlan, broadcast_index, query_block_specs
from pallas_kernels.flash.tiling import (
    dot,
    kv_block_range,
    logits_grad,
    q_block_range,
    tile_logits,
    tile_mask,
    tile_probs,
)

Array = jax.Array


def _dkv_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, bias_ref, u_ref, vf_ref, do_ref, lse_ref, delta_ref, *out_refs, plan, flags
):
    spec, bq, bk = plan.spec, plan.block_q_dkv, plan.block_k_dkv
    bias_per_head, u_per_head, vf_per_head = flags
    dk_ref, dv_ref = out_refs[:2]
    dvf_ref = out_refs[2] if len(out_refs) > 2 else None
    groups = q_ref.shape[1]
    k_start = pl.program_id(0) * bk
    k = k_ref[...]
    v = v_ref[...]
    kv_idx = k_start + jnp.arange(bk, dtype=jnp.int32)
    kv_seg = None if ks_ref is None else ks_ref[...]
    lo, hi = q_block_range(spec, k_start, bk, bq)

    def head_body(g, carry):
        dk, dv = carry
        vf = None
        if vf_ref is not None:
            vf = vf_ref[:, g, :] if vf_per_head else vf_ref[...]

        def q_body(i, inner):
            dk, dv, dvf = inner
            q_start = i * bq
            rows = pl.ds(q_start, bq)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            bias = None
            if bias_ref is not None:
                bias = bias_ref[g, rows, :] if bias_per_head else bias_ref[rows, :]
            u = None
            if u_ref is not None:
                u = u_ref[rows, g, :] if u_per_head else u_ref[rows, :]
            s, capped = tile_logits(spec, q, k, bias, u, vf)
            q_seg = None if qs_ref is None else qs_ref[rows]
            mask = tile_mask(spec, q_start + jnp.arange(bq, dtype=jnp.int32), kv_idx, q_seg, kv_seg)
            p = tile_probs(s, lse_ref[g, rows], mask)
            dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (dot(do, v, trans_b=True) - delta_ref[g, rows][:, None])
            if dvf is not None:
                dvf = dvf + dot(ds.astype(u.dtype), u, trans_a=True)
            ds_raw = logits_grad(spec, ds, capped)
            dk = dk + dot(ds_raw.astype(q.dtype), q, trans_a=True)
            return dk, dv, dvf

        dvf0 = None if dvf_ref is None else jnp.zeros((bk, dvf_ref.shape[-1]), jnp.float32)
        dk, dv, dvf = lax.fori_loop(lo, hi, q_body, (dk, dv, dvf0))
        if dvf_ref is not None:
            dvf_ref[:, g, :] = dvf
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head_body, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, bias_ref, u_ref, vf_ref, do_ref, lse_ref, delta_ref, *out_refs, plan
):
    spec, bq, bk = plan.spec, plan.block_q_dq, plan.block_k_dq
    dq_ref, *rest = out_refs
    du_ref = rest.pop(0) if u_ref is not None else None
    dbias_ref = rest.pop(0) if bias_ref is not None else None
    q_start = pl.program_id(0) * bq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_idx = q_start + jnp.arange(bq, dtype=jnp.int32)
    q_seg = None if qs_ref is None else qs_ref[...]
    u = None if u_ref is None else u_ref[...]

    def body(j, carry):
        dq, du = carry
        k_start = j * bk
        cols = pl.ds(k_start, bk)
        k = k_ref[cols, :]
        v = v_ref[cols, :]
        bias = None if bias_ref is None else bias_ref[:, cols]
        vf = None if vf_ref is None else vf_ref[cols, :]
        s, capped = tile_logits(spec, q, k, bias, u, vf)
        kv_seg = None if ks_ref is None else ks_ref[cols]
        mask = tile_mask(spec, q_idx, k_start + jnp.arange(bk, dtype=jnp.int32), q_seg, kv_seg)
        p = tile_probs(s, lse, mask)
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        if dbias_ref is not None:
            dbias_ref[:, cols] = ds.astype(dbias_ref.dtype)
        if du is not None:
            du = du + dot(ds.astype(vf.dtype), vf)
        dq = dq + dot(logits_grad(spec, ds, capped).astype(k.dtype), k)
        return dq, du

    lo, hi = kv_block_range(spec, q_start, bq, bk)
    du0 = None if du_ref is None else jnp.zeros((bq, du_ref.shape[-1]), jnp.float32)
    dq, du = lax.fori_loop(lo, hi, body, (jnp.zeros(q.shape, jnp.float32), du0))
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)
    if du_ref is not None:
        du_ref[...] = du
    if dbias_ref is not None:
        # Tiles outside [lo, hi) were never visited: their bias gradient is exactly zero.
        def zero_tile(j, carry):
            dbias_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((bq, bk), dbias_ref.dtype)
            return carry

        num_blocks = dbias_ref.shape[-1] // bk
        lax.fori_loop(0, jnp.minimum(lo, num_blocks), zero_tile, 0)
        lax.fori_loop(jnp.maximum(hi, lo), num_blocks, zero_tile, 0)


def _operand_specs_dkv(q, k, q_seg, kv_seg, bias, u, vf, groups, bk):
    """BlockSpecs of the dK/dV kernel's inputs (grid (j, b, g)) and the per-head flags of the broadcast operands."""
    q_len, dim, kv_len = q.shape[1], q.shape[-1], k.shape[1]
    specs = [
        pl.BlockSpec((None, q_len, groups, dim), lambda j, b, g: (b, 0, g, 0)),
        pl.BlockSpec((None, bk, None, dim), lambda j, b, g: (b, j, g, 0)),
        pl.BlockSpec((None, bk, None, dim), lambda j, b, g: (b, j, g, 0)),
        None if q_seg is None else pl.BlockSpec((None, q_len), lambda j, b, g: (b, 0)),
        None if kv_seg is None else pl.BlockSpec((None, bk), lambda j, b, g: (b, j)),
    ]
    del kv_len
    bias_per_head = bias is not None and bias.shape[1] > 1
    if bias is None:
        specs.append(None)
    else:
        bidx = broadcast_index(bias.shape, 0, 1)
        head_block = groups if bias_per_head else None
        specs.append(pl.BlockSpec((None, head_block, q_len, bk), lambda j, b, g: (*bidx(b, g), 0, j)))
    u_per_head = u is not None and u.shape[2] > 1
    vf_per_head = vf is not None and vf.shape[2] > 1
    if u is None:
        specs += [None, None]
    else:
        rank = u.shape[-1]
        uidx, vidx = broadcast_index(u.shape, 0, 2), broadcast_index(vf.shape, 0, 2)
        specs.append(
            pl.BlockSpec(
                (None, q_len, groups if u_per_head else None, rank),
                lambda j, b, g: (uidx(b, g)[0], 0, uidx(b, g)[1], 0),
            )
        )
        specs.append(
            pl.BlockSpec(
                (None, bk, groups if vf_per_head else None, rank),
                lambda j, b, g: (vidx(b, g)[0], j, vidx(b, g)[1], 0),
            )
        )
    specs.append(pl.BlockSpec((None, q_len, groups, dim), lambda j, b, g: (b, 0, g, 0)))  # dO
    specs.append(pl.BlockSpec((None, groups, q_len), lambda j, b, g: (b, g, 0)))  # lse
    specs.append(pl.BlockSpec((None, groups, q_len), lambda j, b, g: (b, g, 0)))  # delta
    return specs, (bias_per_head, u_per_head, vf_per_head)


def backward(plan: GpuPlan, q, k, v, q_seg, kv_seg, bias, u, vf, do, lse, delta):
    """Padded inputs, dO [B, Tq_p, H, Dp], lse and delta f32 [B, H, Tq_p] ->
    (dq, dk, dv, dS f32 [B, H, Tq_p, Tk_p] | None, du f32 [B, Tq_p, H, R] | None, dvf f32 [B, Tk_p, H, R] | None)."""
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    operands = (q, k, v, q_seg, kv_seg, bias, u, vf, do, lse, delta)

    bk = plan.block_k_dkv
    in_specs, flags = _operand_specs_dkv(q, k, q_seg, kv_seg, bias, u, vf, groups, bk)
    out_specs = [pl.BlockSpec((None, bk, None, dim), lambda j, b, g: (b, j, g, 0))] * 2
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if u is not None:
        out_specs.append(pl.BlockSpec((None, bk, groups, u.shape[-1]), lambda j, b, g: (b, j, g, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, kv_len, heads, u.shape[-1]), jnp.float32))
    dkv_out = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan, flags=flags),
        grid=(kv_len // bk, batch, kv_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name="flash_attention_dkv",
    )(*operands)
    dk, dv = dkv_out[0], dkv_out[1]
    dvf = dkv_out[2] if u is not None else None

    bq = plan.block_q_dq
    in_specs = query_block_specs(q, k, q_seg, kv_seg, bias, u, vf, groups, bq)
    in_specs.append(pl.BlockSpec((None, bq, None, q.shape[-1]), lambda i, b, h: (b, i, h, 0)))  # dO
    in_specs.append(pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)))  # lse
    in_specs.append(pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)))  # delta
    out_specs = [pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if u is not None:
        out_specs.append(pl.BlockSpec((None, bq, None, u.shape[-1]), lambda i, b, h: (b, i, h, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, q_len, heads, u.shape[-1]), jnp.float32))
    if bias is not None:
        out_specs.append(pl.BlockSpec((None, None, bq, kv_len), lambda i, b, h: (b, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, q_len, kv_len), jnp.float32))
    dq_out = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=(q_len // bq, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name="flash_attention_dq",
    )(*operands)
    dq = dq_out[0]
    du = dq_out[1] if u is not None else None
    ds = dq_out[-1] if bias is not None else None
    return dq, dk, dv, ds, du, dvf
