"""`dma`: Dynamic Mask Attention, a trainable key bias computed from the values decides which keys every query keeps
(the window_size largest visible ones); attention is softmax of the logits plus that bias over the kept keys.

Paper: "Trainable Dynamic Mask Sparse Attention" (Shi et al., 2025, arXiv 2508.02124; code github.com/SmallDoges/
flash-dmattn, examples/modeling/modeling_doge.py `DogeAttention` and flash_dmattn/utils/mask.py `topk_mask`).
Parameters beyond the softmax layer's: dt_proj [KVH, D] and A [KVH] (A zero-initialised, as the official code), per
kv head g, scale s:

    b_gj   = A_g softplus( v_gj . w^dt_g )                               key bias from the values (query-independent)
    keep_t = the window_size keys j visible to t with the largest b_gj  (ties: the earlier key; all when fewer)
    o_t    = softmax_{j in keep_t}( s q_t . k_j + b_gj ) v_j

The bias is part of the logits (A and W^dt are trained through it, the paper's "trainable" mask); the selection
itself is discrete (no gradient through the ranking, like the official `attention_bias.detach()`). On the block-sparse
core with one-token blocks, the bias rides in the dot product: q' = [q s / s', 1], k' = [k, b / s'] give
s' q' . k' = s q . k + b (s' = the core's scale for D + 1 dims), so the core's exact softmax is the formula above.

Reductions: window_size >= the number of keys keeps every visible key, so with A = 0 (the initial bias) the layer
equals `softmax` exactly (tests/sparse/test_dma.py). Causality: the ranking for query t reads the biases of keys
<= t only (strictly causal).

Fidelity (spec "official-code"): the bias, the top-k mask and the logits follow the official code, except that each
kv head's bias reads its own values (the official dt_proj maps the concatenated values of all kv heads, a dense
[KVH D, KVH] matrix; per head, kv heads stay independent: shardable along kv heads, and GQA equals MHA with repeated
kv heads; the same map when KVH = 1), no block smoothing of the mask (the official `block_size` option, off by
default), and the official Doge layer's q/k RMS norms are the softmax layer's `qk_norm` option here (off by default).
Selection cost: the biases are [B, KVH, Tk]; ranking them per query is O(Tq Tk log window_size), the attention
O(Tq window_size D).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.validation import check_qkv, choice, positive_int
from attn.registry import register
from attn.sparse.selector_layer import BlockSelectorLayer

Array = jax.Array


def dma_key_bias(v: Array, dt_kernel: Array, a: Array) -> Array:
    """b float32 [B, KVH, Tk] = A softplus(v . w^dt) per kv head, from v [B, Tk, KVH, D], dt_kernel [KVH, D],
    a [KVH]."""
    dtype = jnp.promote_types(v.dtype, jnp.float32)
    dt = jnp.einsum("btgd,gd->bgt", v.astype(dtype), dt_kernel.astype(dtype))
    return a.astype(dtype)[None, :, None] * jax.nn.softplus(dt)


def dma_indices(
    bias: Array, *, window_size: int, q_len: int, heads: int, causal: bool = True, q_offset: Any = 0
) -> Array:
    """The kept keys per query: int32 [B, H, q_len, min(window_size, Tk)] (-1 = padding) from the key bias float
    [B, KVH, Tk]: the window_size largest visible biases of each query (query head h reads kv head h // (H / KVH))."""
    positive_int("window_size", window_size)
    batch, kv_heads, kv_len = bias.shape
    visible = jnp.ones((q_len, kv_len), bool)
    if causal:
        visible = jnp.arange(kv_len)[None, :] <= jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len)[:, None]
    ranked = jnp.where(visible, bias[:, :, None, :], -jnp.inf)  # [B, KVH, Tq, Tk]
    values, ids = jax.lax.top_k(ranked, min(int(window_size), kv_len))
    ids = jnp.where(values > -jnp.inf, ids, -1).astype(jnp.int32)
    return jnp.repeat(ids, heads // kv_heads, axis=1)


def with_key_bias(q: Array, k: Array, bias: Array, scale: float | None) -> tuple[Array, Array, float]:
    """(q' [B, Tq, H, D + 1], k' [B, Tk, KVH, D + 1], s') with s' q'_t . k'_j = s q_t . k_j + bias_gj, where s = scale
    (default 1/sqrt(D)) and s' = scale (default 1/sqrt(D + 1)), the scale attention computes for D + 1 dims."""
    check_qkv(q, k, k)
    dim = q.shape[-1]
    s = dim**-0.5 if scale is None else scale
    s_core = (dim + 1) ** -0.5 if scale is None else scale
    ones = jnp.ones((*q.shape[:-1], 1), q.dtype)
    q_aug = jnp.concatenate([q * jnp.asarray(s / s_core, q.dtype), ones], axis=-1)
    k_aug = jnp.concatenate([k, (bias / s_core).transpose(0, 2, 1)[..., None].astype(k.dtype)], axis=-1)
    return q_aug, k_aug, s_core


@register(
    "dma",
    family="sparse",
    paper="Trainable Dynamic Mask Sparse Attention",
    catalog=49,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="trainable key bias A softplus(v W) from the values: each query keeps the window_size keys with the "
    "largest visible bias, softmax of logits plus bias over them",
    fidelity="official-code",
    reference="arXiv 2508.02124 (Sec. 3: dynamic mask from value states, top-w keys) and github.com/SmallDoges/"
    "flash-dmattn examples/modeling/modeling_doge.py (dt_proj of the values, A * softplus, A zero-init; here per kv "
    "head), "
    "flash_dmattn/utils/mask.py (topk_mask over the causally masked bias, detached)",
    option_docs={
        "window_size": "keys kept per query (official keep_window_size 2048)",
        "block_size": "the core's block length: 1 (the mask is per key; other values are refused)",
    },
    validators={"window_size": positive_int, "block_size": choice(1)},
    has_attention_weights=True,
)
class DynamicMaskAttention(BlockSelectorLayer):
    """Dynamic Mask Attention: softmax(logits + value-derived key bias) over each query's window_size keys of
    largest bias. x [B, T, E] -> [B, T, E]. Parameters dt_proj [KVH, D] and A [KVH]."""

    window_size: int = 2048
    block_size: int = 1  # the core's block length: one-token blocks (per-key selection)

    def bias_parameters(self, create: bool) -> tuple[Array, Array]:
        """(dt_proj [KVH, D], A [KVH]), created (in the selection) or read (in attend)."""
        kv = self.kv_heads
        if not create:
            return nn.unbox(self.get_variable("params", "dt_proj")), nn.unbox(self.get_variable("params", "A"))
        dt = self.param(
            "dt_proj",
            nn.with_logical_partitioning(nn.initializers.normal(self.head_dim**-0.5), ("kv_heads", "head_dim")),
            (kv, self.head_dim),
            self.param_dtype,
        )
        a = self.param("A", nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads",)), (kv,), self.param_dtype)
        return dt, a

    def select_with_values(self, q: Array, k: Array, v: Array, *, causal: bool, q_offset: Any) -> Array:
        bias = jax.lax.stop_gradient(dma_key_bias(v, *self.bias_parameters(create=True)))
        return dma_indices(
            bias, window_size=self.window_size, q_len=q.shape[1], heads=q.shape[2], causal=causal, q_offset=q_offset
        )

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, Tq, H, D], k/v [B, Tk, KVH, D] -> [B, Tq, H, Dv]: the selector layer's attention of the
        bias-augmented q', k' (see the module docstring)."""
        bias = dma_key_bias(v, *self.bias_parameters(create=False))
        q_aug, k_aug, _ = with_key_bias(q, k, bias, self.scale)
        return super().attend(q_aug, k_aug, v, call)
