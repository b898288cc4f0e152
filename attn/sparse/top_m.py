"""`top_m`: top-m attention, every query attends to the m keys it scores highest (softmax over those m only); with
block_size > 1, every query block to the m key blocks holding its highest scores. Exact block-sparse softmax.

Paper: "TANGNN: a Concise, Scalable and Effective Graph Neural Networks with Top-m Attention Mechanism for Graph
Representation Learning" (E, Zhang, Xia, Xu, 2024, arXiv 2411.15458): each vertex aggregates, by attention, the m most
relevant vertices of the graph (beside its neighbourhood aggregation). Here the vertices are the sequence's tokens and
relevance is the attention logit. Training-free selection: no parameters beyond the softmax layer's.

Per (batch row, query head h), scale s, blocks of block_size tokens (the last partial; block_size = 1: tokens):

    score_rc = max_{t in query block r, j in key block c, j visible to t} s q_t . k_j
    keep     the m key blocks with the largest score_rc (ties: the lower block id; fewer when fewer are visible)
    o_t      = softmax_{j in the kept blocks of t's block, j visible to t}(s q_t . k_j) v_j

(visible: j <= q_offset + t when causal; every key otherwise.) block_size = 1 is the paper's top-m: softmax over the
m largest logits of each query, which depends on the query and on its visible keys only (strictly causal).
Reduction: m >= the number of key blocks keeps every visible block, so the layer equals `softmax` exactly
(tests/sparse/test_top_m.py). Cost: the scores are the dense logits, O(Tq Tk D) time and O(Tq Tk) memory per head
(the selection is exact, not approximate); the attention is O(Tq m block_size D).

Fidelity (spec "reconstructed"): the paper's full text was not available here (only its abstract and summaries); its
efficient candidate search (cosine similarity to an auxiliary vector, as summaries describe it) is not reproduced:
the selection is the exact top-m by attention logit that the mechanism approximates. No neighbourhood aggregation
(a graph component outside the attention layer).

GQA: every query head selects against its kv head's keys. The selection is discrete (no gradient through it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn.core.block_pooling import pool_blocks
from attn.core.validation import check_qkv, positive_int
from attn.registry import register
from attn.sparse.selector_layer import BlockSelectorLayer

Array = jax.Array


def top_m_block_indices(
    q: Array,
    k: Array,
    *,
    m: int,
    block_size: int = 1,
    causal: bool = False,
    q_offset: Any = 0,
    scale: float | None = None,
) -> Array:
    """The m key blocks with the highest visible logit per query block (see the module docstring).

    Args:
      q: [B, Tq, H, D]; k: [B, Tk, KVH, D] (H a multiple of KVH).
      m: positive int, key blocks kept per query block (keys per query when block_size = 1).
      block_size: positive int, the query and key block length.
      causal: key j visible to query t only if j <= q_offset + t. q_offset: int (or traced int scalar).
      scale: logit scale, default 1/sqrt(D) (the ranking only depends on its sign).
    Returns:
      int32 [B, H, ceil(Tq / block_size), min(m, ceil(Tk / block_size))], ranked best first, -1 = padding.
    """
    heads, kv_heads = check_qkv(q, k, k)
    positive_int("m", m)
    positive_int("block_size", block_size)
    q_len, dim, kv_len, bs = q.shape[1], q.shape[3], k.shape[1], int(block_size)
    scale = dim**-0.5 if scale is None else scale
    dtype = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), jnp.float32)
    keys = jnp.repeat(k.astype(dtype), heads // kv_heads, axis=2)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", q.astype(dtype), keys)  # [B, H, Tq, Tk]
    visible = jnp.ones((q_len, kv_len), bool)
    if causal:
        visible = jnp.arange(kv_len)[None, :] <= jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len)[:, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    scores = pool_blocks(logits, bs, "max", axis=(2, 3))  # [B, H, nq, nk]
    values, ids = jax.lax.top_k(scores, min(int(m), scores.shape[-1]))
    return jnp.where(values > -jnp.inf, ids, -1).astype(jnp.int32)


@register(
    "top_m",
    family="sparse",
    paper="TANGNN: a Concise, Scalable and Effective Graph Neural Networks with Top-m Attention Mechanism for Graph "
    "Representation Learning",
    catalog=107,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="top-m attention: each query (or query block) attends to the m keys (key blocks) with its largest "
    "logits, exact block-sparse softmax over them",
    fidelity="reconstructed",
    reference="arXiv 2411.15458 (abstract and secondary summaries only: each vertex aggregates its m most relevant "
    "vertices by attention); the exact top-m by attention logit, not the paper's auxiliary-vector candidate search",
    option_docs={
        "m": "keys (key blocks when block_size > 1) kept per query (query block)",
        "block_size": "selection granularity: 1 = per query and key (the paper's top-m), else blocks of this length",
    },
    validators={"m": positive_int, "block_size": positive_int},
    has_attention_weights=True,
)
class TopMAttention(BlockSelectorLayer):
    """Top-m attention: softmax over each query's m highest-scoring keys (blocks). x [B, T, E] -> [B, T, E]."""

    m: int = 32
    block_size: int = 1

    def select(self, q: Array, k: Array, *, causal: bool, q_offset: Any) -> Array:
        return top_m_block_indices(
            q, k, m=self.m, block_size=self.block_size, causal=causal, q_offset=q_offset, scale=self.scale
        )
