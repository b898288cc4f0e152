"""Index lists the kernels loop over, built with jnp outside the kernels from the caller's `block_indices`.

    selected[b, h, qb, kb] = kb appears in block_indices[b|0, h|0, qb, :]       (-1 and out-of-range ignored)
                             AND (not causal OR kb * bs <= q_offset + last query position of block qb)
    forward[b, h, qb, :]   = the kb with selected[b, h, qb, kb], ascending, unique, then -1     (dq, forward)
    transposed[b, h, kb, :] = the qb with selected[b, h, qb, kb], ascending, then -1            (dk, dv)

Going through the dense block mask [B, H, nq, nk] (bool; nq = ceil(Tq / bs), nk = ceil(Tk / bs)) removes duplicates,
compacts the valid entries to the front (a kernel runs exactly count = #entries != -1 steps) and drops blocks that
lie entirely above the causal diagonal, all in one pass; it costs O(B H nq nk) memory, tiny next to the tokens.
Out-of-range entries are rejected by the public entry when the indices are concrete; traced ones are ignored here,
so a kernel never reads outside K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse.layout import BlockSparsePlan

Array = jax.Array


def selected_blocks(plan: BlockSparsePlan, block_indices: Array, q_offset: Array, batch: int, heads: int) -> Array:
    """bool [B, H, nq, nk] from int [B|1, H|1, nq, S] block indices and an int32 scalar q_offset (module docstring)."""
    nq, nk, bs = plan.num_q_blocks, plan.num_k_blocks, plan.block_size
    idx = jnp.broadcast_to(block_indices.astype(jnp.int32), (batch, heads, nq, block_indices.shape[-1]))
    rows = jnp.where((idx >= 0) & (idx < nk), idx, nk).reshape(-1, idx.shape[-1])
    mask = jax.vmap(lambda r: jnp.zeros((nk + 1,), jnp.bool_).at[r].set(True))(rows)
    mask = mask[:, :nk].reshape(batch, heads, nq, nk)
    if plan.causal:
        last_query = jnp.minimum(jnp.arange(nq) * bs + bs - 1, plan.q_len - 1) + q_offset
        mask = mask & (jnp.arange(nk)[None, :] * bs <= last_query[:, None])
    return mask


def compact(mask: Array, width: int) -> Array:
    """int32 [..., width]: the ascending positions of the True entries of bool [..., n], padded with -1."""
    n = mask.shape[-1]
    ids = jnp.sort(jnp.where(mask, jnp.arange(n, dtype=jnp.int32), n), axis=-1)[..., : min(width, n)]
    ids = jnp.where(ids < n, ids, -1)
    if width > n:
        ids = jnp.pad(ids, [(0, 0)] * (ids.ndim - 1) + [(0, width - n)], constant_values=-1)
    return ids


def index_lists(
    plan: BlockSparsePlan, block_indices: Array, q_offset: Array, batch: int, heads: int, widths: tuple[int, int]
):
    """(forward int32 [B, H, nq, widths[0]], transposed int32 [B, H, nk, widths[1]]); widths must hold the counts:
    widths[0] >= min(S, nk) and widths[1] >= nq."""
    mask = selected_blocks(plan, block_indices, q_offset, batch, heads)
    return compact(mask, widths[0]), compact(jnp.swapaxes(mask, 2, 3), widths[1])
