"""`rcmha`: Relative Convolutional Multi-Head Attention — depthwise causal convolutions on Q, K, V plus a relative
position term.

Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling" (Sugiharto, Aradea,
Mubarok, 2023). No official code is published.

The paper combines two known parts, both here:

(1) Multi-DConv-Head Attention (Primer, So et al. 2021): after each of the Q, K and V projections, a depthwise
    convolution of width w (Primer: 3) along the sequence, one filter per head and channel, padded on the left
    so that token t sees only tokens t - w + 1 .. t (the layer stays causal):

        q'_t,h,c = sum_{s=0}^{w-1} W^q[s, h, c] q_{t-w+1+s, h, c}        (same for k', v' with W^k, W^v)

(2) A relative position term in the scores. The paper's abstract describes it as the relative encoding of
    "Transformer-XL or Relative Multi-Head Attention (RMHA)"; its full text was not reachable while this was
    written, so the relative term is the memory-efficient one of the Music Transformer (`relative_music`, the
    "relative multi-head attention" of Huang et al.), computed from the convolved queries:

        o = softmax((q' k'^T + Skew(q' E_r^T)) / sqrt(D) + mask) v'       relative="music"
        o = softmax(q' k'^T / sqrt(D) + mask) v'                          relative="none" (= MDHA / Primer)

    Transformer-XL's extra global biases u, v and sinusoidal R are not included.

The convolution filters start as the identity (tap w - 1 = 1, others 0), so a fresh layer is the attention it
extends; Primer learns them from that start too in spirit (its code initialises them randomly).

Decoding: the KV cache holds the convolved k', v'; the last w - 1 pre-convolution q, k, v rows are kept in the
"cache" collection (`conv_query`, `conv_key`, `conv_value`), so a chunk is convolved exactly as in the full
forward. The convolution runs along the array axis: packed sequences (segment ids) leak w - 1 tokens across a
boundary, like Primer's.

Shapes: x [B, T, E] -> [B, T, E]; filters [w, H|KVH, D]. Cost: the relative layer's O(B H T (T + M) D) plus
O(B T H D w) for the convolutions.

Reduction to softmax: relative="none" with identity filters (the initial state) is exactly the `softmax` layer
with position="none" and the same q/k/v/o parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import kv_cache
from attn.core.validation import check_choice, check_positive
from attn.registry import get, register
from attn.softmax.relative_music import MusicRelativeAttention

Array = jax.Array

RELATIVE = ("music", "none")


def causal_depthwise_conv(x: Array, kernel: Array, state: Array | None = None) -> Array:
    """y_t = sum_s kernel[s] * x_{t - w + 1 + s}: x [B, T, H, D], kernel [w, H, D] -> [B, T, H, D].

    `state` [B, w - 1, H, D] holds the w - 1 rows before x (zeros when None: left zero padding).
    """
    width = kernel.shape[0]
    if state is None:
        state = jnp.zeros((x.shape[0], width - 1, *x.shape[2:]), x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    kernel = jnp.asarray(kernel, x.dtype)
    length = x.shape[1]
    return sum(kernel[s] * padded[:, s : s + length] for s in range(width))


def identity_filter(key, shape, dtype=jnp.float32) -> Array:
    """[w, H, D] filter that passes the current token through: tap w - 1 is 1, the others 0."""
    return jnp.zeros(shape, dtype).at[-1].set(1.0)


@register(
    "rcmha",
    family="softmax",
    paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
    catalog=6,
    op=causal_depthwise_conv,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="depthwise causal convolution on Q, K, V (Primer MDHA) plus Music-Transformer relative logits",
    option_docs={
        **{n: o.doc for n, o in get("relative_music").options.items()},
        "conv_width": "width w of the causal depthwise convolutions on q, k and v (Primer: 3; 1 = none)",
        "relative": "'music' (skewed relative embeddings) or 'none' (convolutions only: Primer's MDHA)",
    },
)
class RelativeConvolutionalAttention(MusicRelativeAttention):
    """Depthwise causal convolutions after the q/k/v projections plus relative logits. x [B, T, E] -> [B, T, E]."""

    conv_width: int = 3
    relative: str = "music"

    def qkv(self, x: Array, context: Array | None, decode: bool) -> tuple[Array, Array, Array]:
        check_positive("conv_width", self.conv_width)
        check_choice("relative", self.relative, RELATIVE)
        if context is not None:
            raise ValueError("rcmha is self-attention only (its convolutions run along x); got a context")
        q, k, v = self.project_qkv(x, None)
        streaming = decode and kv_cache.cache_is_initialized(self)
        out = []
        for name, y, heads, axis in (
            ("query", q, self.num_heads, "heads"),
            ("key", k, self.kv_heads, "kv_heads"),
            ("value", v, self.kv_heads, "kv_heads"),
        ):
            kernel = self.param(
                f"{name}_conv",
                nn.with_logical_partitioning(identity_filter, (None, axis, "head_dim")),
                (self.conv_width, heads, self.head_dim),
                self.param_dtype,
            )
            state = None
            if decode:
                shape = (y.shape[0], self.conv_width - 1, heads, self.head_dim)
                cached = self.variable("cache", f"conv_{name}", jnp.zeros, shape, y.dtype)
                if streaming:
                    state = cached.value
                    history = jnp.concatenate([state.astype(y.dtype), y], axis=1)
                    cached.value = history[:, history.shape[1] - (self.conv_width - 1) :]
            out.append(causal_depthwise_conv(y, kernel, state))
        return tuple(out)

    def relative_logits(self, q: Array, kv_len: int, positions: Array | None, q_offset, decode: bool) -> Array | None:
        if self.relative == "none":
            return None
        return super().relative_logits(q, kv_len, positions, q_offset, decode)
