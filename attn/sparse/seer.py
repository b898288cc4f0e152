"""`seer`: SeerAttention, a learned gate (AttnGate) over block-pooled queries and keys picks the key blocks of each
query block; then exact block-sparse softmax. The gate is trained by self-distillation against the block-max-pooled
attention map of the layer's own (dense) attention.

Paper: "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (Gao et al., 2024, arXiv 2410.13276; code
github.com/microsoft/SeerAttention). Gate, per (batch row, query head h, kv head g = h // (H / KVH)), blocks of
`block_size` tokens (the last one partial, pooled over its real tokens), scale s_g = 1 / sqrt(gate_dim):

    qp_r   = concat_{f in q_pooling} f_{t in block r}(q_t)                     [len(q_pooling) D]   (f: avg, max, min)
    kp_c   = concat_{f in k_pooling} f_{j in block c}(k_j)                     [len(k_pooling) D]
    g_rc   = softmax_c( s_g (qp_r W^q_h + b^q_h) . (kp_c W^k_g + b^k_g) )     over the key blocks c visible from r
    keep   top_k: the top_k largest g_rc of row r;   else threshold: every c with g_rc > threshold

(visible: block c holds a key j <= q_offset + the last real query of block r when causal; every block otherwise.)
`block_sparse_attention` then computes o = softmax over the kept blocks (token-level causal in diagonal blocks).
Cost: top_k gives index lists of width top_k (time proportional to the kept blocks); a threshold keeps a
data-dependent count, so under jit the lists are num_k_blocks wide and the core visits every slot (the dropped ones
masked): the same result at dense cost. Use top_k for speed.

Self-distillation (distill=True; the paper's post-training recipe, configs/seer_gate.py): the layer's output is the
dense softmax attention (the teacher, as the official training forward), and the gate is fitted to

    P_rc   = max_{t in block r, j in block c, j visible to t} softmax_j(s q_t . k_j)           (2-D max pooling)
    T_rc   = P_rc / sum_c' P_rc'
    loss   = mean over (b, h, r >= floor(nq / 4)) of KL(T_r || g_r)        under "losses"/"seer_gate"

with the teacher T and the gate's inputs q, k held constant (stop_gradient): the loss trains only the gate, and the
gate never changes the model's other gradients (the official code freezes the base weights; here the base model's
gradient simply receives nothing from the gate). The first quarter of query blocks is left out of the loss, as in
the official code ("for training stability").

Reductions: top_k >= num_k_blocks, or threshold = 0 (a softmax entry is never 0 in float), keeps every visible
block, so the layer equals `softmax` exactly (tests/sparse/test_seer.py).

Deviations (fidelity "official-code"): the official gate pools the keys and queries before RoPE and rotates the
pooled vectors at block positions; here the gate pools the q, k the attention uses (rotated when position="rope").
The official gate skips the query projection when q_pooling has one entry and gate_dim == head_dim; here both
projections always exist (identity-initialised, so that case starts equal). The official KLDivLoss averages over
every entry (a constant factor 1 / nk from the per-row KL used here). The official threshold mode also forces the
last two query-block rows dense (`last_block_dense`); not done here. With a threshold a row can keep no block: its
queries then get output 0 (the core's empty-row rule), as in the official kernel.

Causality: a block's pooled query reads all its queries and a pooled key block all its keys, so with causal=True a
query's kept blocks can depend on later tokens of its own block and of the key blocks it sees (a prefill method).
Decoding is not supported (see `selector_layer`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn.core.block_pooling import pool_blocks
from attn.core.block_sparse import block_mask_to_indices
from attn.core.distillation import attention_distillation_loss
from attn.core.headwise_linear import HeadwiseLinear
from attn.core.layer import AttentionCall
from attn.core.validation import OptionValidator, check_qkv, in_range, optional, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention
from attn.sparse.selector_layer import BlockSelectorLayer

Array = jax.Array

POOLINGS = ("avg", "max", "min")
_THRESHOLD = in_range(0.0, 1.0, high_inclusive=False)
_OPTIONAL_POSITIVE_INT = optional(positive_int)
_POOLING = OptionValidator(
    lambda v: isinstance(v, (tuple, list)) and 0 < len(v) == len(set(v)) and all(p in POOLINGS for p in v),
    f"a non-empty tuple of distinct entries of {POOLINGS!r}",
    f"non-empty distinct entries of {POOLINGS!r}",
)


def seer_pool(x: Array, block_size: int, poolings: tuple[str, ...]) -> Array:
    """x [B, T, H, D] -> [B, ceil(T / block_size), H, len(poolings) D]: each pooling over the real tokens of a block,
    concatenated in the order given ("avg" mean, "max", "min")."""
    kinds = {"avg": "mean", "max": "max", "min": "min"}
    return jnp.concatenate([pool_blocks(x, block_size, kinds[p], axis=1) for p in poolings], axis=-1)


def visible_blocks(q_len: int, kv_len: int, block_size: int, causal: bool, q_offset: Any = 0) -> Array:
    """bool [nq, nk]: key block c holds a key j <= q_offset + (the last real query of block r) (all True unless
    causal)."""
    n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
    if not causal:
        return jnp.ones((n_q, n_k), bool)
    last = jnp.minimum((jnp.arange(n_q) + 1) * block_size, q_len) - 1 + jnp.asarray(q_offset, jnp.int32)
    return jnp.arange(n_k)[None, :] * block_size <= last[:, None]


def seer_gate_probs(q_gate: Array, k_gate: Array, visible: Array) -> Array:
    """q_gate [B, nq, H, F], k_gate [B, nk, KVH, F], visible bool [nq, nk] -> float [B, H, nq, nk]: the gate's block
    distribution softmax_c(q_gate_r . k_gate_c / sqrt(F)) over the visible blocks (rows with none are 0)."""
    heads, kv_heads = q_gate.shape[2], k_gate.shape[2]
    k_gate = jnp.repeat(k_gate, heads // kv_heads, axis=2)
    logits = jnp.einsum("brhf,bchf->bhrc", q_gate, k_gate) * q_gate.shape[-1] ** -0.5
    logits = jnp.where(visible, logits, -jnp.inf)
    safe = jnp.where(jnp.any(visible, axis=-1, keepdims=True), logits, 0.0)
    return jnp.where(visible, jax.nn.softmax(safe, axis=-1), 0.0)


def seer_block_indices(
    probs: Array, visible: Array, *, top_k: int | None = None, threshold: float = 0.0, max_selected: int | None = None
) -> Array:
    """probs float [B, H, nq, nk] (the gate), visible bool [nq, nk] -> int32 [B, H, nq, S] key blocks, -1 padded.

    top_k: keep the top_k most probable visible blocks (S = min(top_k, nk); ties: the lower block id); None: keep the
    visible blocks with probability > threshold (S = max_selected, see `block_mask_to_indices`)."""
    if top_k is not None:
        positive_int("top_k", top_k)
        kept = min(int(top_k), probs.shape[-1])
        scores = jnp.where(visible, probs, -jnp.inf)
        values, ids = jax.lax.top_k(scores, kept)
        return jnp.where(values > -jnp.inf, ids, -1).astype(jnp.int32)
    _THRESHOLD("threshold", threshold)
    return block_mask_to_indices(visible & (probs > threshold), max_selected)


def seer_distillation_target(
    q: Array, k: Array, *, block_size: int, causal: bool, q_offset: Any = 0, scale: float | None = None
) -> Array:
    """The gate's training target T, float32 [B, H, nq, nk] (see the module docstring): the 2-D max-pooled dense
    softmax attention of q [B, Tq, H, D] over k [B, Tk, KVH, D], each row normalised to sum 1 (O(Tq Tk) memory)."""
    heads, kv_heads = check_qkv(q, k, k)
    positive_int("block_size", block_size)
    q_len, dim, kv_len, bs = q.shape[1], q.shape[3], k.shape[1], int(block_size)
    scale = dim**-0.5 if scale is None else scale
    k = jnp.repeat(k.astype(jnp.float32), heads // kv_heads, axis=2)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k)
    allowed = jnp.ones((q_len, kv_len), bool)
    if causal:
        allowed = jnp.arange(kv_len)[None, :] <= jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len)[:, None]
    safe = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), jnp.where(allowed, logits, -jnp.inf), 0.0)
    probs = jnp.where(allowed, jax.nn.softmax(safe, axis=-1), 0.0)
    pooled = pool_blocks(probs, bs, "max", axis=(2, 3))  # [B, H, nq, nk]
    total = jnp.sum(pooled, axis=-1, keepdims=True)
    return pooled / jnp.where(total > 0, total, 1.0)


def seer_gate_loss(gate_probs: Array, target: Array) -> Array:
    """float32 scalar: mean over (b, h, r >= floor(nq / 4)) of KL(target_r || gate_r), both [B, H, nq, nk]."""
    start = gate_probs.shape[2] // 4
    return attention_distillation_loss(gate_probs[:, :, start:], target[:, :, start:])


@register(
    "seer",
    family="sparse",
    paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs",
    catalog=116,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="learned AttnGate over block-pooled q/k (avg; max, min, avg) picks key blocks by top-k or threshold, "
    "then exact block-sparse softmax; gate trained by self-distillation on the 2-D max-pooled attention map",
    fidelity="official-code",
    reference="arXiv 2410.13276 (Sec. 3: AttnGate, block-level ground truth by max pooling, KL self-distillation) "
    "and github.com/microsoft/SeerAttention seer_attn/attn_gate.py (pooling concat, per-head linears, softmax scale "
    "1/sqrt(gate hidden)), seer_attn/kernels/attn_pooling_kernel.py (column max of the row-max-pooled probabilities, "
    "row-normalised), seer_attn/llama/modeling_llama_seerattn.py (KL on log_softmax, first quarter of rows dropped), "
    "seer_attn/modules/common.py (top-k / threshold masks)",
    option_docs={
        "block_size": "tokens per query/key block (official default 64)",
        "gate_dim": "width of the gate's projected pooled q and k (official default 128)",
        "q_pooling": "poolings of the query blocks, concatenated (official 'avg')",
        "k_pooling": "poolings of the key blocks, concatenated (official 'max', 'min', 'avg')",
        "top_k": "keep the top_k gate blocks per query block (None: use the threshold)",
        "threshold": "keep the blocks whose gate probability exceeds it (when top_k is None), in [0, 1)",
        "distill": "training mode: dense softmax output plus the gate's self-distillation loss under 'losses'",
    },
    validators={
        "block_size": positive_int,
        "gate_dim": positive_int,
        "q_pooling": _POOLING,
        "k_pooling": _POOLING,
        "top_k": _OPTIONAL_POSITIVE_INT,
        "threshold": _THRESHOLD,
        "distill": OptionValidator(lambda v: isinstance(v, bool), "a bool", "bool"),
    },
    has_attention_weights=True,
)
class SeerAttention(BlockSelectorLayer):
    """SeerAttention: softmax over the key blocks a learned gate keeps. x [B, T, E] -> [B, T, E].

    Gate parameters: gate_query kernel [H, len(q_pooling) D, gate_dim], gate_key kernel [KVH, len(k_pooling) D,
    gate_dim] (identity-initialised, with biases)."""

    block_size: int = 64
    gate_dim: int = 128
    q_pooling: tuple[str, ...] = ("avg",)
    k_pooling: tuple[str, ...] = ("max", "min", "avg")
    top_k: int | None = None
    threshold: float = 2e-3
    distill: bool = False

    def gate(self, q: Array, k: Array, visible: Array) -> Array:
        """The gate's block distribution float [B, H, nq, nk] from q [B, Tq, H, D], k [B, Tk, KVH, D] (held
        constant: the gate's own parameters are the only ones its loss trains)."""
        dtype = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), jnp.float32)
        q, k = jax.lax.stop_gradient(q).astype(dtype), jax.lax.stop_gradient(k).astype(dtype)
        common = dict(features=self.gate_dim, dtype=dtype, param_dtype=self.param_dtype)
        q_gate = HeadwiseLinear(groups=self.num_heads, heads_axis="heads", name="gate_query", **common)(
            seer_pool(q, self.block_size, tuple(self.q_pooling))
        )
        k_gate = HeadwiseLinear(groups=k.shape[2], heads_axis="kv_heads", name="gate_key", **common)(
            seer_pool(k, self.block_size, tuple(self.k_pooling))
        )
        return seer_gate_probs(q_gate, k_gate, visible)

    def select(self, q: Array, k: Array, *, causal: bool, q_offset: Any) -> Array:
        visible = visible_blocks(q.shape[1], k.shape[1], self.block_size, causal, q_offset)
        probs = self.gate(q, k, visible)
        if self.distill:
            target = seer_distillation_target(
                jax.lax.stop_gradient(q),
                jax.lax.stop_gradient(k),
                block_size=self.block_size,
                causal=causal,
                q_offset=q_offset,
                scale=self.scale,
            )
            self.sow("losses", "seer_gate", seer_gate_loss(probs, jax.lax.stop_gradient(target)))
        return seer_block_indices(probs, visible, top_k=self.top_k, threshold=self.threshold)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, Tq, H, D], k/v [B, Tk, KVH, D] -> [B, Tq, H, Dv]: the kept blocks, or (distill) dense softmax."""
        if self.distill:
            dense = call.mask.replace(block_mask=None, block_size=None)
            return MultiHeadAttention.attend(self, q, k, v, call.replace(mask=dense))
        return super().attend(q, k, v, call)
