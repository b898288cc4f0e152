"""The stream-K-style share of the decode work: how many key tiles each (batch, kv head, split) program reduces.

LeanAttention (arXiv 2405.10480; ONNX Runtime's lean_attention/lean_api.cc) cuts the decode work into
tiles of `block` cache slots, B * KVH * ceil(n_bh / block) of them for filled lengths n_bh, and hands every work
unit (CTA) an equal run of consecutive tiles, ceil(total / units), possibly spanning heads. Here the grid is
(batch, kv head, split) with S splits per head, and a program never spans two heads: with tiles_bh =
ceil(n_bh / block) and

    share = max(ceil(sum_bh tiles_bh / work_units), ceil(max_bh tiles_bh / S), 1)

program (b, h, s) reduces tiles [s share, min((s + 1) share, tiles_bh)) (none when s share >= tiles_bh: an empty
split, lse = -inf). Every program does at most `share` tiles, the longest head is covered by its S splits, and
about work_units programs have work: ragged lengths are balanced over the units at run time (the share is a traced
scalar computed from the lengths), not fixed by the capacity. The imbalance against LeanAttention's exact stream-K
is at most one partial run per head (a head's last split may be short).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

MIN_TILE = 16  # smallest Triton tile side


def padded(n: int) -> int:
    """Power of two >= max(n, 16): the width a tile axis is padded to."""
    return max(MIN_TILE, 1 << max(0, (n - 1).bit_length()))


def effective_block(block_k: int, kv_len: int) -> int:
    """The key tile of a cache of kv_len slots: block_k, clipped to the padded length."""
    return min(block_k, padded(kv_len))


def tiles_per_split(lengths: Array, *, block: int, num_splits: int, work_units: int) -> Array:
    """int32 [] share (tiles per program) for filled lengths int [B, KVH] (see the module docstring)."""
    tiles = (jnp.asarray(lengths, jnp.int32) + block - 1) // block
    balanced = (jnp.sum(tiles) + work_units - 1) // work_units
    fits = (jnp.max(tiles) + num_splits - 1) // num_splits
    return jnp.maximum(jnp.maximum(balanced, fits), 1).astype(jnp.int32)


def split_bounds(lengths: Array, share: Array, *, block: int, num_splits: int) -> tuple[Array, Array]:
    """Slot ranges [start, stop) int32 [S, B, KVH] of every program (stop <= start for an empty split)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    split = jnp.arange(num_splits, dtype=jnp.int32)[:, None, None]
    stop = jnp.minimum((split + 1) * share * block, lengths[None])
    return jnp.broadcast_to(split * share * block, stop.shape), stop
