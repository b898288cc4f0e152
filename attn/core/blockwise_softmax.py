"""Blockwise (online-softmax) exact attention on XLA, with O(T) memory: the dense memory-efficient path of
`softmax_attention` (implementation="xla_blockwise") and the shared steps of `attn.core.block_sparse`.

Forward, one key block K_j, V_j at a time (a lax.scan), for a block of queries Q:

    s   = scale * Q K_j^T,  -inf where the mask forbids
    m'  = max(m, rowmax s);  p = exp(s - m');  l = l exp(m - m') + rowsum p;  acc = acc exp(m - m') + p V_j
    out = acc / l,  lse = m + log l                  (a row with no visible key: out 0, lse -inf, never NaN)

Backward (`jax.custom_vjp`) recomputes the weights block by block from the saved lse, p = exp(s - lse): residuals
are q, k, v, out and lse (O(T)), never the [Tq, Tk] matrix. With delta = rowsum(dout * out) - dlse,

    dV_j = p^T dout,   ds = p (dout V_j^T - delta),   dQ += scale ds K_j,   dK_j = scale ds^T Q.

Dense path layout: queries in chunks of `query_chunk` rows (a lax.scan), each scanning its key blocks of
`key_block` keys, so the live score tile is [B, H, query_chunk, key_block] whatever the length. When the mask
bounds the visible keys (causal, sliding window; `Mask.block_bounds`) and the query offset is a concrete int,
the query chunks are split into up to `MAX_QUERY_GROUPS` groups, each scanning only the key blocks its queries can
see, so causal attention computes about (1 + 1/groups) / 2 of the blocks instead of all of them.
Time O(B H Tq Tk D) (less under causal/window masks), memory O(B H (Tq + Tk) D).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core.block_pooling import split_blocks
from attn.core.masks import Mask
from attn.core.pipeline import _dot_operands, accumulation_dtype

Array = jax.Array

IMPLEMENTATION = "xla_blockwise"
# implementation=None switches softmax_attention to this path when its dense score matrix (float32
# [B, H, Tq, Tk], the largest of the several the reference keeps alive) would exceed this many bytes.
AUTO_THRESHOLD_BYTES = 256 * 2**20
QUERY_CHUNK = 1024
KEY_BLOCK = 256
MAX_QUERY_GROUPS = 8


# ---------------------------------------------------------------------------------------------- shared steps
@dataclasses.dataclass(frozen=True)
class Contractions:
    """The three einsums of a blockwise step, for one layout of query and key blocks.

    logits: (q, k_block) -> s; mix: (p, v_block) -> out contribution (also (ds, k_block) -> dq);
    key_grad: (p, dout) -> dv_block (also (ds, q) -> dk_block)."""

    logits: str
    mix: str
    key_grad: str


def online_step(
    state: tuple[Array, Array, Array],
    q: Array,
    k_block: Array,
    v_block: Array,
    allowed: Array,
    scale: float,
    contractions: Contractions,
) -> tuple[Array, Array, Array]:
    """One online-softmax update. state = (m [..., Tq] running max, l [..., Tq] running sum, acc [..., Tq, Dv]);
    allowed: bool, broadcastable to the logits [..., Tq, Tk_block]."""
    m, denom, acc = state
    dtype = acc.dtype
    qq, kk = _dot_operands(q, k_block)
    s = jnp.einsum(contractions.logits, qq, kk, preferred_element_type=dtype) * scale
    s = jnp.where(allowed, s, -jnp.inf)
    m_next = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_next), m_next, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    denom = denom * alpha + jnp.sum(p, axis=-1)
    pp, vv = _dot_operands(p.astype(v_block.dtype), v_block)
    acc = acc * alpha[..., None] + jnp.einsum(contractions.mix, pp, vv, preferred_element_type=dtype)
    return m_next, denom, acc


def initial_state(rows: tuple[int, ...], value_dim: int, dtype: Any) -> tuple[Array, Array, Array]:
    """(m = -inf, l = 0, acc = 0) for query rows of shape `rows`."""
    return (
        jnp.full(rows, -jnp.inf, dtype),
        jnp.zeros(rows, dtype),
        jnp.zeros((*rows, value_dim), dtype),
    )


def finish(state: tuple[Array, Array, Array]) -> tuple[Array, Array]:
    """(out [..., Tq, Dv], lse [..., Tq]) from the final state; empty rows give out 0 and lse -inf."""
    m, denom, acc = state
    empty = denom == 0.0
    safe_l = jnp.where(empty, 1.0, denom)
    out = jnp.where(empty[..., None], 0.0, acc / safe_l[..., None])
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))
    return out, lse


def grad_step(
    q: Array,
    k_block: Array,
    v_block: Array,
    dout: Array,
    lse: Array,
    delta: Array,
    allowed: Array,
    scale: float,
    contractions: Contractions,
) -> tuple[Array, Array, Array]:
    """(dq contribution, dk_block, dv_block) of one key block, recomputing p = exp(s - lse).

    lse [..., Tq] with -inf rows replaced by 0 (they have no allowed key); delta = rowsum(dout * out) - dlse."""
    dtype = delta.dtype
    qq, kk = _dot_operands(q, k_block)
    s = jnp.einsum(contractions.logits, qq, kk, preferred_element_type=dtype) * scale
    p = jnp.where(allowed, jnp.exp(s - lse[..., None]), 0.0)
    pp, dd = _dot_operands(p.astype(dout.dtype), dout)
    dv = jnp.einsum(contractions.key_grad, pp, dd, preferred_element_type=dtype)
    dd, vv = _dot_operands(dout, v_block)
    dp = jnp.einsum(contractions.logits, dd, vv, preferred_element_type=dtype)
    ds = p * (dp - delta[..., None])
    ss, kk = _dot_operands(ds.astype(k_block.dtype), k_block)
    dq = jnp.einsum(contractions.mix, ss, kk, preferred_element_type=dtype) * scale
    ss, qq = _dot_operands(ds.astype(q.dtype), q)
    dk = jnp.einsum(contractions.key_grad, ss, qq, preferred_element_type=dtype) * scale
    return dq, dk, dv


def backward_inputs(out: Array, lse: Array, dout: Array, dlse: Array | None) -> tuple[Array, Array]:
    """(lse with -inf rows set to 0, delta = rowsum(dout * out) - dlse), both [..., Tq]."""
    delta = jnp.sum(dout.astype(out.dtype) * out, axis=-1)
    if dlse is not None:
        delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
    return jnp.where(jnp.isfinite(lse), lse, 0.0), delta


def grouped_heads(allowed: Array, kv_heads: int) -> Array:
    """A mask tile bool [B|1, H|1, Tq, Tk] -> [B|1, KVH|1, G|1, Tq, Tk] (query heads grouped over kv heads)."""
    b, h, tq, tk = allowed.shape
    if h == 1:
        return allowed[:, :, None]
    return allowed.reshape(b, kv_heads, h // kv_heads, tq, tk)


# ---------------------------------------------------------------------------------------------- dense path
def blockwise_unavailable(
    mask: Mask | None,
    *,
    bias: Any,
    softcap: Any,
    sinks: Any,
    dropout_rate: float,
    return_probs: bool,
) -> str | None:
    """Why the blockwise path cannot compute this softmax_attention call, or None when it can."""
    unsupported = [
        name
        for name, value in (("bias", bias), ("softcap", softcap), ("sinks", sinks), ("dropout", dropout_rate or None))
        if value is not None
    ]
    if unsupported:
        return f"{', '.join(unsupported)} not supported by the blockwise path"
    if return_probs:
        return "return_probs needs the full probability matrix, which the blockwise path never builds"
    if mask is not None and mask.dense is not None:
        return "a dense boolean mask is already [Tq, Tk]; the blockwise path takes structured masks only"
    return None


def scores_bytes(q: Array, k: Array) -> int:
    """Bytes of one float32 dense score matrix [B, H, Tq, Tk] for q [B, Tq, H, D], k [B, Tk, KVH, D]."""
    batch, q_len, heads, _ = q.shape
    return 4 * batch * heads * q_len * k.shape[1]


def small_scores_reason(q: Array, k: Array) -> str | None:
    """Why implementation=None keeps the dense path (the score matrix is small), or None when it is large."""
    # a fixed text: dispatch logs each distinct reason once, so it must not grow with the shapes seen
    if scores_bytes(q, k) <= AUTO_THRESHOLD_BYTES:
        return f"the dense score matrix is within {AUTO_THRESHOLD_BYTES // 2**20} MiB"
    return None


@dataclasses.dataclass(frozen=True)
class _DenseLayout:
    """Static layout of the dense blockwise path (hashable: a nondiff argument of the custom VJP)."""

    q_len: int
    kv_len: int
    kv_heads: int
    query_chunk: int
    key_block: int
    scale: float
    groups: tuple[tuple[int, int, int, int], ...]  # (first chunk, end chunk, first key block, end key block)


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    q_offset: Any = 0,
    return_lse: bool = False,
    query_chunk: int = QUERY_CHUNK,
    key_block: int = KEY_BLOCK,
) -> Array | tuple[Array, dict[str, Array]]:
    """Exact softmax attention with O(T) memory (online softmax over key blocks, recomputing backward).

    Args:
      q: [B, Tq, H, D]; k: [B, Tk, KVH, D]; v: [B, Tk, KVH, Dv], H a multiple of KVH.
      mask: a structured `Mask` without a `dense` part (see `blockwise_unavailable`), with queries at absolute
        positions q_offset + i.
      scale: logit scale, default 1/sqrt(D).
      return_lse: also return {"lse": float32 [B, H, Tq]} (-inf for rows with no visible key).
      query_chunk, key_block: tile sizes (rows per query chunk, keys per scan step); the result does not depend
        on them beyond float rounding.
    Returns:
      out [B, Tq, H, Dv] in q.dtype, or (out, {"lse": lse}).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)  # numpy inputs cannot be indexed by the scans' tracers
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    scale = float(head_dim**-0.5 if scale is None else scale)
    chunk = min(query_chunk, q_len)
    block = min(key_block, kv_len)
    n_chunks, n_blocks = -(-q_len // chunk), -(-kv_len // block)
    q_pad, kv_pad = n_chunks * chunk - q_len, n_blocks * block - kv_len

    qc = split_blocks(q, chunk, axis=1)[0]
    qc = qc.reshape(batch, n_chunks, chunk, kv_heads, group, head_dim).transpose(1, 0, 3, 4, 2, 5)
    kb = split_blocks(k, block, axis=1)[0].transpose(1, 0, 3, 2, 4)  # [nk, B, KVH, block, D]
    vb = split_blocks(v, block, axis=1)[0].transpose(1, 0, 3, 2, 4)  # [nk, B, KVH, block, Dv]
    if mask is not None:
        mask = _padded_mask(mask, q_pad, kv_pad)
    groups = _query_groups(mask, q_offset, n_chunks, chunk, block, n_blocks)
    layout = _DenseLayout(q_len, kv_len, kv_heads, chunk, block, scale, groups)
    out, lse = _dense_core(layout, qc, kb, vb, mask, jnp.asarray(q_offset, jnp.int32))
    # out [n_chunks, B, KVH, G, chunk, Dv] -> [B, Tq, H, Dv]; lse [n_chunks, B, KVH, G, chunk] -> [B, H, Tq]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, n_chunks * chunk, heads, value_dim)[:, :q_len]
    out = out.astype(q.dtype)
    if not return_lse:
        return out
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(batch, heads, n_chunks * chunk)[:, :, :q_len]
    return out, {"lse": lse.astype(jnp.float32)}


def _padded_mask(mask: Mask, q_pad: int, kv_pad: int) -> Mask:
    """The mask with its per-token arrays padded to the padded lengths (tiles of the padding stay aligned)."""
    if mask.q_segment_ids is None:
        return mask
    return mask.replace(
        q_segment_ids=jnp.pad(jnp.asarray(mask.q_segment_ids), ((0, 0), (0, q_pad))),
        kv_segment_ids=jnp.pad(jnp.asarray(mask.kv_segment_ids), ((0, 0), (0, kv_pad))),
    )


def _query_groups(
    mask: Mask | None, q_offset: Any, n_chunks: int, chunk: int, block: int, n_blocks: int
) -> tuple[tuple[int, int, int, int], ...]:
    """Contiguous groups of query chunks with the static range of key blocks their queries may see."""
    if mask is None or not isinstance(q_offset, (int, np.integer)) or isinstance(q_offset, bool):
        return ((0, n_chunks, 0, n_blocks),)
    if mask.block_bounds(0, n_chunks * chunk, q_offset=int(q_offset)) == (0, 2**31 - 1):
        return ((0, n_chunks, 0, n_blocks),)
    per_group = -(-n_chunks // min(MAX_QUERY_GROUPS, n_chunks))
    groups = []
    for first in range(0, n_chunks, per_group):
        end = min(first + per_group, n_chunks)
        lo, hi = mask.block_bounds(first * chunk, (end - first) * chunk, q_offset=int(q_offset))
        lo_block = min(max(lo, 0) // block, n_blocks)
        hi_block = max(min(-(-hi // block), n_blocks), lo_block)
        groups.append((first, end, lo_block, hi_block))
    return tuple(groups)


_DENSE = Contractions(logits="bhgqd,bhkd->bhgqk", mix="bhgqk,bhkd->bhgqd", key_grad="bhgqk,bhgqd->bhkd")


def _allowed(layout: _DenseLayout, mask: Mask | None, q_offset: Array, chunk_index: Array, block_index: Array):
    """bool [B|1, KVH|1, G|1, chunk, block] for one (query chunk, key block) tile, padded keys excluded."""
    kv_start = block_index * layout.key_block
    keys = kv_start + jnp.arange(layout.key_block, dtype=jnp.int32) < layout.kv_len
    allowed = keys[None, None, None, None, :]
    if mask is None:
        return allowed
    tile = mask.tile(
        chunk_index * layout.query_chunk, layout.query_chunk, kv_start, layout.key_block, q_offset=q_offset
    )
    return allowed & grouped_heads(tile, layout.kv_heads)


def _chunk_forward(layout, q_chunk, kb, vb, mask, q_offset, chunk_index, first_block, end_block):
    rows = q_chunk.shape[:-1]

    def step(state, j):
        allowed = _allowed(layout, mask, q_offset, chunk_index, j)
        return online_step(state, q_chunk, kb[j], vb[j], allowed, layout.scale, _DENSE), None

    state = initial_state(rows, vb.shape[-1], accumulation_dtype(q_chunk, kb, vb))
    state, _ = jax.lax.scan(step, state, jnp.arange(first_block, end_block))
    return finish(state)


def _dense_forward(layout, qc, kb, vb, mask, q_offset):
    outs, lses = [], []
    for first, end, first_block, end_block in layout.groups:

        def body(_, c, first_block=first_block, end_block=end_block):
            return None, _chunk_forward(layout, qc[c], kb, vb, mask, q_offset, c, first_block, end_block)

        _, (out, lse) = jax.lax.scan(body, None, jnp.arange(first, end))
        outs.append(out)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
    lse = lses[0] if len(lses) == 1 else jnp.concatenate(lses)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_core(layout: _DenseLayout, qc, kb, vb, mask, q_offset):
    """qc [n_chunks, B, KVH, G, chunk, D], kb [n_blocks, B, KVH, block, D], vb [.., Dv] ->
    (out [n_chunks, B, KVH, G, chunk, Dv], lse [n_chunks, B, KVH, G, chunk]) in the accumulation dtype."""
    return _dense_forward(layout, qc, kb, vb, mask, q_offset)


def _dense_core_fwd(layout, qc, kb, vb, mask, q_offset):
    out, lse = _dense_forward(layout, qc, kb, vb, mask, q_offset)
    return (out, lse), (qc, kb, vb, mask, q_offset, out, lse)


def _dense_core_bwd(layout, residuals, cotangents):
    qc, kb, vb, mask, q_offset, out, lse = residuals
    dout, dlse = cotangents
    safe_lse, delta = backward_inputs(out, lse, dout, dlse)
    dtype = out.dtype
    dq_chunks, dk, dv = [], jnp.zeros(kb.shape, dtype), jnp.zeros(vb.shape, dtype)
    for first, end, first_block, end_block in layout.groups:
        blocks = jnp.arange(first_block, end_block)

        def per_chunk(carry, c, blocks=blocks):
            dk_acc, dv_acc = carry
            q_chunk, do_chunk = qc[c], dout[c].astype(qc.dtype)

            def step(dq, j):
                allowed = _allowed(layout, mask, q_offset, c, j)
                dq_j, dk_j, dv_j = grad_step(
                    q_chunk, kb[j], vb[j], do_chunk, safe_lse[c], delta[c], allowed, layout.scale, _DENSE
                )
                return dq + dq_j, (dk_j, dv_j)

            dq, (dk_blocks, dv_blocks) = jax.lax.scan(step, jnp.zeros(q_chunk.shape, dtype), blocks)
            return (dk_acc + dk_blocks, dv_acc + dv_blocks), dq

        zeros_k = jnp.zeros((end_block - first_block, *kb.shape[1:]), dtype)
        zeros_v = jnp.zeros((end_block - first_block, *vb.shape[1:]), dtype)
        (dk_group, dv_group), dq = jax.lax.scan(per_chunk, (zeros_k, zeros_v), jnp.arange(first, end))
        dk = dk.at[first_block:end_block].add(dk_group)
        dv = dv.at[first_block:end_block].add(dv_group)
        dq_chunks.append(dq)
    dq = dq_chunks[0] if len(dq_chunks) == 1 else jnp.concatenate(dq_chunks)
    return dq.astype(qc.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None


_dense_core.defvjp(_dense_core_fwd, _dense_core_bwd)
