"""Pallas Mosaic (TPU) flash-attention backward kernels (recomputation from the saved lse).

With P = exp(S - lse), delta_i = dO_i . O_i - g_i (g the lse cotangent), dP = dO V^T, dS = P * (dP - delta) (dS is
also d(bias)), and
dS_raw = dS * (1 - tanh^2(raw / softcap)) when softcapped:
    dV = P^T dO, dK = scale dS_raw^T Q, dQ = scale dS_raw K, du = dS v_f, dv_f = dS^T u  (low-rank bias factors).

dK/dV kernel: grid (B, KVH, nk, G * nq) — the last axis walks the G query heads of the kv head and, for each,
their q blocks, so GQA gradients accumulate in VMEM (f32 scratch) without repeating K/V or a per-head dK.
dQ kernel: grid (B, H, nq, nk), kv last; it also writes the dS tiles (for d(bias), summed over broadcast dims by
the wrapper) when a dense bias is given. Both skip tiles outside the causal/window band with pl.when and clamp
their index maps into the band (no DMA for skipped steps); skipped dS tiles are written as zeros.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash.tiling import logits_grad
from pallas_kernels.flash.tpu_tiles import (
    FlashConfig,
    clamp,
    common_arrays,
    common_specs,
    compiler_params,
    dot_nn,
    dot_nt,
    dot_tn,
    in_range,
    interpret_arg,
    kv_range,
    load_scores,
    q_range,
    row_stat_spec,
    split_common_refs,
)


def _tile_grads(cfg: FlashConfig, ops: dict, lse_ref, delta_ref, do_ref, q_block, kv_block):
    """Recomputes one tile: returns (p, dS, dS_raw, q, k, dO) with p, dS, dS_raw f32 [bq, bk]."""
    s, t, q, k = load_scores(cfg, ops, q_block, kv_block)
    v, do = ops["v"][...], do_ref[...]
    p = jnp.exp(s - lse_ref[...])
    dp = dot_nt(do, v)
    ds = p * (dp - delta_ref[...])
    ds_raw = logits_grad(cfg.spec, ds, t)
    return p, ds, ds_raw, q, k, do


def _dkdv_kernel(*refs, cfg: FlashConfig, num_q: int):
    ops, rest = split_common_refs(cfg, refs)
    lse_ref, delta_ref, do_ref, dk_ref, dv_ref = rest[:5]
    rest = rest[5:]
    if cfg.has_factors:
        dvf_ref, dk_acc, dv_acc, dvf_acc = rest
    else:
        dk_acc, dv_acc = rest
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    kv_block, step = pl.program_id(2), pl.program_id(3)
    q_block = lax.rem(step, num_q)

    @pl.when(step == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    if cfg.has_factors:

        @pl.when(q_block == 0)
        def _init_factor():
            dvf_acc[...] = jnp.zeros(dvf_acc.shape, jnp.float32)

    @pl.when(in_range(q_block, q_range(cfg, kv_block, bq, bk)))
    def _compute():
        p, ds, ds_raw, q, _, do = _tile_grads(cfg, ops, lse_ref, delta_ref, do_ref, q_block, kv_block)
        dv_acc[...] += dot_tn(p, do)
        dk_acc[...] += dot_tn(ds_raw, q) * cfg.spec.scale
        if cfg.has_factors:
            u = ops["u"][...]
            dvf_acc[...] += dot_tn(ds, u)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

    if cfg.has_factors:

        @pl.when(q_block == num_q - 1)
        def _finish_factor():
            dvf_ref[...] = dvf_acc[...].astype(dvf_ref.dtype)


def _dq_kernel(*refs, cfg: FlashConfig, num_kv: int):
    ops, rest = split_common_refs(cfg, refs)
    lse_ref, delta_ref, do_ref, dq_ref = rest[:4]
    rest = list(rest[4:])
    du_ref = rest.pop(0) if cfg.has_factors else None
    dbias_ref = rest.pop(0) if cfg.has_bias else None
    dq_acc = rest.pop(0)
    du_acc = rest.pop(0) if cfg.has_factors else None
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    q_block, kv_block = pl.program_id(2), pl.program_id(3)
    visible = in_range(kv_block, kv_range(cfg, q_block, bq, bk))

    @pl.when(kv_block == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
        if cfg.has_factors:
            du_acc[...] = jnp.zeros(du_acc.shape, jnp.float32)

    @pl.when(visible)
    def _compute():
        _, ds, ds_raw, _, k, _ = _tile_grads(cfg, ops, lse_ref, delta_ref, do_ref, q_block, kv_block)
        dq_acc[...] += dot_nn(ds_raw.astype(k.dtype), k) * cfg.spec.scale
        if cfg.has_factors:
            vf = ops["v_factor"][...]
            du_acc[...] += dot_nn(ds.astype(vf.dtype), vf)
        if cfg.has_bias:
            dbias_ref[...] = ds.astype(dbias_ref.dtype)

    if cfg.has_bias:
        # Every dS block is written exactly once (its index map is not clamped), so skipped tiles need zeros.
        @pl.when(jnp.logical_not(visible))
        def _zero_bias():
            dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)

    @pl.when(kv_block == num_kv - 1)
    def _finish():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)
        if cfg.has_factors:
            du_ref[...] = du_acc[...].astype(du_ref.dtype)


def backward_call(cfg: FlashConfig, ops: dict, lse: jax.Array, delta: jax.Array, do: jax.Array) -> dict:
    """Runs both backward kernels on the padded, head-major operands of `tpu.py`.

    lse (with -inf replaced by 0) and delta: f32 [B, H, Tq_p, 1]; do: [B, H, Tq_p, Dp]. Returns a dict with
    dq [B, H, Tq_p, Dp], dk / dv [B, KVH, Tk_p, Dp], and when present du f32 [B, H, Tq_p, Rp], dv_factor
    f32 [B, H, Tk_p, Rp] (per query head) and ds f32 [B, H, Tq_p, Tk_p]."""
    cfg = dataclasses.replace(cfg, has_sinks=False)  # the sink is already inside lse
    q, k = ops["q"], ops["k"]
    batch, heads, q_len_p, head_dim = q.shape
    kv_heads, kv_len_p = k.shape[1], k.shape[2]
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    num_q, num_kv = q_len_p // bq, kv_len_p // bk
    groups = cfg.groups
    rank = ops["u"].shape[-1] if cfg.has_factors else 0
    inputs = [*common_arrays(cfg, ops), lse, delta, do]
    f32 = jnp.float32

    # dK / dV: the last grid axis enumerates (query head in group, q block).
    def kv_coords(b, hk, kb, step):
        q_block = clamp(lax.rem(step, num_q), q_range(cfg, kb, bq, bk))
        return b, hk * groups + lax.div(step, num_q), q_block, kb

    def dkv_map(b, hk, kb, step):
        return b, hk, kb, 0

    def dvf_map(b, hk, kb, step):
        return b, hk * groups + lax.div(step, num_q), kb, 0

    out_specs = [pl.BlockSpec((None, None, bk, head_dim), dkv_map)] * 2
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(ops["v"].shape, ops["v"].dtype)]
    scratch = [pltpu.VMEM((bk, head_dim), f32), pltpu.VMEM((bk, head_dim), f32)]
    if cfg.has_factors:
        out_specs.append(pl.BlockSpec((None, None, bk, rank), dvf_map))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, kv_len_p, rank), f32))
        scratch.append(pltpu.VMEM((bk, rank), f32))
    kv_outs = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, num_q=num_q),
        grid=(batch, kv_heads, num_kv, groups * num_q),
        in_specs=[
            *common_specs(cfg, kv_coords, bq, bk, head_dim, rank),
            row_stat_spec(kv_coords, bq),
            row_stat_spec(kv_coords, bq),
            pl.BlockSpec((None, None, bq, head_dim), lambda *ids: (*kv_coords(*ids)[:3], 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=compiler_params(),
        interpret=interpret_arg(cfg.interpret),
    )(*inputs)

    # dQ (+ du, + dS for the dense bias): kv last.
    def q_coords(b, h, qb, kb):
        return b, h, qb, clamp(kb, kv_range(cfg, qb, bq, bk))

    def row_map(b, h, qb, kb):
        return b, h, qb, 0

    out_specs = [pl.BlockSpec((None, None, bq, head_dim), row_map)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    scratch = [pltpu.VMEM((bq, head_dim), f32)]
    if cfg.has_factors:
        out_specs.append(pl.BlockSpec((None, None, bq, rank), row_map))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, q_len_p, rank), f32))
        scratch.append(pltpu.VMEM((bq, rank), f32))
    if cfg.has_bias:
        out_specs.append(pl.BlockSpec((None, None, bq, bk), lambda b, h, qb, kb: (b, h, qb, kb)))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, q_len_p, kv_len_p), f32))
    q_outs = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, num_kv=num_kv),
        grid=(batch, heads, num_q, num_kv),
        in_specs=[
            *common_specs(cfg, q_coords, bq, bk, head_dim, rank),
            row_stat_spec(q_coords, bq),
            row_stat_spec(q_coords, bq),
            pl.BlockSpec((None, None, bq, head_dim), lambda *ids: (*q_coords(*ids)[:3], 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=compiler_params(),
        interpret=interpret_arg(cfg.interpret),
    )(*inputs)

    grads = {"dk": kv_outs[0], "dv": kv_outs[1], "dq": q_outs[0]}
    if cfg.has_factors:
        grads["dv_factor"] = kv_outs[2]
        grads["du"] = q_outs[1]
    if cfg.has_bias:
        grads["ds"] = q_outs[-1]
    return grads
