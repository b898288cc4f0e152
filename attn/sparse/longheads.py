"""`longheads`: LongHeads, every head attends to the few chunks its queries pick (the first chunk, the local ones and
the best-matching rest), so each head reads an in-distribution amount of context; then exact block-sparse softmax.

Paper: "LongHeads: Multi-Head Attention is Secretly a Long Context Processor" (Lu et al., 2024, arXiv 2402.10685;
code github.com/LuLuLuyi/LongHeads, modeling_longheads/modeling_llama.py). Training-free: no parameters beyond the
softmax layer's. Self-attention only (the chunk representations read the queries of the keys' own tokens).

Chunks are blocks of chunk_size tokens (the last one partial). Per (batch row, query head h; kv head g of h), with
the layer's q, k, v and s = 1/sqrt(D):

    o^loc_t   = softmax_{j in chunk(t), j <= t}(s q_t . k_j) v_j        causal attention inside each chunk
    cv_c      = mean_{t in chunk c} o^loc_t                              the chunk's value representation
    ck_c      = sum_{j in chunk c} softmax_j(s cv_c . k_j) k_j           the chunk's key representation
    score_rc  = max_{t in query block r} q_t . ck_c                      (query blocks = chunks)
    keep      the num_chunks best chunks of row r among the visible ones (c <= r when causal), where chunk 0, the
              own chunk r and the previous chunk r - 1 always rank first (ties: the lower chunk id)

`block_sparse_attention` then computes o = softmax over the kept chunks (token-level causal in the own chunk).

Reductions: num_chunks >= the number of chunks keeps every visible chunk, so the layer equals `softmax` exactly
(tests/sparse/test_longheads.py); a context of at most num_chunks chunks is full attention, as in the official code
(where full attention runs up to `atten_length` = num_chunks * chunk_size tokens).

Deviations (fidelity "official-code"): the official selection is per query token; here it is per query block (the
block's queries share their chunks, scored by the largest q_t . ck_c over the block), which is what makes it a
block-sparse pattern. The official code builds the chunk representations from keys rotated at chunk-local positions,
scores unrotated queries, and re-assigns positions inside the selected context (so a head never sees a relative
distance beyond atten_length); here q and k are the layer's own (rotated at their true positions when
position="rope"), identical to the official scores when position != "rope", and no positions are re-assigned (the
method's length-extrapolation part needs RoPE applied after selection and is not reproduced).

Causality: a query block's chunks are chosen from all its queries, so a query's kept chunks can depend on later
queries of its own block; the chunk representations of the chunks it sees are causal within their chunks but read the
whole chunk (a prefill method). Decoding is not supported (see `selector_layer`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn.core.block_pooling import pool_blocks, real_token_mask, split_blocks
from attn.core.block_sparse import block_sparse_attention
from attn.core.validation import check_qkv, int_at_least, positive_int
from attn.registry import register
from attn.sparse.selector_layer import BlockSelectorLayer

Array = jax.Array

_NUM_CHUNKS = int_at_least(3)  # the first, the previous and the own chunk are always kept


def longheads_chunk_keys(q: Array, k: Array, v: Array, *, chunk_size: int) -> Array:
    """The chunk key representations ck, float32 [B, H, ceil(T / chunk_size), D], from q [B, T, H, D] and
    k, v [B, T, KVH, D] of one sequence (see the module docstring; one per query head)."""
    heads, kv_heads = check_qkv(q, k, v)
    positive_int("chunk_size", chunk_size)
    if k.shape[1] != q.shape[1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"longheads chunk representations need self-attention shapes: q {q.shape}, k {k.shape} and v {v.shape} "
            "must have the same length and head_dim"
        )
    length, dim = q.shape[1], q.shape[3]
    w = int(chunk_size)
    n = -(-length // w)
    own = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (1, 1, n, 1))
    local = block_sparse_attention(q, k, v, block_indices=own, block_size=w, causal=True)
    local = local.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, H, T, D]
    values = pool_blocks(local, w, "mean", axis=2)  # cv [B, H, n, D]
    keys = jnp.repeat(k.astype(jnp.float32), heads // kv_heads, axis=2).transpose(0, 2, 1, 3)
    key_blocks, _ = split_blocks(keys, w, axis=2)  # [B, H, n, w, D]
    real = real_token_mask(length, w)  # [n, w]
    logits = jnp.where(real, jnp.einsum("bhcd,bhcjd->bhcj", values, key_blocks) * dim**-0.5, -jnp.inf)
    return jnp.einsum("bhcj,bhcjd->bhcd", jax.nn.softmax(logits, axis=-1), key_blocks)


def longheads_block_indices(
    q: Array, k: Array, v: Array, *, chunk_size: int, num_chunks: int, causal: bool = True
) -> Array:
    """LongHeads' chunks per query block: int32 [B, H, ceil(T / chunk_size), min(num_chunks, n)], ascending by rank
    (forced chunks first), -1 padded where a block sees fewer chunks. q [B, T, H, D], k, v [B, T, KVH, D]."""
    _NUM_CHUNKS("num_chunks", num_chunks)
    chunk_keys = longheads_chunk_keys(q, k, v, chunk_size=chunk_size)
    w = int(chunk_size)
    n = chunk_keys.shape[2]
    queries = q.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, H, T, D]
    token_scores = jnp.einsum("bhtd,bhcd->bhtc", queries, chunk_keys)
    scores = pool_blocks(token_scores, w, "max", axis=2)  # [B, H, nq, n]
    rows, cols = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    visible = cols <= rows if causal else jnp.ones((n, n), bool)
    forced = (cols == 0) | (cols == rows) | (cols == rows - 1)
    ranking = jnp.where(visible, jnp.where(forced, jnp.inf, scores), -jnp.inf)
    kept = min(int(num_chunks), n)
    values, ids = jax.lax.top_k(ranking, kept)
    return jnp.where(values > -jnp.inf, ids, -1).astype(jnp.int32)


@register(
    "longheads",
    family="sparse",
    paper="LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
    catalog=140,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="training-free per-head chunk selection: chunk key representations from in-chunk attention, each query "
    "block keeps the first, previous and own chunk plus the best-scoring rest (num_chunks), exact block-sparse softmax",
    fidelity="official-code",
    reference="arXiv 2402.10685 (Sec. 3: chunk representation, chunk selection with the first and local chunks "
    "kept) and github.com/LuLuLuyi/LongHeads modeling_longheads/modeling_llama.py (in-chunk attention, value mean as "
    "the query of an attention over the chunk's keys, top atten_length / window_size chunks with chunk 0 and the "
    "two local chunks forced); selection per query block instead of per token, no position re-assignment",
    option_docs={
        "block_size": "tokens per chunk (official window_size 256); also the query block length",
        "num_chunks": "chunks each query block attends to, >= 3 (official atten_length / window_size = 16)",
    },
    validators={"block_size": positive_int, "num_chunks": _NUM_CHUNKS},
    has_attention_weights=True,
)
class LongHeadsAttention(BlockSelectorLayer):
    """LongHeads: each head's softmax over the chunks its query block picks. x [B, T, E] -> [B, T, E] (self-attention;
    block_size is the chunk length)."""

    block_size: int = 256
    num_chunks: int = 16

    def select_with_values(self, q: Array, k: Array, v: Array, *, causal: bool, q_offset: Any) -> Array:
        del q_offset  # self-attention in a forward pass: the queries start at the keys' first position
        return longheads_block_indices(q, k, v, chunk_size=self.block_size, num_chunks=self.num_chunks, causal=causal)
