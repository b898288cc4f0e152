"""`davit`: dual attention (channel group attention and spatial window attention), from "DaViT: Dual Attention
Vision Transformers" (Ding et al., catalog [144]).

Two self-attentions over a token grid x [B, *spatial, E] with N tokens, each with its own projections:

  spatial window attention ("spatial tokens": positions are tokens, channels are features). Non-overlapping windows
      of window_size tokens per axis; `attn.local.window.WindowAttention` without relative position bias (DaViT
      encodes position with convolutions outside the attention). A window larger than the grid is clipped to it
      (Swin's rule); extents that are not multiples of the window get partial border windows (DaViT zero-pads and
      attends to the padding).

  channel group attention ("channel tokens": channels are tokens, positions are features). The channels are split
      in groups, one per head (C_g = head_dim channels each); per group g, with Q_g, K_g, V_g [N, C_g]:

          A_g = softmax(Q_g^T K_g / sqrt(C_g))                   [C_g, C_g], each row normalised over channels
          o_g = (A_g V_g^T)^T                                    [N, C_g]
          y = concat_g(o_g) W_o

      Every channel token summarises all N positions, so the attention is global while costing O(N C_g C), linear
      in N. (The official code computes softmax(K_g^T V_g) and applies it to Q_g: the same function with the three
      projections renamed.)

`mode` picks "spatial", "channel", or "dual": DaViT's pair of blocks (spatial first, then channel) inside one layer,

          s = spatial(x),   y = s + channel(x + s),

so that a residual block x + y = h + channel(h) with h = x + spatial(x): the two attention sub-steps in sequence
(DaViT also puts a feed-forward network and convolutional position encodings between them; models alternate
"spatial" and "channel" layers for the exact arrangement).

Shapes: x [B, *spatial, E] -> same (1-D, 2-D or 3-D grids). Time O(B N (prod(w) + head_dim) H D), memory
O(B N prod(w) H + B H D^2). mode="spatial" with window_size = the grid is plain softmax attention. Captured
weights: the spatial attention's [B, H, N, N] (channel attention has no token-by-token matrix). No causal masking,
no decoding.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from attn import functional as F
from attn.core.layer import AttentionCall, SpatialAttentionLayer
from attn.core.masks import Mask
from attn.core.neighborhood import IntPerAxis, per_axis
from attn.core.validation import choice, int_or_pair, optional, positive, positive_int
from attn.core.windows import window_plan
from attn.local.window import WindowAttention
from attn.registry import register

Array = jax.Array

MODES = ("spatial", "channel", "dual")


class ChannelGroupAttention(SpatialAttentionLayer):
    """DaViT's channel group attention: x [B, *spatial, E] -> same; the heads are the channel groups."""

    scale: float | None = None

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.num_kv_heads not in (None, self.num_heads):
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} is not supported by channel group attention (every channel "
                f"group has its own keys); use None or num_heads={self.num_heads}"
            )

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q, k, v [B, *S, H, C_g] -> [B, *S, H, C_g]: per group, softmax attention among its C_g channel tokens
        whose features are the N positions."""
        batch, *spatial, heads, head_dim = q.shape
        # Channel tokens: [B, C_g tokens, groups, N features], so softmax attention runs over channels.
        tokens = [t.reshape(batch, -1, heads, head_dim).transpose(0, 3, 2, 1) for t in (q, k, v)]
        out = F.softmax_attention(
            *tokens,
            scale=head_dim**-0.5 if self.scale is None else self.scale,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            implementation=self.implementation,
        )
        return out.transpose(0, 3, 2, 1).reshape(batch, *spatial, heads, head_dim)


@register(
    "davit",
    family="local",
    paper="DaViT: Dual Attention Vision Transformers",
    catalog=144,
    input_kind="spatial",
    supports_causal=False,
    supports_decode=False,
    summary="DaViT dual attention: channel group attention (channels as tokens) and spatial window attention",
    option_docs={
        "mode": "'spatial' (window attention), 'channel' (channel group attention) or 'dual' (spatial then channel)",
        "window_size": "spatial window per axis (int or tuple), clipped to the grid (DaViT uses 7)",
        "scale": "logit scale of both attentions (None = 1/sqrt(head_dim); for channels head_dim = C_g)",
    },
    fidelity="paper",
    reference="DaViT paper: channel group attention and spatial window attention (the official code's channel "
    "attention is the same function with the projections renamed)",
    validators={"mode": choice(*MODES), "window_size": int_or_pair(positive_int), "scale": optional(positive)},
    supports_gqa=False,
)
class DaViTAttention(SpatialAttentionLayer):
    """Dual attention: x [B, *spatial, E] -> [B, *spatial, E]."""

    mode: str = "dual"
    window_size: IntPerAxis = 7
    scale: float | None = None

    # DaViT's layer is two attention layers in sequence with a residual between them (s = spatial(x), y = s +
    # channel(x + s)), each with its own projections: it composes two template layers (each runs its own stages,
    # head_outputs included, under the paths "spatial" and "channel") instead of one pass of the template.
    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        context: Array | None = None,
        mask: Mask | None = None,
        positions: Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> Array:
        """x [B, *spatial, E] -> [B, *spatial, E]."""
        call = AttentionCall(
            x=x, context=context, mask=mask, positions=positions, decode=decode, deterministic=deterministic
        )
        self.validate(call)
        spatial = tuple(x.shape[1:-1])
        window = per_axis("window_size", self.window_size, len(spatial), int)
        common = dict(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            dropout_rate=self.dropout_rate,
            use_bias=self.use_bias,
            capture=self.capture,
            implementation=self.implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale=self.scale,
        )
        if self.mode != "channel":
            clipped = window_plan(spatial, window, clip=True, window_name="window_size")[0]
            spatial_attention = WindowAttention(window_size=clipped, rpb=False, name="spatial", **common)
            s = spatial_attention(x, deterministic=deterministic)
            if self.mode == "spatial":
                return s
        channel = ChannelGroupAttention(name="channel", **common)
        if self.mode == "channel":
            return channel(x, deterministic=deterministic)
        return s + channel(x + s, deterministic=deterministic)
