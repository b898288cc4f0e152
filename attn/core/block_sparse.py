"""`block_sparse_attention`: exact softmax attention over the selected key blocks of each query block.

Index format (shared with `pallas_kernels.block_sparse`):
  q [B, Tq, H, D], k [B, Tk, KVH, D], v [B, Tk, KVH, Dv] (H a multiple of KVH: GQA); output like q, lse
  [B, H, Tq] in the accumulation dtype (float32; float64 for float64 inputs). One `block_size` for query and key
  blocks: num_q_blocks = ceil(Tq / block_size),
  num_k_blocks = ceil(Tk / block_size); the last partial blocks are padded inside and padded keys get no weight.
  block_indices: int32 [B|1, H|1, num_q_blocks, max_selected], the key blocks each (batch row, query head, query
    block) attends to, in any order, padded with -1; duplicates count once. Query block b holds queries
    b * block_size .. (b + 1) * block_size - 1.
  block_mask: bool [B|1, H|1, num_q_blocks, num_k_blocks], the alternative input (exactly one of the two). It is
    converted to indices with max_selected = the largest number of True entries in a row when the mask is concrete
    (a traced mask gives max_selected = num_k_blocks, i.e. dense cost).
  Ranks (both inputs; the last two axes are always [num_q_blocks, num_k_blocks | max_selected]):
    rank 4 [B|1, H|1, nq, .]  per batch row and query head;
    rank 3 [H|1, nq, .]       per query head, shared by the batch rows (splash attention's multi-head mask layout);
                              a per-batch-row pattern must be passed as rank 4 [B, 1, nq, .];
    rank 2 [nq, .]            one pattern shared by every batch row and head.
  causal: key j is visible to query i only if j <= q_offset + i (token level inside diagonal blocks); selected
    blocks entirely above the diagonal are skipped.
A query row with no selected, visible key gets output 0 and lse -inf (never NaN, in value or gradient).

XLA path: q, k and v are viewed as token-major blocks [B, n, bs, heads, D] (a reshape); a lax.scan over the
max_selected slots gathers, for every (batch row, head, query block) at once, its key and value block of that slot
straight from that view (no block-major copy of k and v; only q is relaid out, once) and updates an online softmax
(`attn.core.blockwise_softmax`). Time is O(B H num_q_blocks max_selected block_size^2 D), i.e. proportional to the
kept blocks, and memory O(B H T D) (one gathered block per query block at a time). Gradients: `jax.custom_vjp`
recomputing the weights from the saved lse, with the key/value gradients scatter-added back to the selected blocks
(residuals O(T), never the [Tq, Tk] matrix). Accumulation in float32 (float64 for float64 inputs), output in q.dtype.

implementation: None (the Pallas kernel `pallas_kernels.block_sparse` on GPU/TPU when that package is present,
else XLA; the reason is logged once at debug level), "xla", or "pallas" (raises where the kernel cannot run).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core import dispatch, kernels
from attn.core.block_pooling import split_blocks
from attn.core.blockwise_softmax import (
    Contractions,
    backward_inputs,
    finish,
    grad_step,
    initial_state,
    online_step,
)
from attn.core.pipeline import accumulation_dtype
from attn.core.validation import check_qkv, check_rank, shape_of

Array = jax.Array

__all__ = ["block_sparse_attention", "block_mask_to_indices"]

_KERNEL_MODULE = "pallas_kernels.block_sparse"


def block_sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    block_indices: Array | None = None,
    block_mask: Array | None = None,
    block_size: int,
    causal: bool = False,
    q_offset: Any = 0,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, dict[str, Array]]:
    """Softmax attention restricted to the selected key blocks of each query block (see the module docstring).

    Args:
      q: [B, Tq, H, D]; k: [B, Tk, KVH, D]; v: [B, Tk, KVH, Dv], H a multiple of KVH.
      block_indices: int [B|1, H|1, ceil(Tq / block_size), max_selected], key block ids or -1 (ignored); also rank 3
        [H|1, nq, max_selected] (per head, shared by the batch) or rank 2 [nq, max_selected] (shared by all).
      block_mask: bool [B|1, H|1, ceil(Tq / block_size), ceil(Tk / block_size)] (instead of block_indices); also rank
        3 [H|1, nq, nk] (per head, shared by the batch) or rank 2 [nq, nk] (one pattern for every row and head).
      block_size: positive int, the query and key block length.
      causal: key j visible to query i only if j <= q_offset + i. q_offset: int (or traced int scalar).
      scale: logit scale, default 1/sqrt(D).
      return_lse: also return {"lse": [B, H, Tq]} in float32 (float64 for float64 inputs), -inf for rows with no
        visible key.
      implementation: None, "xla" or "pallas".
    Returns:
      out [B, Tq, H, Dv] in q.dtype, or (out, {"lse": lse}) when return_lse.
    """
    heads, kv_heads = check_qkv(q, k, v)
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, (bool, np.bool_)) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    block_size = int(block_size)
    if (block_indices is None) == (block_mask is None):
        given = "both" if block_indices is not None else "neither"
        raise ValueError(f"pass exactly one of block_indices and block_mask, got {given}")
    n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
    if block_mask is not None:
        block_mask = _check_block_array("block_mask", block_mask, batch, heads, n_q, n_k)
        if jnp.asarray(block_mask).dtype != jnp.bool_:
            raise ValueError(f"block_mask must be a boolean array, got dtype {jnp.asarray(block_mask).dtype}")
        block_indices = block_mask_to_indices(block_mask)
    else:
        block_indices = _check_block_array("block_indices", block_indices, batch, heads, n_q, None)
        if not jnp.issubdtype(jnp.asarray(block_indices).dtype, jnp.integer):
            raise ValueError(f"block_indices must be an integer array, got dtype {jnp.asarray(block_indices).dtype}")
        _check_index_range(block_indices, n_k)
    block_indices = jnp.asarray(block_indices, jnp.int32)

    choice = dispatch.select("block_sparse_attention", implementation, {"pallas": _kernel_unavailable(), "xla": None})
    if choice == "pallas":
        kernel = importlib.import_module(_KERNEL_MODULE).block_sparse_attention
        result = kernel(
            q, k, v, block_indices=block_indices, block_size=block_size, causal=causal, q_offset=q_offset,
            scale=scale, return_lse=return_lse,
        )  # fmt: skip
        if not return_lse:
            return result
        out, lse = result
        return out, {"lse": lse["lse"] if isinstance(lse, dict) else lse}
    return _xla_block_sparse(
        q, k, v, block_indices, block_size=block_size, causal=causal, q_offset=q_offset, scale=scale,
        return_lse=return_lse,
    )  # fmt: skip


def block_mask_to_indices(block_mask: Array, max_selected: int | None = None) -> Array:
    """bool [B|1, H|1, nq, nk] -> int32 [B|1, H|1, nq, max_selected]: the True columns of each row in
    ascending order, padded with -1.

    max_selected: a static positive int (the index width; under jit the only way to pay less than dense cost for a
    traced mask), or None: the largest row count (at least 1) when the mask is concrete, nk when it is traced (the
    count is then unknown while tracing). A concrete mask with a row of more than max_selected True entries raises;
    a traced one keeps the first max_selected of such a row (lowest block ids)."""
    mask = jnp.asarray(block_mask, jnp.bool_)
    n_k = mask.shape[-1]
    concrete = not isinstance(block_mask, jax.core.Tracer)
    largest = max(int(np.max(np.sum(np.asarray(block_mask), axis=-1), initial=0)), 1) if concrete else None
    if max_selected is None:
        selected = largest if concrete else n_k
    else:
        if isinstance(max_selected, jax.core.Tracer):
            raise ValueError(
                "max_selected is a traced value; it sets the index array's shape, so it must be a static Python int "
                "(pass it as a static argument of jit, or compute it outside the traced function)"
            )
        if not isinstance(max_selected, (int, np.integer)) or isinstance(max_selected, bool) or max_selected < 1:
            raise ValueError(f"max_selected={max_selected!r} must be None or a positive int")
        if concrete and largest > max_selected:
            raise ValueError(
                f"max_selected={max_selected} is below the block mask's largest row count {largest}; pass at least "
                f"{largest} (or None)"
            )
        selected = int(max_selected)
    order = jnp.argsort(~mask, axis=-1, stable=True)[..., :selected].astype(jnp.int32)
    if selected > n_k:
        order = jnp.pad(order, [(0, 0)] * (order.ndim - 1) + [(0, selected - n_k)])
    count = jnp.sum(mask, axis=-1, keepdims=True)
    return jnp.where(jnp.arange(selected) < count, order, -1)


def _check_block_array(name: str, x: Any, batch: int, heads: int, n_q: int, n_k: int | None) -> Any:
    """Checks a block_mask / block_indices of rank 2, 3 or 4 (module docstring) and returns it as rank 4 (leading
    axes of size 1 added; a concrete numpy input stays numpy, so block_mask_to_indices can count its rows)."""
    last = "num_k_blocks" if n_k is not None else "max_selected"
    layouts = {2: f"[num_q_blocks, {last}]", 3: f"[heads|1, num_q_blocks, {last}]"}
    layouts[4] = f"[batch|1, heads|1, num_q_blocks, {last}]"
    check_rank(name, x, (2, 3, 4), " or ".join(layouts[r] for r in (4, 3, 2)))
    shape = shape_of(x)
    full = (1,) * (4 - len(shape)) + shape
    expected = full[0] in (1, batch) and full[1] in (1, heads) and full[2] == n_q and (n_k is None or full[3] == n_k)
    if not expected or full[3] < 1:
        last_size = n_k if n_k is not None else ">= 1"
        want = {4: f"[1 or {batch}, 1 or {heads}, {n_q}, {last_size}]", 3: f"[1 or {heads}, {n_q}, {last_size}]"}
        want[2] = f"[{n_q}, {last_size}]"
        hint = ""
        if len(shape) == 3 and shape[0] == batch and shape[0] not in (1, heads):
            hint = f"; a rank-3 {name} is per head: pass a per-batch-row pattern as [{batch}, 1, {n_q}, {last_size}]"
        raise ValueError(f"{name} of shape {shape} must be {layouts[len(shape)]} = {want[len(shape)]}{hint}")
    if len(shape) == 4:
        return x
    return x.reshape(full) if isinstance(x, (np.ndarray, jax.Array)) else np.reshape(x, full)


def _check_index_range(block_indices: Any, n_k: int) -> None:
    if isinstance(block_indices, jax.core.Tracer):
        return
    values = np.asarray(block_indices)
    bad = values[(values < -1) | (values >= n_k)]
    if bad.size:
        raise ValueError(
            f"block_indices holds {int(bad.flat[0])}, out of range: entries must be key block ids in "
            f"[0, {n_k}) (num_k_blocks = ceil(kv_len / block_size)) or -1 for padding"
        )


def _kernel_unavailable() -> str | None:
    reason = kernels._platform_reason("block-sparse attention")
    if reason:
        return reason
    try:
        module = importlib.import_module(_KERNEL_MODULE)
    except ImportError as error:
        return f"{_KERNEL_MODULE} cannot be imported ({error})"
    if not callable(getattr(module, "block_sparse_attention", None)):
        return f"{_KERNEL_MODULE} has no block_sparse_attention"
    return None


# ---------------------------------------------------------------------------------------------- XLA path
@dataclasses.dataclass(frozen=True)
class _SparseLayout:
    """Static layout of the XLA path (hashable: a nondiff argument of the custom VJP)."""

    kv_len: int
    block_size: int
    scale: float
    causal: bool


_SPARSE = Contractions(logits="bhgnqd,bhgnkd->bhgnqk", mix="bhgnqk,bhgnkd->bhgnqd", key_grad="bhgnqk,bhgnqd->bhgnkd")


def _xla_block_sparse(q, k, v, block_indices, *, block_size, causal, q_offset, scale, return_lse):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    n_q = -(-q_len // block_size)
    q_offset = jnp.asarray(q_offset, jnp.int32)

    # token-major block views (a reshape: no copy unless a length needs padding): [B, n, bs, heads, D]
    qb, kb, vb = (split_blocks(x, block_size, axis=1)[0] for x in (q, k, v))
    indices, valid = _slots(block_indices, batch, heads, kv_heads, block_size, causal, q_offset)

    layout = _SparseLayout(kv_len, block_size, float(head_dim**-0.5 if scale is None else scale), causal)
    out, lse = _sparse_core(layout, qb, kb, vb, indices, valid, q_offset)
    # out [B, KVH, G, nq, bs, Dv] -> [B, Tq, H, Dv]; lse [B, KVH, G, nq, bs] -> [B, H, Tq]
    out = out.transpose(0, 3, 4, 1, 2, 5).reshape(batch, n_q * block_size, heads, value_dim)[:, :q_len]
    out = out.astype(q.dtype)
    if not return_lse:
        return out
    lse = lse.reshape(batch, heads, n_q * block_size)[:, :, :q_len]
    return out, {"lse": lse}  # the accumulation dtype: float32, or float64 for float64 inputs


def _slots(block_indices, batch, heads, kv_heads, block_size, causal, q_offset) -> tuple[Array, Array]:
    """The index lists as scan slots: (ids int32 [S, B, KVH, G, nq], valid bool [S, B, KVH, G, nq]).

    Sorted per row so duplicates are adjacent; -1 padding, repeats and (causal) blocks entirely above the diagonal
    are invalid slots (their id is set to 0 and their weights to 0)."""
    n_q, selected = block_indices.shape[2], block_indices.shape[3]
    ids = jnp.sort(jnp.broadcast_to(block_indices, (batch, heads, n_q, selected)), axis=-1)
    valid = ids >= 0
    valid = valid.at[..., 1:].set(valid[..., 1:] & (ids[..., 1:] != ids[..., :-1]))
    if causal:
        last_query = q_offset + (jnp.arange(n_q, dtype=jnp.int32) + 1) * block_size - 1
        valid = valid & (ids * block_size <= last_query[:, None])
    ids = jnp.where(valid, ids, 0)
    shape = (batch, kv_heads, heads // kv_heads, n_q, selected)
    return jnp.moveaxis(ids.reshape(shape), -1, 0), jnp.moveaxis(valid.reshape(shape), -1, 0)


def _query_blocks(qb: Array, kv_heads: int) -> Array:
    """Token-major query blocks [B, nq, bs, H, D] -> [B, KVH, G, nq, bs, D] (query heads grouped by kv head)."""
    batch, n_q, bs, heads, dim = qb.shape
    return qb.reshape(batch, n_q, bs, kv_heads, heads // kv_heads, dim).transpose(0, 3, 4, 1, 2, 5)


def _gather_token_major(blocks: Array, ids: Array) -> Array:
    """Token-major key/value blocks [B, nk, bs, KVH, D] at ids [B, KVH, G, nq] -> [B, KVH, G, nq, bs, D]: one
    gather that reads each block straight from the [B, T, KVH, D] layout (no block-major copy of k and v)."""
    batch, kv_heads = blocks.shape[0], blocks.shape[3]
    rows = jnp.arange(batch).reshape(batch, 1, 1, 1)
    heads = jnp.arange(kv_heads).reshape(1, kv_heads, 1, 1)
    return blocks[rows, ids, :, heads, :]


def _gather_blocks(blocks: Array, ids: Array) -> Array:
    """blocks [B, KVH, nk, bs, D] at ids [B, KVH, G, nq] -> [B, KVH, G, nq, bs, D]."""
    return jax.vmap(jax.vmap(lambda per_head, i: jnp.take(per_head, i, axis=0)))(blocks, ids)


def _scatter_add_blocks(blocks: Array, ids: Array, updates: Array) -> Array:
    """blocks [B, KVH, nk, bs, D] += updates [B, KVH, G, nq, bs, D] at ids [B, KVH, G, nq]."""
    return jax.vmap(jax.vmap(lambda per_head, i, u: per_head.at[i].add(u)))(blocks, ids, updates)


def _allowed(layout: _SparseLayout, ids: Array, valid: Array, q_offset: Array, n_q: int) -> Array:
    """bool [B, KVH, G, nq, bs, bs] of one slot: valid slot, real (unpadded) key, causal at token level."""
    bs = layout.block_size
    keys = ids[..., None, None] * bs + jnp.arange(bs, dtype=jnp.int32)  # [B, KVH, G, nq, 1, bs]
    allowed = valid[..., None, None] & (keys < layout.kv_len)
    if layout.causal:
        queries = q_offset + jnp.arange(n_q * bs, dtype=jnp.int32).reshape(n_q, bs, 1)
        allowed = allowed & (keys <= queries)
    return allowed


def _sparse_forward(layout, qb, kb, vb, ids, valid, q_offset):
    """The online softmax over the slots (a lax.scan). Each slot gathers its key/value blocks straight from the
    token-major k/v, so only q is relaid out (once, outside the loop): with block-major copies of k and v (and XLA's
    second copy of every loop-invariant operand into the loop's layout) the once-per-call ops took 1-1.5 slots'
    time; now 0.25-0.35 (benchmarks/block_sparse_profile.py). Unrolling the slots instead measured slower: XLA:CPU
    then runs the independent slots' dots concurrently on the same cores."""
    q = _query_blocks(qb, kb.shape[3])
    n_q = q.shape[3]

    def step(state, slot):
        slot_ids, slot_valid = slot
        allowed = _allowed(layout, slot_ids, slot_valid, q_offset, n_q)
        k_slot, v_slot = _gather_token_major(kb, slot_ids), _gather_token_major(vb, slot_ids)
        return online_step(state, q, k_slot, v_slot, allowed, layout.scale, _SPARSE), None

    state = initial_state(q.shape[:-1], vb.shape[-1], accumulation_dtype(qb, kb, vb))
    state, _ = jax.lax.scan(step, state, (ids, valid))
    return finish(state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_core(layout: _SparseLayout, qb, kb, vb, ids, valid, q_offset):
    """Token-major blocks qb [B, nq, bs, H, D], kb [B, nk, bs, KVH, D], vb [.., Dv], ids/valid [S, B, KVH, G, nq]
    -> (out [B, KVH, G, nq, bs, Dv], lse [B, KVH, G, nq, bs]) in the accumulation dtype."""
    return _sparse_forward(layout, qb, kb, vb, ids, valid, q_offset)


def _sparse_core_fwd(layout, qb, kb, vb, ids, valid, q_offset):
    out, lse = _sparse_forward(layout, qb, kb, vb, ids, valid, q_offset)
    return (out, lse), (qb, kb, vb, ids, valid, q_offset, out, lse)


def _sparse_core_bwd(layout, residuals, cotangents):
    qb, kb, vb, ids, valid, q_offset, out, lse = residuals
    dout, dlse = cotangents
    safe_lse, delta = backward_inputs(out, lse, dout, dlse)
    dtype = out.dtype
    q = _query_blocks(qb, kb.shape[3])
    n_q = q.shape[3]
    kbm, vbm = kb.transpose(0, 3, 1, 2, 4), vb.transpose(0, 3, 1, 2, 4)  # block-major [B, KVH, nk, bs, D]
    do = dout.astype(q.dtype)

    def step(carry, slot):
        dq, dk, dv = carry
        slot_ids, slot_valid = slot
        allowed = _allowed(layout, slot_ids, slot_valid, q_offset, n_q)
        k_slot, v_slot = _gather_blocks(kbm, slot_ids), _gather_blocks(vbm, slot_ids)
        dq_s, dk_s, dv_s = grad_step(q, k_slot, v_slot, do, safe_lse, delta, allowed, layout.scale, _SPARSE)
        dk = _scatter_add_blocks(dk, slot_ids, dk_s)
        dv = _scatter_add_blocks(dv, slot_ids, dv_s)
        return (dq + dq_s, dk, dv), None

    zeros = (jnp.zeros(q.shape, dtype), jnp.zeros(kbm.shape, dtype), jnp.zeros(vbm.shape, dtype))
    (dq, dk, dv), _ = jax.lax.scan(step, zeros, (ids, valid))
    # back to the token-major block views: dq [B, KVH, G, nq, bs, D] -> [B, nq, bs, H, D], dk/dv -> [B, nk, bs, KVH, D]
    dq = dq.transpose(0, 3, 4, 1, 2, 5).reshape(qb.shape)
    dk, dv = dk.transpose(0, 2, 3, 1, 4), dv.transpose(0, 2, 3, 1, 4)
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, None


_sparse_core.defvjp(_sparse_core_fwd, _sparse_core_bwd)
