"""GPU (Pallas on Triton) split-KV decode kernel: per-split partial results of a few queries against a KV cache.

One program per (batch b, kv head h, split s), grid (B, KVH, S). It reads the rows of every query head that shares
kv head h (GQA: the G = H / KVH heads times Tq queries, R = G Tq rows, one [R, D] tile) and reduces the key tiles
[s share, min((s + 1) share, tiles_bh)) of that head (`partition.py`: `share` and the filled length n_bh are scalars
read by the program, so ragged lengths cost only their filled tiles):

    m = -inf, l = 0, acc = 0                                                      [R], [R], [R, Dv]
    for tile t:   k_t, v_t = cache slots [t bk, (t + 1) bk)  (codes dequantised here: code * scale + zero)
        s = scale q k_t^T (softcap), -inf where slot >= n_bh (causal: slot >= n_bh - (Tq - 1 - i));
        m' = max(m, rowmax s);  p = exp(s - m');  l = l e^(m - m') + rowsum p;  acc = acc e^(m - m') + p v_t
    o = acc / l (0 where l = 0),  lse = m + log l (-inf where l = 0)

and writes the partial (o, lse); the caller merges the S partials by log-sum-exp (attn.core.lse_merge).

Quantized caches (per-token codes, `bits` in 8, 4, 2, n = 8 / bits codes per byte, channel c in bits
[bits (c % n), bits (c % n + 1)) of byte c // n, one float32 scale and zero point per token) are read as bytes: code
plane j (channels j, j + n, ...) is (byte >> bits j) & (2^bits - 1), and the wrapper hands the kernel q split into
the same planes, so q . k = sum_j q_j . k_j and o's planes are interleaved back afterwards (no byte is unpacked
into a second array in HBM). Tiles are powers of two (Triton): R and the plane widths are padded to >= 16, the
cache length to a multiple of block_k (zeros, masked by the lengths).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode.layout import pad_axis, query_planes, unplane
from pallas_kernels.decode.partition import effective_block, padded

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Static shape of one call: q_len (Tq), rows (R padded), block_k, planes (n codes per byte; 1 for floats),
    bits (None for float caches), causal, scale, softcap, num_warps, interpret."""

    q_len: int
    rows: int
    block_k: int
    planes: int
    bits: int | None
    causal: bool
    scale: float
    softcap: float | None
    num_warps: int
    interpret: Any


def _dot(a: Array, b: Array, *, trans_b: bool = False) -> Array:
    """float32 product of two tiles; float32 operands use full IEEE precision (Triton would default to TF32)."""
    precision = lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype) else None
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _plane(tile: Array, j: int, plan: DecodePlan, scale_ref: Any, zero_ref: Any, cols: Any, dtype: Any) -> Array:
    """Plane j of a loaded K or V tile [bk, W] as `dtype` (float tiles: the tile itself)."""
    if plan.bits is None:
        return tile.astype(dtype)
    codes = tile.astype(jnp.int32)
    if plan.planes > 1:
        codes = (codes >> (plan.bits * j)) & (2**plan.bits - 1)
    scale, zero = scale_ref[cols], zero_ref[cols]
    return (codes.astype(jnp.float32) * scale[:, None] + zero[:, None]).astype(dtype)


def _kernel(share_ref, len_ref, q_ref, k_ref, v_ref, ks_ref, kz_ref, vs_ref, vz_ref, o_ref, lse_ref, *, plan):
    bk, rows, planes = plan.block_k, plan.rows, plan.planes
    length = len_ref[...]
    share = share_ref[...]
    tiles = lax.div(length + bk - 1, bk)
    lo = pl.program_id(2) * share
    hi = jnp.minimum(lo + share, tiles)
    queries = [q_ref[j] for j in range(planes)]  # [R, W] each
    dtype = queries[0].dtype
    limit = jnp.full((rows,), length, jnp.int32)
    if plan.causal:  # the queries are the last Tq filled slots: row r = g Tq + i sees slots < n - (Tq - 1 - i)
        limit = limit - (plan.q_len - 1 - lax.rem(jnp.arange(rows, dtype=jnp.int32), plan.q_len))
    value_width = o_ref.shape[-1]

    def body(t, carry):
        m, denom, accs = carry
        start = t * bk
        cols = pl.ds(pl.multiple_of(start, bk), bk)
        k_tile = k_ref[cols, :]
        s = None
        for j in range(planes):
            part = _dot(queries[j], _plane(k_tile, j, plan, ks_ref, kz_ref, cols, dtype), trans_b=True)
            s = part if s is None else s + part
        s = s * plan.scale
        if plan.softcap is not None:
            s = plan.softcap * jnp.tanh(s / plan.softcap)
        slot = start + jnp.arange(bk, dtype=jnp.int32)
        s = jnp.where(slot[None, :] < limit[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row that has seen no visible key keeps m = -inf; shift by 0 so exp gives 0, not nan.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_shift)
        p = jnp.exp(s - m_shift[:, None])
        denom = alpha * denom + jnp.sum(p, axis=1)
        v_tile = v_ref[cols, :]
        accs = tuple(
            alpha[:, None] * accs[j] + _dot(p.astype(dtype), _plane(v_tile, j, plan, vs_ref, vz_ref, cols, dtype))
            for j in range(planes)
        )
        return m_new, denom, accs

    m0 = jnp.full((rows,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((rows,), jnp.float32)
    acc0 = tuple(jnp.zeros((rows, value_width), jnp.float32) for _ in range(planes))
    m, denom, accs = lax.fori_loop(lo, hi, body, (m0, l0, acc0))
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    for j in range(planes):
        o_ref[j] = accs[j] / safe[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe))


@functools.partial(
    jax.jit,
    static_argnames=("bits", "num_splits", "block_k", "causal", "scale", "softcap", "interpret"),
)
def decode_partials_gpu(
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
    block_k: int,
    causal: bool,
    scale: float,
    softcap: float | None,
    interpret: Any,
) -> tuple[Array, Array]:
    """Partials (o float32 [S, B, Tq, H, Dv], lse float32 [S, B, Tq, H]) of validated arguments (see api.py).

    k, v: float [B, L, KVH, D] / [B, L, KVH, Dv], or with `bits` uint8 codes [B, L, KVH, D bits / 8] and float32
    scales / zero points [B, L, KVH, 1]; share: int32 [] tiles per program (`partition.tiles_per_split` with the
    block `effective_block(block_k, L)`)."""
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    planes = 1 if bits is None else 8 // bits
    value_dim = v.shape[-1] * planes
    rows = padded((heads // kv_heads) * q_len)
    block = effective_block(block_k, kv_len)
    kv_padded = -(-kv_len // block) * block
    key_width, value_width = padded(dim // planes), padded(value_dim // planes)
    plan = DecodePlan(
        q_len=q_len,
        rows=rows,
        block_k=block,
        planes=planes,
        bits=bits,
        causal=causal,
        scale=scale,
        softcap=softcap,
        num_warps=4 if max(key_width, value_width) <= 64 else 8,
        interpret=interpret,
    )
    share = jnp.asarray(share, jnp.int32).reshape(1)
    lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), kv_len)
    qp = query_planes(q, kv_heads, planes, rows, key_width)
    kp = pad_axis(pad_axis(k, 1, kv_padded), 3, key_width)
    vp = pad_axis(pad_axis(v, 1, kv_padded), 3, value_width)
    scales = [pad_axis(x, 1, kv_padded) for x in (k_scale, k_zero, v_scale, v_zero)]

    cache_spec = lambda width: pl.BlockSpec((None, kv_padded, None, width), lambda b, h, s: (b, 0, h, 0))  # noqa: E731
    scale_spec = pl.BlockSpec((None, kv_padded, None, None), lambda b, h, s: (b, 0, h, 0))
    in_specs = [
        pl.BlockSpec((None,), lambda b, h, s: (0,)),
        pl.BlockSpec((None, None), lambda b, h, s: (b, h)),
        pl.BlockSpec((None, None, planes, rows, key_width), lambda b, h, s: (b, h, 0, 0, 0)),
        cache_spec(key_width),
        cache_spec(value_width),
        *[None if x is None else scale_spec for x in scales],
    ]
    from jax.experimental.pallas import triton as plgpu

    o, lse = pl.pallas_call(
        functools.partial(_kernel, plan=plan),
        grid=(batch, kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, planes, rows, value_width), lambda b, h, s: (b, h, s, 0, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, planes, rows, value_width), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=2),
        interpret=interpret,
        name="split_kv_decode",
    )(share, lengths, qp, kp, vp, *scales)
    group = heads // kv_heads
    o = unplane(o, q_len, group, value_dim, planes)
    lse = lse[..., : group * q_len].reshape(batch, kv_heads, num_splits, group, q_len)
    lse = lse.transpose(2, 0, 4, 1, 3).reshape(num_splits, batch, q_len, heads)
    return o, lse
