"""`cswin`: cross-shaped window self-attention with LePE, from "CSWin Transformer: A General Vision Transformer
Backbone with Cross-Shaped Windows" (Dong et al., catalog [34]).

The heads are split in two equal groups that attend in parallel within stripes of the 2-D token grid [H, W]:

    heads [0, H/2)     horizontal stripes: sw consecutive rows x all W columns
    heads [H/2, H)     vertical stripes:   all H rows x sw consecutive columns

so that together every token sees the cross of its row band and column band. Per head group, with stripes S:

    o_i = sum_{j in S(i)} softmax_j(q_i k_j^T / sqrt(D)) v_j + LePE(V)_i
    LePE(V) = DWConv3x3(V), computed inside each stripe (zero padding at the stripe border)
    y = concat_h(o) W_o

LePE (locally-enhanced positional encoding) is a depthwise 3x3 convolution with bias on the values of each stripe,
added to the attention output (option `lepe`); one convolution per head group, as in the official code. The paper's
equation puts the horizontal stripes on the first half of the heads; the official code uses the opposite order
(a relabelling of the heads, immaterial for a trained layer). Extents that are not a multiple of sw are padded at
the end: the last stripe is narrower, padded keys are masked and the padded values are the convolution's zero
padding (the official code requires multiples). A stripe width equal to both extents is the paper's last stage:
full attention on every head.

Implementation: stripes are windows of shape (sw, W) and (H, sw): attention is `attn.core.windows.window_attention`
and LePE runs on the values partitioned by `attn.core.windows.partition_windows`.

Shapes: x [B, H, W, E] -> [B, H, W, E]. Time O(B N sw (H + W) H_heads D / 2), memory O(B N sw (H + W) H_heads / 2)
for N = H W tokens. stripe_width = H = W with lepe=False is plain softmax attention. No causal masking, no
decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn.core.conv import conv
from attn.core.layer import AttentionCall, SpatialAttentionLayer
from attn.core.validation import check_rank, optional, positive, positive_int
from attn.core.windows import dense_window_probs, partition_windows, unpartition_windows, window_attention
from attn.registry import register

Array = jax.Array


@register(
    "cswin",
    family="local",
    paper="CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
    catalog=34,
    input_kind="spatial",
    supports_causal=False,
    supports_gqa=False,
    supports_decode=False,
    summary="CSWin cross-shaped windows: half the heads in horizontal, half in vertical stripes, with LePE",
    option_docs={
        "stripe_width": "stripe width sw: horizontal stripes are sw rows, vertical stripes sw columns",
        "lepe": "locally-enhanced positional encoding: depthwise 3x3 conv on V (per stripe) added to the output",
        "scale": "logit scale (None = 1/sqrt(head_dim))",
    },
    fidelity="paper",
    reference="CSWin paper: horizontal and vertical stripes on the two head halves, LePE; the head order and the "
    "per-group LePE conv were compared with the official code",
    validators={"stripe_width": positive_int, "scale": optional(positive)},
)
class CSWinAttention(SpatialAttentionLayer):
    """Cross-shaped window attention: x [B, H, W, E] -> [B, H, W, E]."""

    stripe_width: int = 7
    lepe: bool = True
    scale: float | None = None

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        check_rank("x", call.x, 4, "[batch, height, width, embed] (cross-shaped windows are 2-D)")
        if self.num_heads % 2:
            raise ValueError(
                f"num_heads={self.num_heads} must be even: cswin gives half the heads horizontal stripes and half "
                "vertical stripes"
            )
        if self.kv_heads % 2:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must be even (each stripe direction gets half the kv heads)"
            )
        height, width = call.x.shape[1:3]
        if self.stripe_width > min(height, width):
            raise ValueError(
                f"stripe_width={self.stripe_width!r} must be an int between 1 and min(height, width) = "
                f"{min(height, width)} (grid {height} x {width})"
            )

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, H, W, heads, D], k/v [B, H, W, KVH, D] -> [B, H, W, heads, D]: the first half of the heads in
        horizontal stripes, the second half in vertical ones; sows the dense weights float32 [B, heads, N, N] when
        captured."""
        height, width = q.shape[1:3]
        half, kv_half = self.num_heads // 2, self.kv_heads // 2
        rng = self.dropout_rng(call.deterministic)
        rngs = [None, None] if rng is None else list(jax.random.split(rng))
        outputs, weights = [], []
        directions = (("horizontal", (self.stripe_width, width)), ("vertical", (height, self.stripe_width)))
        for branch, (name, stripe) in enumerate(directions):
            heads, kv_heads = slice(branch * half, (branch + 1) * half), slice(branch * kv_half, (branch + 1) * kv_half)
            out, probs = self.stripe_attention(
                q[..., heads, :], k[..., kv_heads, :], v[..., kv_heads, :], stripe, name, rngs[branch], call
            )
            outputs.append(out)
            weights.append(probs)
        if self.wants_weights():
            self.sow_capture("attention_weights", jnp.concatenate(weights, axis=1))
        return jnp.concatenate(outputs, axis=-2)

    def stripe_attention(
        self, q: Array, k: Array, v: Array, stripe: tuple[int, int], name: str, rng: Array | None, call: AttentionCall
    ) -> tuple[Array, Array | None]:
        """One head group: q [B, H, W, h, D], k/v [B, H, W, kvh, D] -> ([B, H, W, h, D], dense probs or None)."""
        spatial = tuple(q.shape[1:3])
        capture = self.wants_weights()
        result = window_attention(
            q,
            k,
            v,
            window=stripe,
            scale=self.scale,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=rng,
            return_probs=capture,
            implementation=self.implementation,
        )
        dense = None
        if capture:
            result, aux = result
            dense = dense_window_probs(aux["probs"], spatial, stripe)
        if self.lepe:
            # LePE convolves the values of each stripe (zero padded at its borders), so it runs in stripe layout.
            encoded = self.local_positional_encoding(partition_windows(v, stripe)[0], stripe, name)
            result = result + unpartition_windows(encoded, spatial, stripe)
        return result, dense

    def local_positional_encoding(self, values: Array, window: tuple[int, int], name: str) -> Array:
        """LePE: depthwise 3x3 conv of the stripe values [B * nW, T, kvh, D] -> [B * nW, T, h, D] (kv heads are
        repeated to the query heads of their group first, so GQA layers get one filter per query head)."""
        heads = self.num_heads // 2
        values = jnp.repeat(values, heads // values.shape[2], axis=2)
        channels = heads * values.shape[-1]
        grid = values.reshape(values.shape[0], *window, channels)
        encoded = conv(
            channels, 3, groups=channels, dtype=self.dtype, param_dtype=self.param_dtype, name=f"lepe_{name}"
        )(grid)
        return encoded.reshape(values.shape).astype(values.dtype)
