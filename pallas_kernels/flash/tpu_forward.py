"""Pallas Mosaic (TPU) flash-attention forward kernel (online softmax) and the key-mass kernel.

Forward: grid (B, H, nq, nk), kv last ("arbitrary"). VMEM scratch m [bq, 1], l [bq, 1], acc [bq, Dp] (f32) carry
the running row max, the running denominator and the unnormalised output across kv steps:
    m' = max(m, rowmax(s)), p = exp(s - m'), l' = e^(m - m') l + rowsum(p), acc' = e^(m - m') acc + p v
and the last kv step writes out = acc / l and lse = m + log l. A sink logit enters as an initial "key" with no
value (m = sink, l = 1), so rows with no visible key give out = 0 and lse = sink (or -inf without sinks), as in
the reference. Tiles outside the causal/window band are skipped with pl.when, and the kv index maps are clamped
into the band so skipped steps re-use the resident block (no DMA).

Key mass: grid (B, H, nk, nq), q last; recomputes P = exp(s - lse) from the saved lse and accumulates its column
sums over the (real) queries: key_mass[b, h, j] = sum_i P[b, h, i, j].

Time O(B H Tq Tk D) (less the skipped tiles); memory O(B H T D) — no [Tq, Tk] array is materialised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash.tpu_tiles import (
    FlashConfig,
    clamp,
    common_arrays,
    common_specs,
    compiler_params,
    dot_nn,
    in_range,
    interpret_arg,
    kv_range,
    load_scores,
    q_range,
    row_stat_spec,
    split_common_refs,
)


def _forward_kernel(*refs, cfg: FlashConfig, num_kv: int):
    ops, (out_ref, lse_ref, m_ref, l_ref, acc_ref) = split_common_refs(cfg, refs)
    bq, bk = cfg.block_q, cfg.block_kv
    head, q_block, kv_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        if cfg.has_sinks:
            m_ref[...] = jnp.full(m_ref.shape, ops["sinks"][head], jnp.float32)
            l_ref[...] = jnp.ones(l_ref.shape, jnp.float32)
        else:
            m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
            l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(in_range(kv_block, kv_range(cfg, q_block, bq, bk)))
    def _compute():
        s, _, _, _ = load_scores(cfg, ops, q_block, kv_block)
        v = ops["v"][...]
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp gives 0, not nan.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + dot_nn(p.astype(v.dtype), v)
        m_ref[...] = m_next

    @pl.when(kv_block == num_kv - 1)
    def _finish():
        denom = l_ref[...]
        empty = denom == 0.0
        safe = jnp.where(empty, 1.0, denom)
        out_ref[...] = (acc_ref[...] / safe).astype(out_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(safe))


def forward_call(cfg: FlashConfig, ops: dict) -> tuple[jax.Array, jax.Array]:
    """Runs the forward kernel on the padded, head-major operands of `tpu.py`.

    Returns out [B, H, Tq_p, Dp] in q.dtype and lse f32 [B, H, Tq_p, 1]."""
    q = ops["q"]
    batch, heads, q_len_p, head_dim = q.shape
    bq, bk = cfg.block_q, cfg.block_kv
    num_q, num_kv = q_len_p // bq, cfg.kv_len_padded // bk
    rank = ops["u"].shape[-1] if cfg.has_factors else 0

    def coords(b, h, qb, kb):
        return b, h, qb, clamp(kb, kv_range(cfg, qb, bq, bk))

    def out_map(b, h, qb, kb):
        return b, h, qb, 0

    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, num_kv=num_kv),
        grid=(batch, heads, num_q, num_kv),
        in_specs=common_specs(cfg, coords, bq, bk, head_dim, rank),
        out_specs=[pl.BlockSpec((None, None, bq, head_dim), out_map), pl.BlockSpec((None, None, bq, 1), out_map)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len_p, 1), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, head_dim), jnp.float32),
        ],
        compiler_params=compiler_params(),
        interpret=interpret_arg(cfg.interpret),
    )(*common_arrays(cfg, ops))


def _key_mass_kernel(*refs, cfg: FlashConfig, bq: int, bk: int):
    ops, (lse_ref, mass_ref) = split_common_refs(cfg, refs)
    kv_block, q_block = pl.program_id(2), pl.program_id(3)

    @pl.when(q_block == 0)
    def _init():
        mass_ref[...] = jnp.zeros(mass_ref.shape, jnp.float32)

    @pl.when(in_range(q_block, q_range(cfg, kv_block, bq, bk)))
    def _compute():
        s, _, _, _ = load_scores(cfg, ops, q_block, kv_block)
        p = jnp.exp(s - lse_ref[...])
        if cfg.spec.q_len != cfg.q_len_padded:
            rows = q_block * bq + lax.broadcasted_iota(jnp.int32, p.shape, 0)
            p = jnp.where(rows < cfg.spec.q_len, p, 0.0)
        mass_ref[...] += jnp.sum(p, axis=0, keepdims=True)


def key_mass_call(cfg: FlashConfig, ops: dict, lse: jax.Array) -> jax.Array:
    """Column sums of the probability matrix from the saved lse: f32 [B, H, 1, Tk_p] (not differentiable).

    lse must have -inf replaced by 0 (rows with no visible key then give exp(-inf - 0) = 0, not nan)."""
    q = ops["q"]
    batch, heads, q_len_p, head_dim = q.shape
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    num_q, num_kv = q_len_p // bq, cfg.kv_len_padded // bk
    rank = ops["u"].shape[-1] if cfg.has_factors else 0

    def coords(b, h, kb, qb):
        return b, h, clamp(qb, q_range(cfg, kb, bq, bk)), kb

    return pl.pallas_call(
        functools.partial(_key_mass_kernel, cfg=cfg, bq=bq, bk=bk),
        grid=(batch, heads, num_kv, num_q),
        in_specs=[*common_specs(cfg, coords, bq, bk, head_dim, rank), row_stat_spec(coords, bq)],
        out_specs=pl.BlockSpec((None, None, 1, bk), lambda b, h, kb, qb: (b, h, 0, kb)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, 1, cfg.kv_len_padded), jnp.float32),
        compiler_params=compiler_params(),
        interpret=interpret_arg(cfg.interpret),
    )(*common_arrays(cfg, ops), lse)
