"""`medusa`: multi-scale encoder-decoder self-attention ([77] Aboutalebi, Pavlova, Gunraj, Shafiee, Sabri, Alaref,
Wong, "MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical Image
Analysis", Front. Med. 2022).

The paper's idea: instead of many small, isolated attention modules, one high-capacity self-attention body whose
heads feed different scales ("single body, multi-scale heads"), giving global context shared across scales while
each scale keeps its own local attention. Its text beyond the abstract and its code could not be found (the search
corpora hold only the abstract), so the layout below is a reconstruction (fidelity "reconstructed", experimental):

    P_r(x)  average pooling of x [B, H, W, C] to an r x r grid
    body    t = P_G(x) W_in  (G x G tokens of width E = body_heads * body_head_dim)
            t = t + MHSA(LN(t)),  t = t + MLP(LN(t))                          (encoder: global self-attention)
    decoder d_0 = t;   d_l = up2(d_{l-1}) + P_{G 2^l}(x) W_skip_l,  l = 1 .. L-1   (coarse to fine, U-Net skips)
    heads   m_l = d_l W_head_l  [B, G 2^l, G 2^l, C]                           (one attention head per scale)
    out     x ⊙ sigmoid(sum_l up(m_l))                                        (up: nearest to H x W)

so one body feeds L scale heads, each adding its own local context (the skip from x at its resolution). The body
is its own module (`MedusaBody`, submodule "body"); `__call__(x, body=tokens)` reads a body computed elsewhere. In
`attn.models.cnn.CNN` (share_attention_body=True, the default) the network computes ONE body on its stem's output
(parameters "medusa_body") and every block's heads read it, each block adding the skips of its own feature map:
the paper's single body feeding heads at the different levels of the network. share_attention_body=False gives
every block its own body (the module used alone behaves that way).

With the heads' kernels and biases at zero the gate is sigmoid(0) = 1/2 everywhere (out = x / 2).
Shapes: x [B, H, W, C] -> [B, H, W, C]; H and W must be multiples of G 2^(L-1).
Time O(B (H W C + G^4 E + G^2 E^2 + 4^L G^2 E C)), memory O(B (H W C + G^4 heads)). The body's attention
weights [B, heads, G^2, G^2] (intermediates "body/attention_weights", or "medusa_body/attention_weights" of the CNN)
and the gate [B, H, W, C] ("attention_map") are sown when that collection is mutable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.conv import check_nhwc
from attn.core.options import check_options
from attn.core.validation import positive_int
from attn.registry import register

Array = jax.Array


def average_pool_to(x: Array, size: int) -> Array:
    """x [B, H, W, C] -> [B, size, size, C], the mean of each (H / size) x (W / size) block."""
    batch, height, width, channels = x.shape
    blocks = x.reshape(batch, size, height // size, size, width // size, channels)
    return blocks.mean(axis=(2, 4))


def upsample_nearest(x: Array, height: int, width: int) -> Array:
    """x [B, h, w, C] -> [B, height, width, C] by repeating each cell (height / h) x (width / w) times."""
    return jnp.repeat(jnp.repeat(x, height // x.shape[1], axis=1), width // x.shape[2], axis=2)


class _Dense:
    """The dense and norm layers of MEDUSA's body and heads (kernels named by their logical axes)."""

    def dense(self, x: Array, features: int, axes: tuple[str, str], name: str) -> Array:
        """x [..., in] -> [..., features] with kernel named `axes` and bias named (axes[1],)."""
        return nn.Dense(
            features,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)

    def norm(self, x: Array, name: str) -> Array:
        return nn.LayerNorm(
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)


class MedusaBody(_Dense, nn.Module):
    """MEDUSA's single body: x [B, H, W, C] -> body tokens [B, G, G, E] (pool to G x G, embed, self-attention, MLP).

    H and W must be multiples of `grid`."""

    body_heads: int = 4
    body_head_dim: int = 8
    grid: int = 4
    mlp_ratio: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def self_attention(self, t: Array) -> Array:
        """t [B, N, E] -> [B, N, E]: multi-head softmax self-attention over the body's tokens."""
        heads, dim = self.body_heads, self.body_head_dim
        q, k, v = (self.dense(t, heads * dim, ("embed", "mlp"), name) for name in ("query", "key", "value"))
        q, k, v = (a.reshape(*a.shape[:2], heads, dim) for a in (q, k, v))
        compute = jnp.promote_types(self.dtype, jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute), k.astype(compute)) * dim**-0.5
        weights = jax.nn.softmax(logits, axis=-1)
        self.sow("intermediates", "attention_weights", weights)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(compute)).astype(self.dtype)
        return self.dense(y.reshape(*y.shape[:2], heads * dim), t.shape[-1], ("mlp", "embed"), "out")

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = check_nhwc(x)
        g, width_e = self.grid, self.body_heads * self.body_head_dim
        if height % g or width % g:
            raise ValueError(f"x has spatial shape {(height, width)}; expected multiples of grid={g}")
        x = x.astype(self.dtype)
        t = self.dense(average_pool_to(x, g).reshape(batch, g * g, channels), width_e, ("channels", "embed"), "embed")
        t = t + self.self_attention(self.norm(t, "attention_norm"))
        hidden = nn.gelu(self.dense(self.norm(t, "mlp_norm"), self.mlp_ratio * width_e, ("embed", "mlp"), "mlp_in"))
        t = t + self.dense(hidden, width_e, ("mlp", "embed"), "mlp_out")
        return t.reshape(batch, g, g, width_e)


BODY_FIELDS = ("body_heads", "body_head_dim", "grid", "mlp_ratio")


@register(
    "medusa",
    family="channel",
    paper="MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical Image "
    "Analysis",
    catalog=77,
    input_kind="channels",
    supports_causal=False,
    supports_decode=False,
    summary="one global self-attention body on a pooled grid, decoded coarse-to-fine into one gate head per scale",
    option_docs={
        "body_heads": "heads of the body's self-attention",
        "body_head_dim": "size of each head (body width E = body_heads * body_head_dim)",
        "grid": "the body's token grid G (x is average-pooled to G x G)",
        "levels": "decoder levels L: scale heads at G, 2G, ..., G 2^(L-1)",
        "mlp_ratio": "hidden width of the body's MLP, as a multiple of E",
    },
    fidelity="reconstructed",
    reference="abstract only (arXiv 2110.06063 / Front. Med. 2022, doi 10.3389/fmed.2021.821120): 'single body, "
    "multi-scale heads' self-attention; the body/decoder/head layout is a reconstruction (shared/catalog [77])",
    validators={
        "body_heads": positive_int,
        "body_head_dim": positive_int,
        "grid": positive_int,
        "levels": positive_int,
        "mlp_ratio": positive_int,
    },
)
class MEDUSA(_Dense, nn.Module):
    """Multi-scale encoder-decoder self-attention gate. x [B, H, W, C] -> x ⊙ gate, same shape and dtype.

    `__call__(x, body=None)`: `body` [B, G, G, E] are the tokens of a body shared by the network (`shared_body`;
    attn.models.cnn.CNN computes one on its stem output and gives it to every block); None runs this module's own
    body on x."""

    body_heads: int = 4
    body_head_dim: int = 8
    grid: int = 4
    levels: int = 2
    mlp_ratio: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def body_options(cls, **options: Any) -> dict[str, Any]:
        """The fields of the body that a block built with `options` (attn.build options) reads."""
        fields = {key: getattr(cls, key) for key in (*BODY_FIELDS, "dtype", "param_dtype")}
        return {**fields, **{key: value for key, value in options.items() if key in fields}}

    @classmethod
    def shared_body(cls, name: str, **options: Any) -> MedusaBody:
        """The body a network shares between its MEDUSA blocks, from one block's options."""
        return MedusaBody(**cls.body_options(**options), name=name)

    @nn.compact
    def __call__(self, x: Array, body: Array | None = None) -> Array:
        batch, height, width, channels = check_nhwc(x)
        check_options(self)
        finest = self.grid * 2 ** (self.levels - 1)
        if height % finest or width % finest:
            raise ValueError(
                f"x has spatial shape {(height, width)}; expected multiples of grid * 2^(levels - 1) = {finest} "
                f"(grid={self.grid}, levels={self.levels})"
            )
        x = x.astype(self.dtype)
        width_e, g = self.body_heads * self.body_head_dim, self.grid
        if body is None:
            body = MedusaBody(
                **{key: getattr(self, key) for key in (*BODY_FIELDS, "dtype", "param_dtype")}, name="body"
            )(x)
        elif body.shape != (batch, g, g, width_e):
            raise ValueError(
                f"body has shape {tuple(body.shape)}; expected [batch, grid, grid, body_heads * body_head_dim] = "
                f"{(batch, g, g, width_e)}"
            )
        d = body.astype(self.dtype)
        logits = jnp.zeros_like(x)
        for level in range(self.levels):
            if level:
                size = g * 2**level
                skip = self.dense(average_pool_to(x, size), width_e, ("channels", "embed"), f"skip_{level}")
                d = upsample_nearest(d, size, size) + skip
            head = self.dense(d, channels, ("embed", "channels"), f"head_{level}")
            logits = logits + upsample_nearest(head, height, width)
        gate = jax.nn.sigmoid(logits)
        self.sow("intermediates", "attention_map", gate)
        return (x * gate).astype(self.dtype)
