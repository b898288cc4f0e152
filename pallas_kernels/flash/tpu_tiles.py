"""Shared pieces of the Pallas Mosaic (TPU) flash-attention kernels: the static configuration, the masked logits of
one tile, the visible block band (from flash/tiling.py, shared with the GPU kernels) turned into pl.when
predicates and clamped index maps, and the BlockSpecs of the operands every kernel reads.

Layouts inside the kernels (the wrapper in `tpu.py` builds them):
  q, dO, out    [B, H, Tq_p, Dp]       k, v  [B, KVH, Tk_p, Dp]       (Dp = head_dim rounded up to 128)
  q segment ids int32 [B, Tq_p, 1]     kv segment ids int32 [B, 1, Tk_p]
  bias          [B|1, H|1, Tq_p, Tk_p] bias factors u [B|1, H|1, Tq_p, Rp], v [B|1, H|1, Tk_p, Rp] (Rp = R -> 128k)
  lse, delta    f32 [B, H, Tq_p, 1]    sinks f32 [H] (SMEM)
Tq_p / Tk_p are the lengths padded to block multiples; padded keys are masked by position, padded queries are
sliced off (and get zero dO, so they add nothing to dK/dV).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash.tiling import MaskSpec, kv_block_range, q_block_range, tile_logits

LANES = 128  # TPU lane width: last block dims are multiples of this (or the full array dim)
SUBLANES = 8  # TPU sublane count: second-to-last block dims are multiples of this


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static (hashable) description of one call, shared by the forward, backward and key-mass kernels.

    spec: the mask / logits description shared with the GPU kernels (flash/tiling.py); its q_len / kv_len are the
    true lengths. groups: query heads per kv head (GQA). block_*: tile sizes of the forward and of the backward
    and key-mass kernels. bias_bcast / u_bcast / v_bcast: (batch is broadcast, heads is broadcast) of the dense
    bias and of the two bias factors.
    """

    spec: MaskSpec
    q_len_padded: int
    kv_len_padded: int
    groups: int
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    has_segments: bool
    has_bias: bool
    has_factors: bool
    has_sinks: bool
    bias_bcast: tuple[bool, bool]
    u_bcast: tuple[bool, bool]
    v_bcast: tuple[bool, bool]
    interpret: bool | pltpu.InterpretParams


def round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _precision(a: jax.Array, b: jax.Array):
    # f32 tiles get full-precision passes on the MXU (as flash/tiling.py's dot does for the GPU kernels).
    return lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype) else None


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [K, N] -> f32 [M, N]."""
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=_precision(a, b), preferred_element_type=jnp.float32
    )


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """f32 a [K, M]^T . b [K, N] -> f32 [M, N], a cast to b's dtype after an explicit 2-D transpose (a 32-bit
    transpose, then a plain matmul: the form JAX's own TPU flash kernel uses)."""
    return dot_nn(a.T.astype(b.dtype), b)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [N, K]^T -> f32 [M, N]."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=_precision(a, b), preferred_element_type=jnp.float32
    )


def kv_range(cfg: FlashConfig, q_block: jax.Array, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
    """Inclusive [lo, hi] of the kv blocks that q block `q_block` may see (from causal, window and kv_len).

    Index maps clamp the kv block into it, so skipped steps keep the block index of a neighbouring visible step
    and Pallas starts no further DMA for them."""
    lo, hi = kv_block_range(cfg.spec, q_block * bq, bq, bk)
    return lo, jnp.maximum(hi - 1, 0)


def q_range(cfg: FlashConfig, kv_block: jax.Array, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
    """Inclusive [lo, hi] of the q blocks whose queries may see kv block `kv_block` (transpose of `kv_range`)."""
    lo, hi = q_block_range(cfg.spec, kv_block * bk, bk, bq)
    return lo, jnp.maximum(hi - 1, 0)


def in_range(index: jax.Array, bounds: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Whether a tile is inside the visible band (scalar bool): tiles outside it are skipped with pl.when."""
    return (index >= bounds[0]) & (index <= bounds[1])


def clamp(index: jax.Array, bounds: tuple[jax.Array, jax.Array]) -> jax.Array:
    """`index` moved into the band; hi is applied last so an empty band still gives a valid block index."""
    return jnp.minimum(jnp.maximum(index, bounds[0]), bounds[1])


def tile_scores(
    cfg: FlashConfig,
    q: jax.Array,
    k: jax.Array,
    q_block: jax.Array,
    kv_block: jax.Array,
    *,
    q_seg: jax.Array | None = None,
    kv_seg: jax.Array | None = None,
    bias: jax.Array | None = None,
    u: jax.Array | None = None,
    v_factor: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Masked logits of one tile, in the reference's order: scale -> softcap -> + bias (+ u v^T) -> mask.

    q [bq, Dp], k [bk, Dp], q_seg int [bq, 1], kv_seg int [1, bk], bias [bq, bk], u [bq, Rp], v_factor [bk, Rp].
    Returns (s f32 [bq, bk] with -inf where masked, tanh(raw / softcap) f32 [bq, bk] or None) — the tanh is kept
    for the softcap derivative in the backward pass. The mask is built from 2-D iotas and [bq, 1] / [1, bk]
    segment ids (flash/tiling.py's tile_mask takes 1-D index vectors, which Mosaic lays out poorly)."""
    spec = cfg.spec
    bq, bk = q.shape[0], k.shape[0]
    s, capped = tile_logits(spec, q, k, bias, u, v_factor)
    conds = []
    if spec.causal or spec.window is not None or cfg.kv_len_padded != spec.kv_len:
        cols = kv_block * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        rows = q_block * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        if cfg.kv_len_padded != spec.kv_len:
            conds.append(cols < spec.kv_len)
        if spec.causal:
            conds.append(cols <= rows)
        if spec.window is not None:
            conds += [cols >= rows - spec.window[0], cols <= rows + spec.window[1]]
    if q_seg is not None:
        conds.append(q_seg == kv_seg)
    if conds:
        allowed = functools.reduce(jnp.logical_and, conds)
        s = jnp.where(allowed, s, -jnp.inf)
    return s, capped


def common_specs(cfg: FlashConfig, coords, bq: int, bk: int, head_dim: int, rank: int) -> list:
    """BlockSpecs of the operands every kernel reads, in the order of `common_arrays`.

    coords(*grid_ids) -> (batch, q_head, q_block, kv_block), already clamped to the visible range."""

    def pick(bcast, b, h):
        return (0 if bcast[0] else b), (0 if bcast[1] else h)

    def q_map(*ids):
        b, h, qb, _ = coords(*ids)
        return b, h, qb, 0

    def kv_map(*ids):
        b, h, _, kb = coords(*ids)
        return b, lax.div(h, cfg.groups), kb, 0

    specs = [
        pl.BlockSpec((None, None, bq, head_dim), q_map),
        pl.BlockSpec((None, None, bk, head_dim), kv_map),
        pl.BlockSpec((None, None, bk, head_dim), kv_map),
    ]
    if cfg.has_segments:

        def q_seg_map(*ids):
            b, _, qb, _ = coords(*ids)
            return b, qb, 0

        def kv_seg_map(*ids):
            b, _, _, kb = coords(*ids)
            return b, 0, kb

        specs += [pl.BlockSpec((None, bq, 1), q_seg_map), pl.BlockSpec((None, 1, bk), kv_seg_map)]
    if cfg.has_bias:

        def bias_map(*ids):
            b, h, qb, kb = coords(*ids)
            return (*pick(cfg.bias_bcast, b, h), qb, kb)

        specs.append(pl.BlockSpec((None, None, bq, bk), bias_map))
    if cfg.has_factors:

        def u_map(*ids):
            b, h, qb, _ = coords(*ids)
            return (*pick(cfg.u_bcast, b, h), qb, 0)

        def v_map(*ids):
            b, h, _, kb = coords(*ids)
            return (*pick(cfg.v_bcast, b, h), kb, 0)

        specs += [pl.BlockSpec((None, None, bq, rank), u_map), pl.BlockSpec((None, None, bk, rank), v_map)]
    if cfg.has_sinks:
        specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    return specs


def row_stat_spec(coords, bq: int):
    """BlockSpec of a per-query f32 [B, H, Tq_p, 1] statistic (lse, delta)."""

    def row_map(*ids):
        b, h, qb, _ = coords(*ids)
        return b, h, qb, 0

    return pl.BlockSpec((None, None, bq, 1), row_map)


def common_arrays(cfg: FlashConfig, ops: dict) -> list:
    """The operands matching `common_specs`, taken from the dict built by the wrapper."""
    arrays = [ops["q"], ops["k"], ops["v"]]
    if cfg.has_segments:
        arrays += [ops["q_seg"], ops["kv_seg"]]
    if cfg.has_bias:
        arrays.append(ops["bias"])
    if cfg.has_factors:
        arrays += [ops["u"], ops["v_factor"]]
    if cfg.has_sinks:
        arrays.append(ops["sinks"])
    return arrays


def split_common_refs(cfg: FlashConfig, refs: tuple) -> tuple[dict, tuple]:
    """Splits a kernel's refs into the common operands (dict) and the kernel-specific rest."""
    names = ["q", "k", "v"]
    if cfg.has_segments:
        names += ["q_seg", "kv_seg"]
    if cfg.has_bias:
        names.append("bias")
    if cfg.has_factors:
        names += ["u", "v_factor"]
    if cfg.has_sinks:
        names.append("sinks")
    return dict(zip(names, refs[: len(names)], strict=True)), refs[len(names) :]


def load_scores(cfg: FlashConfig, refs: dict, q_block: jax.Array, kv_block: jax.Array):
    """Reads one tile's operands from their refs and returns `tile_scores` of it, plus the loaded q, k, v."""
    q, k = refs["q"][...], refs["k"][...]
    s, t = tile_scores(
        cfg,
        q,
        k,
        q_block,
        kv_block,
        q_seg=refs["q_seg"][...] if cfg.has_segments else None,
        kv_seg=refs["kv_seg"][...] if cfg.has_segments else None,
        bias=refs["bias"][...] if cfg.has_bias else None,
        u=refs["u"][...] if cfg.has_factors else None,
        v_factor=refs["v_factor"][...] if cfg.has_factors else None,
    )
    return s, t, q, k


def compiler_params():
    """Grid semantics shared by all kernels: the last (reduction) axis is sequential, the rest parallel."""
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def interpret_arg(interpret: bool | pltpu.InterpretParams):
    """pallas_call's `interpret`: the caller's InterpretParams, default ones for True, or False (compile)."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False
