"""`rcmha`: Relative Convolutional Multi-Head Attention — depthwise causal convolutions on Q, K, V plus a
Transformer-XL relative position term.

Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling" (Sugiharto, Aradea,
Mubarok, 2023; arXiv 2308.03429). The abstract names the two parts; the equations below were checked against the
authors' code (github.com/hermansh-id/rcmha, rcmha/attention.py `RelativeMultiHeadAttention`, rcmha/util.py,
rcmha/model.py), which builds on labml's Primer MDHA and Transformer-XL layers. The paper's full text was not
reachable; where it differs from that code, the code is what is implemented here.

(1) Multi-DConv-Head Attention (Primer): after each of the Q, K and V projections, a depthwise convolution of width
    w (authors: 3) along the sequence, one filter per channel of a head, the same filter for every head, with a
    bias; padded with w - 1 zeros on the left so that token t sees only tokens t - w + 1 .. t:

        q'_t,h,c = b^q[c] + sum_{s=0}^{w-1} W^q[s, c] q_{t-w+1+s, h, c}        (same for k', v' with W^k, W^v)

(2) The Transformer-XL relative term (relative="xl", the authors' form), with learned per-head tables:

        S[i, j] = (q'_i + u) . k'_j + q'_i . R[j - i] + d[j - i]                 u [H, D], R [H, M, D], d [H, M]
        o       = softmax(S / sqrt(D) + mask) v'                                 (the whole S is scaled)

    relative="music" drops u and d (the Music Transformer's q'_i . R[j - i] only); relative="none" drops the whole
    relative term (MDHA alone). The relative term reuses `relative_music`'s tables and skew/gather, so it covers
    keys at or before the query, distances -(M-1) .. 0 with M = max_distance (the authors: 4096 rows each side of 0,
    under a causal mask). R is learned directly per head (no sinusoids, no W_R projection), as in the authors' code.

Our choices: the filters start as the identity (tap w - 1 = 1, others 0, bias 0) and u, d at 0, so a fresh
relative="none" layer is exactly the attention it extends (the authors' code initialises u, R, d to zeros and the
filters as PyTorch's Conv1d default); R starts as in `relative_music`. The projections follow the layer's
`use_bias` (the authors: no bias on q and k, a bias on v and on the output).

Decoding: the KV cache holds the convolved k', v'; the last w - 1 pre-convolution q, k, v rows are kept in the
"cache" collection (`conv_query`, `conv_key`, `conv_value`), so a chunk is convolved exactly as in the full
forward. The convolution runs along the array axis: packed sequences (segment ids) leak w - 1 tokens across a
boundary, like the authors' and Primer's.

Shapes: x [B, T, E] -> [B, T, E]; filters [w, D], conv biases [D]. Cost: the relative layer's O(B H T (T + M) D)
plus O(B T H D w) for the convolutions.

Reduction to softmax: relative="none" with identity filters (the initial state) is exactly the `softmax` layer
with position="none" and the same q/k/v/o parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import kv_cache
from attn.core.conv import causal_depthwise_conv, identity_filter
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.validation import check_rank, choice, positive_int
from attn.registry import get, register
from attn.softmax.relative_music import MusicRelativeAttention, music_relative_logits, relative_table

Array = jax.Array

RELATIVE = ("xl", "music", "none")


@register(
    "rcmha",
    family="softmax",
    paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
    catalog=6,
    op=causal_depthwise_conv,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="depthwise causal convolution on Q, K, V (Primer MDHA) plus Transformer-XL relative logits",
    option_docs={
        **{n: o.doc for n, o in get("relative_music").options.items()},
        "conv_width": "width w of the causal depthwise convolutions on q, k and v (Primer: 3; 1 = none)",
        "relative": "'xl' ((q + u) k + q R + d, the authors' Transformer-XL form), 'music' (q R only) or 'none' "
        "(convolutions only: Primer's MDHA)",
    },
    fidelity="official-code",
    reference="github.com/hermansh-id/rcmha rcmha/attention.py RelativeMultiHeadAttention (the paper's full text was "
    "not read)",
    validators={"conv_width": positive_int, "relative": choice(*RELATIVE)},
    has_attention_weights=True,
)
class RelativeConvolutionalAttention(MusicRelativeAttention):
    """Depthwise causal convolutions after the q/k/v projections plus relative logits. x [B, T, E] -> [B, T, E]."""

    conv_width: int = 3
    relative: str = "xl"

    def validate(self, call: AttentionCall) -> None:
        if call.cross:
            raise ValueError("rcmha is self-attention only (its convolutions run along x); got a context")
        super().validate(call)

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        """The plain q/k/v projections; QK-norm follows the convolutions (in `prepare`)."""
        return AttentionLayer.project_qkv(self, x, context)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """Causal depthwise convolutions of q, k, v (continuing from the cached last w - 1 rows when decoding),
        QK-norm, then the relative layer's RoPE, KV cache and relative bias; with relative="xl" the content bias u
        joins the queries after the relative term was computed (it enters q . k only)."""
        q, k, v = self.convolve(q, k, v, call.decode)
        if self.qk_norm:
            q, k = self.head_norm(q, "query_norm"), self.head_norm(k, "key_norm")
        q, k, v, call = super().prepare(q, k, v, call)
        if self.relative == "xl":
            u = self.param(
                "query_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
                (self.num_heads, self.head_dim),
                self.param_dtype,
            )
            q = q + jnp.asarray(u, q.dtype)
        return q, k, v, call

    def convolve(self, q: Array, k: Array, v: Array, decode: bool) -> tuple[Array, Array, Array]:
        """q [B, T, H, D], k, v [B, T, KVH, D] -> the same shapes, each through its causal depthwise convolution."""
        streaming = decode and kv_cache.cache_is_initialized(self)
        names = ("query", "key", "value")
        # The convolution histories: side state of the KV cache (the cache protocol's RecurrentState, shared index).
        histories = cache_lib.load_state(self, tuple(f"conv_{name}" for name in names), shared_index=True)
        out, updated = [], {}
        for name, y, heads in zip(names, (q, k, v), (self.num_heads, self.kv_heads, self.kv_heads), strict=True):
            # one filter and bias per channel of a head, shared by all heads (the authors' SpatialDepthWiseConvolution)
            kernel = self.param(
                f"{name}_conv",
                nn.with_logical_partitioning(identity_filter, (None, "head_dim")),
                (self.conv_width, self.head_dim),
                self.param_dtype,
            )
            conv_bias = self.param(
                f"{name}_conv_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("head_dim",)),
                (self.head_dim,),
                self.param_dtype,
            )
            state = None
            if decode:
                if streaming and histories is not None:
                    state = histories.state[f"conv_{name}"]
                    history = jnp.concatenate([state.astype(y.dtype), y], axis=1)
                    updated[f"conv_{name}"] = history[:, history.shape[1] - (self.conv_width - 1) :]
                else:  # the creating call: zero histories
                    updated[f"conv_{name}"] = jnp.zeros(
                        (y.shape[0], self.conv_width - 1, heads, self.head_dim), y.dtype
                    )
            out.append(causal_depthwise_conv(y, kernel, state, conv_bias))
        if decode:
            axes = tuple(
                (key, ("batch", None, "kv_heads" if "query" not in key else "heads", "head_dim")) for key in updated
            )
            cache_lib.store_state(self, cache_lib.RecurrentState(updated, None, axes))
        return tuple(out)

    def relative_logits(self, q: Array, kv_len: int, positions: Array | None, q_offset, decode: bool) -> Array | None:
        if self.relative == "none":
            return None
        if self.relative == "music":
            return super().relative_logits(q, kv_len, positions, q_offset, decode)
        if positions is not None:
            check_rank("positions", positions, (1, 2), "[batch, length] or [length]")
        heads = 1 if self.share_heads else self.num_heads
        table = relative_table(self, "relative_embeddings", heads, self.max_distance, self.head_dim, self.param_dtype)
        scalar = self.param(
            "relative_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("heads" if heads > 1 else None, "relative_distance")),
            (heads, self.max_distance),
            self.param_dtype,
        )
        # q . R[j - i] + d[j - i] = [q, 1] . [R, d][j - i]: one skew/gather gives both terms
        table = jnp.concatenate([table, jnp.asarray(scalar, jnp.float32)[..., None]], axis=-1)
        q = jnp.concatenate([q, jnp.ones((*q.shape[:-1], 1), q.dtype)], axis=-1)
        return music_relative_logits(self, table, q, kv_len, positions, q_offset)
