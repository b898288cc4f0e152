"""`spatial_sparse`: Spatial Sparse Attention (SSA) of "Direct3D-S2: Gigascale 3D Generation Made Easy with Spatial
Sparse Attention" (Wu et al., catalog [132]; code DreamTechAI/Direct3D-S2), on a dense 1-D, 2-D or 3-D token grid.

SSA adapts Native Sparse Attention to volumes: the grid is cut into spatial blocks and three branches are mixed by
per-token gates. With q, k, v [B, *S, H|KVH, D], compression blocks of c tokens per axis, selection blocks of
s tokens per axis (s a multiple of c) and windows of w tokens per axis:

  compression  k~_b = pool_{t in block b}(k_t + pe[t mod c]),  v~_b = pool_{t in block b} v_t   (c^r-token blocks)
               o_cmp = softmax(q k~^T / sqrt(D)) v~                  (every query sees every compressed block)
  selection    p_cmp[h, i, b] = the compression branch's attention probabilities
               score[g, i, s] = sum_{h in kv group g} sum_{b in selection block s} p_cmp[h, i, b]
               I[g, i] = the topk selection blocks with the highest score (no gradient through the choice)
               o_slc = softmax over the tokens of the blocks I[g(h), i] of q k^T / sqrt(D), times v
  window       o_win = attention within non-overlapping (optionally shifted) windows of w tokens per axis
  output       o = g_cmp o_cmp + g_slc o_slc + g_win o_win,   (g_cmp, g_slc, g_win) = sigmoid(x W_g)   [B, *S, 3]
               y = concat_h(o) W_o

As in the paper's code: the key blocks get a learned intra-block position embedding pe [c^r, KVH, D]
(zero-initialised) before pooling, the block scores are the compressed probabilities summed over the query heads
of a kv group and over the compressed blocks of each selection block, top-k is taken per query token and kv group,
and the three gates are one sigmoid linear map of the token (shared by the heads). Pooling: "mean" (the paper's
compression block mean-pools; its v2 block adds a GroupNorm/SiLU/conv stack, not reproduced) or "learned" (a
learned weighted sum over the block's positions, initialised to the mean). The window branch is
`attn.core.windows.window_attention` (Swin-style shift, partial windows at the border), as the paper's sparse-voxel
windows do.

This dense-grid version requires every extent to be a multiple of the selection block (blocks and windows larger
than an extent are clipped to it). Shapes: x [B, *S, E] ->
same, N = prod(S) tokens. Time O(N (N / c^r + topk s^r + w^r) H D); memory O(N (N / c^r) H + N topk s^r KVH D):
the selection branch gathers each query's selected blocks (no N x N array). With topk = number of selection
blocks the selection branch is exactly full softmax attention; with window_size >= every extent and shift 0 the
window branch is exactly full softmax attention. No causal masking, no decoding.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core.layer import AttentionCall, SpatialAttentionLayer
from attn.core.neighborhood import IntPerAxis, per_axis
from attn.core.pipeline import dropout_weights
from attn.core.validation import (
    check_qkv,
    check_rank,
    choice,
    int_or_pair,
    non_negative_int,
    optional,
    positive,
    positive_int,
    shape_of,
)
from attn.core.windows import partition_windows, window_attention, window_plan
from attn.registry import register

Array = jax.Array

POOLINGS = ("mean", "learned")


# ---------------------------------------------------------------------------------------------- blocks
def sparse_block_plan(
    spatial: tuple[int, ...], compression_block: IntPerAxis, selection_block: IntPerAxis
) -> tuple[tuple[int, ...], tuple[int, ...], np.ndarray]:
    """Validated (compression block, selection block) per axis (each clipped to the extent) and int32 [C]: the
    selection block (row-major over the selection-block grid) of each compression block (row-major over the
    compression-block grid)."""
    rank = len(spatial)
    # a block larger than an extent covers that axis (as windows do), so default blocks fit small grids
    comp = tuple(
        min(c, n) for c, n in zip(per_axis("compression_block", compression_block, rank, int), spatial, strict=True)
    )
    sel = tuple(
        min(s, n) for s, n in zip(per_axis("selection_block", selection_block, rank, int), spatial, strict=True)
    )
    for axis, (n, c, s) in enumerate(zip(spatial, comp, sel, strict=True)):
        if c < 1 or s < 1:
            raise ValueError(f"compression_block={comp} and selection_block={sel} must be >= 1 on every axis")
        if s % c:
            raise ValueError(
                f"selection_block={sel} must be a multiple of compression_block={comp} on every axis (axis {axis} "
                f"has {s} and {c})"
            )
        if n % s:
            raise ValueError(
                f"spatial shape {spatial} must be a multiple of selection_block={sel} on every axis (axis {axis}: "
                f"{n} % {s} != 0); this dense-grid version does not pad"
            )
    comp_grid = [n // c for n, c in zip(spatial, comp, strict=True)]
    sel_grid = [n // s for n, s in zip(spatial, sel, strict=True)]
    coords = np.stack(np.meshgrid(*[np.arange(g) for g in comp_grid], indexing="ij"), -1).reshape(-1, rank)
    owner = coords // (np.asarray(sel) // np.asarray(comp))
    return comp, sel, np.ravel_multi_index(tuple(owner.T), sel_grid).astype(np.int32)


# ---------------------------------------------------------------------------------------------- functional op
def spatial_sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    compression_block: IntPerAxis,
    selection_block: IntPerAxis,
    topk: int,
    window_size: IntPerAxis,
    shift: IntPerAxis = 0,
    key_pe: Array | None = None,
    pool_weights: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> tuple[Array, Array, Array, dict[str, Array]]:
    """The three SSA branches (see the module docstring), before gating.

    Args:
      q: [B, *S, H, D] with 1 to 3 spatial axes; k, v: [B, *S, KVH, D] (H a multiple of KVH).
      compression_block, selection_block: block size per axis (int or tuple, clipped to the extent); selection a
        multiple of compression, every extent a multiple of selection.
      topk: selection blocks per query and kv head (clipped to the number of blocks).
      window_size, shift: the window branch's windows.
      key_pe: float [c^r, KVH, D], added to the keys of every compression block before pooling.
      pool_weights: float [c^r], weights of the learned pooling (None = mean).
      scale: logit scale, default 1/sqrt(D).
      dropout_rate, dropout_rng: dropout on the attention weights of the three branches (the block scores of the
        selection use the compressed weights before dropout).
    Returns:
      (o_cmp, o_slc, o_win, aux), each output [B, *S, H, D] in q.dtype; aux = {"selected": int32 [B, KVH, N, topk]
      selection blocks per query token (row-major), "compressed_probs": float32 [B, H, N, C]}.
    """
    check_rank("q", q, (4, 5, 6), "[batch, *spatial (1 to 3 axes), heads, head_dim]")
    heads, kv_heads = check_qkv(q, k, v, spatial_axes=np.ndim(q) - 3)
    batch, spatial, head_dim = q.shape[0], tuple(q.shape[1:-2]), q.shape[-1]
    if tuple(shape_of(k)[1:-2]) != spatial:
        raise ValueError(f"k and v have spatial shape {tuple(shape_of(k)[1:-2])} but q has {spatial}")
    comp, sel, owner = sparse_block_plan(spatial, compression_block, selection_block)
    if not (isinstance(topk, int) and topk >= 1):
        raise ValueError(f"topk={topk!r} must be a positive int")
    rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
    tokens, groups = math.prod(spatial), heads // kv_heads
    comp_size, sel_size = math.prod(comp), math.prod(sel)
    num_sel = tokens // sel_size
    topk = min(topk, num_sel)
    if key_pe is not None and shape_of(key_pe) != (comp_size, kv_heads, head_dim):
        raise ValueError(f"key_pe must have shape (c^r, KVH, D) = {(comp_size, kv_heads, head_dim)}")
    if pool_weights is not None and shape_of(pool_weights) != (comp_size,):
        raise ValueError(f"pool_weights must have shape (c^r,) = ({comp_size},), got {shape_of(pool_weights)}")
    flat_q = q.reshape(batch, tokens, heads, head_dim)

    def blocks(t: Array, block: tuple[int, ...]) -> Array:  # [B, *S, KVH, D] -> [B, blocks, prod(block), KVH, D]
        return partition_windows(t, block)[0].reshape(batch, -1, math.prod(block), *t.shape[-2:])

    # compression: pool every c^r-token block of keys (with the intra-block position embedding) and values
    kc, vc = blocks(k, comp), blocks(v, comp)  # [B, C, c^r, KVH, D]
    if key_pe is not None:
        kc = kc + jnp.asarray(key_pe, kc.dtype)
    if pool_weights is None:
        kc, vc = kc.mean(axis=2), vc.mean(axis=2)
    else:
        kc, vc = (jnp.einsum("bcpkd,p->bckd", t, jnp.asarray(pool_weights, t.dtype)) for t in (kc, vc))
    o_cmp, aux = F.softmax_attention(
        flat_q, kc, vc, scale=scale, dropout_rate=dropout_rate, dropout_rng=rngs[0], return_probs=True
    )
    probs = aux["probs"]  # [B, H, N, C]

    # selection: block scores from the compressed probabilities, top-k blocks per (kv group, query)
    owner_onehot = jnp.asarray(np.eye(num_sel, dtype=np.float32)[owner])  # [C, S]
    group_probs = probs.reshape(batch, kv_heads, groups, tokens, -1).sum(axis=2)  # [B, KVH, N, C]
    scores = jax.lax.stop_gradient(jnp.einsum("bgnc,cs->bgns", group_probs, owner_onehot))
    _, selected = jax.lax.top_k(scores, topk)  # [B, KVH, N, topk]; ties -> lower block index
    ks, vs = blocks(k, sel), blocks(v, sel)  # [B, S, s^r, KVH, D]

    def gather(blocks: Array) -> Array:  # [B, S, s^r, KVH, D] -> [B, KVH, N, topk * s^r, D]
        per_head = blocks.transpose(0, 3, 1, 2, 4)  # [B, KVH, S, s^r, D]
        taken = jax.vmap(jax.vmap(lambda t, i: t[i]))(per_head, selected)  # [B, KVH, N, topk, s^r, D]
        return taken.reshape(batch, kv_heads, tokens, topk * sel_size, blocks.shape[-1])

    scale_ = head_dim**-0.5 if scale is None else scale
    grouped_q = flat_q.reshape(batch, tokens, kv_heads, groups, head_dim)
    logits = jnp.einsum("bnkgd,bknwd->bkngw", grouped_q, gather(ks), preferred_element_type=jnp.float32) * scale_
    weights = dropout_weights(jax.nn.softmax(logits, axis=-1), dropout_rate, rngs[1])
    o_slc = jnp.einsum("bkngw,bknwd->bnkgd", weights.astype(v.dtype), gather(vs), preferred_element_type=jnp.float32)

    # a window larger than an extent covers that axis (as blocks do)
    window = window_plan(spatial, window_size, shift, clip=True, window_name="window_size")[0]
    o_win = window_attention(
        q, k, v, window=window, shift=shift, scale=scale, dropout_rate=dropout_rate, dropout_rng=rngs[2]
    )
    out_shape = (batch, *spatial, heads, v.shape[-1])
    return (
        o_cmp.reshape(out_shape),
        o_slc.reshape(out_shape).astype(q.dtype),
        o_win,
        {"selected": selected, "compressed_probs": probs},
    )


# ---------------------------------------------------------------------------------------------- layer
@register(
    "spatial_sparse",
    family="local",
    paper="Direct3D-S2: Gigascale 3D Generation Made Easy with Spatial Sparse Attention",
    catalog=132,
    op=spatial_sparse_attention,
    input_kind="spatial",
    supports_causal=False,
    supports_decode=False,
    summary="Direct3D-S2 SSA: gated compression + top-k block selection + window branches over 1-D/2-D/3-D grids",
    option_docs={
        "compression_block": "tokens per axis of a compression block (pooled into one key/value; paper 4)",
        "selection_block": "tokens per axis of a selection block, a multiple of compression_block (paper 8)",
        "topk": "selection blocks attended per query token and kv head (paper 8)",
        "window_size": "window per axis of the local branch (paper 8; clipped to the extent)",
        "shift": "window shift per axis, 0 <= shift < window_size (paper alternates 0 and window_size // 2)",
        "pooling": "compression pooling: 'mean' or 'learned' (weighted sum over block positions, mean at init)",
        "key_pe": "learned intra-block position embedding added to keys before compression (zero init)",
        "scale": "logit scale (None = 1/sqrt(head_dim))",
    },
    fidelity="official-code",
    reference="github.com/DreamTechAI/Direct3D-S2: compression, top-k selection and window branches mixed by sigmoid "
    "gates, here on a dense grid (the v2 compression stack is not reproduced)",
    validators={
        "compression_block": int_or_pair(positive_int),
        "selection_block": int_or_pair(positive_int),
        "topk": positive_int,
        "pooling": choice(*POOLINGS),
        "window_size": int_or_pair(positive_int),
        "shift": int_or_pair(non_negative_int),
        "scale": optional(positive),
    },
)
class SpatialSparseAttention(SpatialAttentionLayer):
    """Spatial Sparse Attention: x [B, *spatial, E] -> [B, *spatial, E]."""

    compression_block: IntPerAxis = 4
    selection_block: IntPerAxis = 8
    topk: int = 8
    window_size: IntPerAxis = 8
    shift: IntPerAxis = 0
    pooling: str = "mean"
    key_pe: bool = True
    scale: float | None = None

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, *S, H, D], k/v [B, *S, KVH, D] -> [B, *S, H, D]: the three branches mixed by sigmoid gates of x."""
        x = call.x
        features = x.shape[-1]
        comp, _, _ = sparse_block_plan(tuple(q.shape[1:-2]), self.compression_block, self.selection_block)
        comp_size = math.prod(comp)
        pe = None
        if self.key_pe:
            pe = self.param(
                "key_pe",
                nn.with_logical_partitioning(nn.initializers.zeros, (None, "kv_heads", "head_dim")),
                (comp_size, self.kv_heads, self.head_dim),
                self.param_dtype,
            )
        weights = None
        if self.pooling == "learned":
            weights = self.param(
                "pool_weights",
                nn.with_logical_partitioning(nn.initializers.constant(1.0 / comp_size), (None,)),
                (comp_size,),
                self.param_dtype,
            )
        o_cmp, o_slc, o_win, _ = spatial_sparse_attention(
            q,
            k,
            v,
            compression_block=self.compression_block,
            selection_block=self.selection_block,
            topk=self.topk,
            window_size=self.window_size,
            shift=self.shift,
            key_pe=None if pe is None else jnp.asarray(pe, self.dtype),
            pool_weights=None if weights is None else jnp.asarray(weights, self.dtype),
            scale=self.scale,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
        )
        gate_kernel = self.param(
            "gate",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
            (features, 3),
            self.param_dtype,
        )
        gates = jax.nn.sigmoid(jnp.einsum("...e,eg->...g", x.astype(self.dtype), jnp.asarray(gate_kernel, self.dtype)))
        y = gates[..., 0:1, None] * o_cmp + gates[..., 1:2, None] * o_slc + gates[..., 2:3, None] * o_win
        return y.astype(self.dtype)
