"""`hcam`: Hierarchical Chunk Attention Memory, attention to chunk summaries picks the top_k chunks, then attention
inside each picked chunk, the chunk results mixed by the summary attention.

Paper: "Towards mental time travel: a hierarchical memory for reinforcement learning agents" (Lampinen et al.,
NeurIPS 2021; code github.com/google-deepmind/deepmind-research hierarchical_transformer_memory/
hierarchical_attention/htm_attention.py). Here the memory is the sequence's own keys and values in chunks of
block_size tokens. Per (batch row, query head h; kv head g), scale s:

    sum_c    = mean_{j in chunk c} k_j                                     chunk summary (real tokens)
    rel_tc   = s q_t . sum_c            over the chunks c visible to t (c block_size <= q_offset + t when causal)
    kept_r   = the top_k chunks by max_{t in query block r} rel_tc         (query blocks = chunks; ties: lower id)
    w_tc     = softmax_{c in kept_r}(rel_tc)                               the official top-k relevance weights
    o_t      = sum_{c in kept_r} w_tc softmax_{j in c, j visible to t}(s q_t . k_j) v_j

Each chunk's attention is one call of the block-sparse core with that chunk as the only slot (top_k calls, each
O(T block_size D)); the relevance scores are O(T (T / block_size) D).

Reductions: block_size >= the key length (one chunk) makes o = causal `softmax` exactly; top_k >= the number of
chunks keeps every chunk, and o is then the relevance-weighted mixture of per-chunk softmaxes (not `softmax`: HCAM
normalises within chunks, by design).

Deviations (fidelity "official-code"): the official module selects per query token with its own single-head
relevance projections of the queries and of stored chunk keys; here the chunks are picked per query block (its
queries share them; the weights w_tc stay per token) with the layer's own per-head q and chunk-mean keys. The
official adds sinusoidal position encodings to the memory contents inside each chunk; here the layer's positions
(RoPE by default) apply. Attention dropout (when enabled) drops the mixture weights w_tc. No attention-weight
captures or interventions (the layer has no single probability matrix); decoding is not supported.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attn.core.block_pooling import pool_blocks
from attn.core.block_sparse import block_sparse_attention
from attn.core.layer import AttentionCall
from attn.core.validation import check_qkv, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention
from attn.sparse.selector_layer import check_causal_rope_only

Array = jax.Array


def hcam_selection(
    q: Array,
    k: Array,
    *,
    block_size: int,
    top_k: int,
    causal: bool = False,
    q_offset: Any = 0,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """HCAM's chunks and mixture weights (see the module docstring).

    Args:
      q: [B, Tq, H, D]; k: [B, Tk, KVH, D] (H a multiple of KVH).
      block_size: positive int, the chunk (and query block) length. top_k: positive int, chunks kept.
      causal: key j visible to query t only if j <= q_offset + t. scale: default 1/sqrt(D).
    Returns:
      (ids int32 [B, H, ceil(Tq / block_size), min(top_k, nk)] best first, -1 = padding;
       weights float32 [B, Tq, H, min(top_k, nk)], each token's softmax over its block's kept chunks).
    """
    heads, kv_heads = check_qkv(q, k, k)
    positive_int("block_size", block_size)
    positive_int("top_k", top_k)
    q_len, dim, kv_len, bs = q.shape[1], q.shape[3], k.shape[1], int(block_size)
    n_k = -(-kv_len // bs)
    kept = min(int(top_k), n_k)
    scale = dim**-0.5 if scale is None else scale
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 for float64 inputs
    summaries = pool_blocks(k.astype(acc), bs, "mean", axis=1)  # [B, nk, KVH, D]
    summaries = jnp.repeat(summaries, heads // kv_heads, axis=2)
    relevance = scale * jnp.einsum("bthd,bchd->bhtc", q.astype(acc), summaries)  # [B, H, Tq, nk]
    visible = jnp.ones((q_len, n_k), bool)
    if causal:
        visible = jnp.arange(n_k)[None, :] * bs <= jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len)[:, None]
    relevance = jnp.where(visible, relevance, -jnp.inf)
    scores = pool_blocks(relevance, bs, "max", axis=2)  # [B, H, nq, nk]
    values, ids = jax.lax.top_k(scores, kept)
    ids = jnp.where(values > -jnp.inf, ids, -1).astype(jnp.int32)
    per_token = jnp.repeat(ids, bs, axis=2)[:, :, :q_len]  # [B, H, Tq, kept]
    chosen = jnp.take_along_axis(relevance, jnp.maximum(per_token, 0), axis=-1)
    chosen = jnp.where(per_token >= 0, chosen, -jnp.inf)
    safe = jnp.where(jnp.any(chosen > -jnp.inf, axis=-1, keepdims=True), chosen, 0.0)
    weights = jnp.where(chosen > -jnp.inf, jax.nn.softmax(safe, axis=-1), 0.0)
    return ids, weights.transpose(0, 2, 1, 3)


def hcam_attention(
    q: Array,
    k: Array,
    v: Array,
    ids: Array,
    weights: Array,
    *,
    block_size: int,
    causal: bool = False,
    q_offset: Any = 0,
    scale: float | None = None,
    implementation: str | None = None,
) -> Array:
    """o [B, Tq, H, Dv] = sum over the kept chunks (ids [B, H, nq, S]) of weights [B, Tq, H, S] times the softmax
    attention inside that chunk (one block-sparse core call per slot)."""
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 for float64 inputs
    out = jnp.zeros((*q.shape[:-1], v.shape[-1]), acc)
    for slot in range(ids.shape[-1]):
        part = block_sparse_attention(
            q,
            k,
            v,
            block_indices=ids[..., slot : slot + 1],
            block_size=block_size,
            causal=causal,
            q_offset=q_offset,
            scale=scale,
            implementation=implementation,
        )
        out = out + weights[..., slot : slot + 1].astype(acc) * part.astype(acc)
    return out.astype(q.dtype)


@register(
    "hcam",
    family="sparse",
    paper="Towards mental time travel: a hierarchical memory for reinforcement learning agents",
    catalog=67,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="hierarchical chunk attention: attention to chunk-mean keys picks the top_k chunks, attention inside "
    "each, mixed by the top-k relevance softmax",
    fidelity="official-code",
    reference="arXiv 2105.14039 (Sec. 3: HCAM) and github.com/google-deepmind/deepmind-research "
    "hierarchical_transformer_memory/hierarchical_attention/htm_attention.py (top-k of the summary logits, softmax "
    "over the k, per-chunk attention weighted and summed); chunks per query block here, per token there",
    option_docs={
        "block_size": "tokens per chunk (and per query block: its queries share their chunks)",
        "top_k": "chunks attended in detail per query block",
    },
    validators={"block_size": positive_int, "top_k": positive_int},
)
class HCAMAttention(MultiHeadAttention):
    """HCAM: a relevance-weighted mixture of the softmax attentions inside each query block's top_k chunks.
    x [B, T, E] -> [B, T, E]."""

    block_size: int = 64
    top_k: int = 4

    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        name = self.registry_name or type(self).__name__
        if call.decode:
            raise ValueError(f"decode=True is not supported by {name}: it picks chunks in a forward pass")
        check_causal_rope_only(self, call, name)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, Tq, H, D], k/v [B, Tk, KVH, D] -> [B, Tq, H, Dv]."""
        causal = call.mask is not None and call.mask.causal
        ids, weights = hcam_selection(
            q, k, block_size=self.block_size, top_k=self.top_k, causal=causal, q_offset=call.q_offset, scale=self.scale
        )
        weights = self.attention_dropout(weights, call.deterministic)
        return hcam_attention(
            q, k, v, ids, weights, block_size=self.block_size, causal=causal, q_offset=call.q_offset, scale=self.scale
        )
