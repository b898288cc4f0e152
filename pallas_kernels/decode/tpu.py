"""TPU (Pallas Mosaic) split-KV decode kernel: per-split partial results of a few queries against a KV cache.

Same contract as gpu.py (arguments validated by api.py): program (b, h, s) reduces the cache slots
[s share block, min((s + 1) share block, n_bh)) of kv head h (`partition.py`: the stream-K share `share` and the
filled lengths n_bh are scalars prefetched into SMEM, so ragged lengths cost only their filled tiles) for the
R = G Tq rows of the G = H / KVH query heads sharing h (GQA), and writes the partial (o, lse) of that split; the caller
merges the S partials by log-sum-exp (attn.core.lse_merge).

Grid (B, KVH, S, T), the last axis sequential ("arbitrary"): step t reads memory tile first + t of bk slots
(bk = max(block, 128), a lane multiple; `block` is the partition's tile, so a program's slot range need not start
on a memory tile when block < 128 and the slots outside it are masked). T is a static bound from L, S and the work
units; the traced share is clipped to the bound that lengths <= L imply (lengths > L still cover every slot < L, in a
coarser partition than the reference's). Steps past the program's range are skipped
with pl.when and their index maps clamp to the last tile in range, so Pallas issues no DMA for them (an empty split
maps to the previous split's last tile). VMEM scratch m [R, 1], l [R, 1], acc [n, R, W] (f32) carry the online
softmax across steps:

    s = scale q k_t^T (softcap), -inf outside [lo, hi) (causal: slot >= n_bh - (Tq - 1 - i))
    m' = max(m, rowmax s);  p = exp(s - m');  l = l e^(m - m') + rowsum p;  acc = acc e^(m - m') + p v_t
    last step: o = acc / l (0 where l = 0), lse = m + log l (-inf where l = 0)

Layouts (TPU blocks: last two dims multiples of (8, 128) or full): the cache stays in its [B, L, KVH, W] layout,
viewed as [B, L, KVH W] (a free reshape) and read in [bk, W] blocks at column block h, so no transposed copy of the
cache is made; it is zero padded only where L is not a multiple of bk or W (the row width of one head: D, or the
code bytes D bits / 8) not a multiple of 128. q is regrouped to [B, KVH, n, R, W] (layout.py's `query_planes`, R
padded to 8 rows), outputs are [B, KVH, S, n, R, W] and lse [B, KVH, S, R, 1].

Quantized caches (per-token uint8 codes, bits 8 / 4 / 2, n = 8 / bits channels per byte, channel c in bits
[bits (c % n), bits (c % n + 1)) of byte c // n, x = code * scale + zero with one float32 scale and zero per token)
are read as bytes and never dequantised into a tile: code plane j (channels j, j + n, ...) is
(byte >> bits j) & (2^bits - 1), and since scale and zero are per token (per key column of the logits),

    q . x_j = scale_j (sum_planes q_plane . code_plane_j) + zero_j sum_c q_c
    sum_j p_j x_j = sum_j (p_j scale_j) code_j + sum_j p_j zero_j

so the scales enter as [1, bk] lane rows (the scale and zero arrays are re-laid to [B, KVH, 1, L], 8 bytes per
token and head) multiplying the logits and the probabilities: the same x = code * scale + zero, applied to the
products. Codes (integers < 256) are exact in bfloat16 and float32 alike.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode.layout import pad_axis, query_planes, unplane
from pallas_kernels.decode.partition import effective_block
from pallas_kernels.flash.tpu_tiles import LANES, SUBLANES, dot_nn, dot_nt, interpret_arg, round_up

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TpuDecodePlan:
    """Static shape of one call: block (partition tile), tile (memory tile bk), steps (T, grid's last axis),
    kv_heads, q_len (Tq), planes (n; 1 for floats), bits (None for float caches), causal, scale, softcap."""

    block: int
    tile: int
    steps: int
    kv_heads: int
    q_len: int
    planes: int
    bits: int | None
    causal: bool
    scale: float
    softcap: float | None


def _program_range(plan: TpuDecodePlan, b, h, s, share_ref, len_ref):
    """Slots [lo, hi) of program (b, h, s) and its memory tiles first .. last (last < first: an empty split)."""
    length = len_ref[b * plan.kv_heads + h]
    run = share_ref[0] * plan.block
    lo = s * run
    hi = jnp.minimum(lo + run, length)
    first = lax.div(lo, plan.tile)
    last = lax.div(jnp.maximum(hi, 1) - 1, plan.tile)  # hi = 0 (an empty head) gives tile 0
    last = jnp.where(hi > lo, last, jnp.minimum(last, first - 1))
    return lo, hi, first, last


def _tile_index(plan: TpuDecodePlan, b, h, s, t, share_ref, len_ref):
    """Memory tile of step t, clamped into the program's tiles (an empty split: the previous split's last tile)."""
    _, _, first, last = _program_range(plan, b, h, s, share_ref, len_ref)
    return jnp.maximum(jnp.minimum(first + t, last), 0)


def _kernel(share_ref, len_ref, q_ref, lag_ref, k_ref, v_ref, *refs, plan: TpuDecodePlan):
    if plan.bits is None:
        (o_ref, lse_ref, m_ref, l_ref, acc_ref), scale_refs = refs, None
    else:
        scale_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs[:4], refs[4:]
    b, h, s, t = (pl.program_id(axis) for axis in range(4))
    lo, hi, first, last = _program_range(plan, b, h, s, share_ref, len_ref)
    length = len_ref[b * plan.kv_heads + h]
    bk, planes = plan.tile, plan.planes

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(first + t <= last)
    def _compute():
        queries = [q_ref[j] for j in range(planes)]  # [R, W] each
        dtype = queries[0].dtype
        rows = queries[0].shape[0]
        k_tile, v_tile = k_ref[...], v_ref[...]
        if plan.bits is not None:
            k_tile, v_tile = k_tile.astype(jnp.int32), v_tile.astype(jnp.int32)

        def plane(tile, j):
            if plan.bits is None:
                return tile
            if planes > 1:
                tile = (tile >> (plan.bits * j)) & (2**plan.bits - 1)
            return tile.astype(dtype)

        logits = None
        for j in range(planes):
            part = dot_nt(queries[j], plane(k_tile, j))
            logits = part if logits is None else logits + part
        if plan.bits is not None:
            k_scale, k_zero = scale_refs[0][...], scale_refs[1][...]  # [1, bk]
            q_sum = sum(jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) for x in queries)  # [R, 1]
            logits = logits * k_scale + q_sum * k_zero
        logits = logits * plan.scale
        if plan.softcap is not None:
            logits = plan.softcap * jnp.tanh(logits / plan.softcap)
        slot = (first + t) * bk + lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
        visible = (slot >= lo) & (slot < hi)
        if plan.causal:  # the queries are the last Tq filled slots: row g Tq + i sees slots < n - (Tq - 1 - i)
            visible = visible & (slot < length - lag_ref[...])
        logits = jnp.where(visible, logits, -jnp.inf)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
        # A row that has seen no visible key keeps m = -inf; shift by 0 so exp gives 0, not nan.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(logits - m_safe)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        if plan.bits is None:
            acc_ref[0] = alpha * acc_ref[0] + dot_nn(p.astype(v_tile.dtype), v_tile)
            return
        v_scale, v_zero = scale_refs[2][...], scale_refs[3][...]  # [1, bk]
        weighted = (p * v_scale).astype(dtype)
        offset = jnp.sum(p * v_zero, axis=1, keepdims=True)  # [R, 1]: sum_j p_j zero_j, on every channel
        for j in range(planes):
            acc_ref[j] = alpha * acc_ref[j] + dot_nn(weighted, plane(v_tile, j)) + offset

    @pl.when(t == plan.steps - 1)
    def _finish():
        denom = l_ref[...]
        empty = denom == 0.0
        safe = jnp.where(empty, 1.0, denom)
        for j in range(planes):
            o_ref[j] = acc_ref[j] / safe
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(safe))


def _max_share(kv_heads: int, batch: int, tiles: int, num_splits: int, work_units: int) -> int:
    """Static bound on the traced share for lengths <= L, `tiles` = ceil(L / block):
    max(ceil(B KVH tiles / units), ceil(tiles / S), 1)."""
    return max(-(-batch * kv_heads * tiles // work_units), -(-tiles // num_splits), 1)


def _steps(share: int, tiles: int, block: int, tile: int) -> int:
    """Static bound on the memory tiles one program touches (the grid's last axis): a program's run is at most
    min(share, tiles) partition tiles, and a run of r partition tiles not starting on a memory tile touches at most
    ceil(r block / bk) + 1 memory tiles."""
    run = min(share, tiles) * block
    return min(-(-run // tile) + (block < tile), -(-tiles * block // tile))


@functools.partial(
    jax.jit,
    static_argnames=("bits", "num_splits", "work_units", "block_k", "causal", "scale", "softcap", "interpret"),
)
def decode_partials_tpu(
    q: Array,
    k: Array,
    v: Array,
    lengths: Array,
    k_scale: Array | None,
    k_zero: Array | None,
    v_scale: Array | None,
    v_zero: Array | None,
    share: Array,
    *,
    bits: int | None,
    num_splits: int,
    work_units: int,
    block_k: int,
    causal: bool,
    scale: float,
    softcap: float | None,
    interpret: Any,
) -> tuple[Array, Array]:
    """Partials (o float32 [S, B, Tq, H, Dv], lse float32 [S, B, Tq, H]) of validated arguments (see api.py).

    k, v: float [B, L, KVH, D] / [B, L, KVH, Dv], or with `bits` uint8 codes [B, L, KVH, D bits / 8] and float32
    scales / zero points [B, L, KVH, 1]; share: int32 [] partition tiles per program (`partition.tiles_per_split`
    with the block `effective_block(block_k, L)` and `work_units` units). interpret: False (compile for TPU), True
    (the Pallas TPU interpreter) or a pltpu.InterpretParams."""
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    planes = 1 if bits is None else 8 // bits
    value_dim = v.shape[-1] * planes
    block = effective_block(block_k, kv_len)
    tile = max(block, LANES)
    kv_padded = round_up(kv_len, tile)
    key_width, value_width = round_up(dim // planes, LANES), round_up(value_dim // planes, LANES)
    sublanes = SUBLANES * max(1, 4 // jnp.dtype(q.dtype).itemsize)
    rows = round_up(group * q_len, sublanes)
    tiles = -(-kv_len // block)
    max_share = _max_share(kv_heads, batch, tiles, num_splits, work_units)
    plan = TpuDecodePlan(
        block=block,
        tile=tile,
        steps=_steps(max_share, tiles, block, tile),
        kv_heads=kv_heads,
        q_len=q_len,
        planes=planes,
        bits=bits,
        causal=causal,
        scale=scale,
        softcap=softcap,
    )
    # lengths > L would raise the share past the static bound: clipped, every slot < L is still covered.
    share = jnp.minimum(jnp.asarray(share, jnp.int32), max_share).reshape(1)
    lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), kv_len).reshape(batch * kv_heads)
    qp = query_planes(q, kv_heads, planes, rows, key_width)
    lag = (q_len - 1 - jnp.arange(rows, dtype=jnp.int32) % q_len)[:, None]  # [R, 1]; padded rows are sliced off

    def flat(x: Array, width: int) -> Array:  # [B, L, KVH, W] -> [B, Lp, KVH Wp] (pads only where needed)
        x = pad_axis(pad_axis(x, 1, kv_padded), 3, width)
        return x.reshape(batch, kv_padded, kv_heads * width)

    kp, vp = flat(k, key_width), flat(v, value_width)
    scales = []
    if bits is not None:  # [B, L, KVH, 1] -> [B, KVH, 1, Lp]: one lane row of scales per tile
        scales = [
            pad_axis(jnp.asarray(x, jnp.float32).transpose(0, 2, 3, 1), 3, kv_padded)
            for x in (k_scale, k_zero, v_scale, v_zero)
        ]

    def tile_map(b, h, s, t, share_ref, len_ref):
        return b, _tile_index(plan, b, h, s, t, share_ref, len_ref), h

    def scale_map(b, h, s, t, share_ref, len_ref):
        return b, h, 0, _tile_index(plan, b, h, s, t, share_ref, len_ref)

    in_specs = [
        pl.BlockSpec((None, None, planes, rows, key_width), lambda b, h, s, t, *_: (b, h, 0, 0, 0)),
        pl.BlockSpec((rows, 1), lambda b, h, s, t, *_: (0, 0)),
        pl.BlockSpec((None, tile, key_width), tile_map),
        pl.BlockSpec((None, tile, value_width), tile_map),
        *[pl.BlockSpec((None, None, 1, tile), scale_map) for _ in scales],
    ]
    out_map = lambda b, h, s, t, *_: (b, h, s, 0, 0, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, kv_heads, num_splits, plan.steps),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, planes, rows, value_width), out_map),
            pl.BlockSpec((None, None, None, rows, 1), lambda b, h, s, t, *_: (b, h, s, 0, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((planes, rows, value_width), jnp.float32),
        ],
    )
    o, lse = pl.pallas_call(
        functools.partial(_kernel, plan=plan),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, planes, rows, value_width), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_arg(interpret),
        name="split_kv_decode_tpu",
    )(share, lengths, qp, lag, kp, vp, *scales)
    o = unplane(o, q_len, group, value_dim, planes)
    lse = lse[..., : group * q_len, 0].reshape(batch, kv_heads, num_splits, group, q_len)
    lse = lse.transpose(2, 0, 4, 1, 3).reshape(num_splits, batch, q_len, heads)
    return o, lse
