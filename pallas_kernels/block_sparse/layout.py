"""Static plan of one block-sparse kernel call, the token mask of a tile, and the blocked layout the kernels read.

Blocked layout: the sequence is cut into blocks of `block_size` tokens (the last one zero-padded) and every block is
zero-padded to `block_padded` rows (a power of two >= 16 for Triton, a multiple of the sublane count on TPU), so the
kernels only ever load whole blocks:

    x [B, T, H, D]  ->  [B, num_blocks * block_padded, H, width]     row  blk * block_padded + r  holds token
                                                                     blk * block_size + r   (r < block_size)

Padded rows, padded tokens past the sequence end and (causal) keys after q_offset + query position are removed by
`token_mask`, so padding never receives weight.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSparsePlan:
    """Everything static about one call (hashable: a jit and custom_vjp static argument).

    block_size: tokens per query/key block; block_padded: rows per block in the blocked layout (>= block_size).
    q_len / kv_len: true lengths; num_q_blocks / num_k_blocks = ceil(length / block_size). causal: key j visible
    from query i only if j <= q_offset + i (q_offset is a run-time int32 operand, so it may be traced).
    scale: logits multiplier. groups: query heads per kv head. interpret: pallas_call's `interpret` (False compiles).
    """

    block_size: int
    block_padded: int
    q_len: int
    kv_len: int
    num_q_blocks: int
    num_k_blocks: int
    causal: bool
    scale: float
    groups: int
    interpret: Any


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def token_mask(
    plan: BlockSparsePlan, q_offset: Array, q_block: Array, k_block: Array, rows: Array, cols: Array
) -> Array | None:
    """bool [bq, bk] visibility inside the tile (query block q_block, key block k_block), or None if all visible.

    rows int32 [bq, 1] and cols int32 [1, bk] are row offsets inside the padded blocks (any broadcastable pair);
    q_offset: int32 scalar, used only when causal."""
    bs = plan.block_size
    q_pos = q_block * bs + rows
    k_pos = k_block * bs + cols
    conds = []
    if plan.block_padded != bs:
        conds += [rows < bs, cols < bs]
    if plan.q_len % bs:
        conds.append(q_pos < plan.q_len)
    if plan.kv_len % bs:
        conds.append(k_pos < plan.kv_len)
    if plan.causal:
        conds.append(k_pos <= q_pos + q_offset)
    if not conds:
        return None
    mask = functools.reduce(jnp.logical_and, conds)
    return jnp.broadcast_to(mask, (rows.shape[0], cols.shape[1]))


def to_blocks(x: Array, block_size: int, block_padded: int, num_blocks: int, width: int) -> Array:
    """[B, T, H, D] -> [B, num_blocks * block_padded, H, width], zero padded (see the module docstring)."""
    batch, length, heads, dim = x.shape
    x = jnp.pad(x, ((0, 0), (0, num_blocks * block_size - length), (0, 0), (0, width - dim)))
    if block_padded != block_size:
        x = x.reshape(batch, num_blocks, block_size, heads, width)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, block_padded - block_size), (0, 0), (0, 0)))
    return x.reshape(batch, num_blocks * block_padded, heads, width)


def from_blocks(y: Array, block_size: int, length: int, dim: int) -> Array:
    """Inverse of `to_blocks` along the sequence: [B, nb * block_padded, H, width] -> [B, length, H, dim]."""
    batch, rows, heads, width = y.shape
    num_blocks = cdiv(length, block_size)
    y = y.reshape(batch, num_blocks, rows // num_blocks, heads, width)[:, :, :block_size, :, :dim]
    return y.reshape(batch, num_blocks * block_size, heads, dim)[:, :length]


def rows_from_blocks(y: Array, block_size: int, length: int) -> Array:
    """A per-row statistic [B, H, nb * block_padded] back to [B, H, length]."""
    batch, heads, rows = y.shape
    num_blocks = cdiv(length, block_size)
    y = y.reshape(batch, heads, num_blocks, rows // num_blocks)[..., :block_size]
    return y.reshape(batch, heads, num_blocks * block_size)[..., :length]
