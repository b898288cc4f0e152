"""Transformer block whose attention layers are registered mechanisms, chosen by name.

norm_position="pre" (default):
    x = x + dropout(attention(norm(x), mask, positions, decode))
    x = x + dropout(cross_attention(norm(x), context, context_mask, decode))     (only with cross_attention set)
    x = x + dropout(mlp(norm(x)))
norm_position="post" (BERT, the original Transformer): x = norm(x + dropout(sublayer(x))) for each sublayer.

The self-attention submodule is named `attention` and the cross-attention one `cross_attention`, so their sown
probabilities land at `intermediates/.../layers_<i>/attention/attention_weights` and
`.../layers_<i>/cross_attention/attention_weights`, their caches at `cache/.../layers_<i>/attention` and
`cache/.../layers_<i>/cross_attention`, and intervention selectors name them by these paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.core.validation import check_choice
from attn.models.layers import ACTIVATION_AXES, Mlp, make_norm

Dtype = Any

# Options the block sets itself; passing them again through attention_options would be ambiguous.
RESERVED_OPTIONS = ("num_heads", "head_dim", "num_kv_heads", "dropout_rate", "dtype", "param_dtype")

# Where the block normalises: before each sublayer (pre-norm) or after each residual sum (post-norm).
NORM_POSITIONS = ("pre", "post")

# Input kinds a transformer block can feed: a token sequence, or (for ViT) the patch grid.
BLOCK_INPUT_KINDS = ("sequence", "spatial")

# Input kinds a cross-attention sublayer can feed: "cross" mechanisms, and "sequence" mechanisms that project
# their keys and values from `context` (the softmax family does, see attn.core.layer.AttentionLayer.project_qkv).
CROSS_INPUT_KINDS = ("sequence", "cross")


def check_mechanism(name: str, *, grid: tuple[int, ...] | None = None) -> str:
    """Return the registry input kind of mechanism `name`, or raise ValueError if a block cannot host it.

    "channels" and "cross" mechanisms have no place in a self-attention block; "spatial" ones need the
    patch grid (`grid`), which only the ViT provides.
    """
    kind = attn.get(name).input_kind
    if kind not in BLOCK_INPUT_KINDS:
        raise ValueError(
            f"attention={name!r} has input kind {kind!r}; a transformer block accepts only mechanisms of "
            f"kind {list(BLOCK_INPUT_KINDS)}"
        )
    if kind == "spatial" and grid is None:
        raise ValueError(
            f"attention={name!r} has input kind 'spatial' and needs a patch grid; use it in a ViT "
            "with pool='mean', not in a sequence model"
        )
    return kind


def check_cross_mechanism(name: str) -> str:
    """Return the input kind of mechanism `name`, or raise ValueError if it cannot be a cross-attention sublayer."""
    kind = attn.get(name).input_kind
    if kind not in CROSS_INPUT_KINDS:
        raise ValueError(
            f"cross_attention={name!r} has input kind {kind!r}; a cross-attention sublayer accepts only "
            f"mechanisms of kind {list(CROSS_INPUT_KINDS)}"
        )
    return kind


def _check_options(field: str, name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    clash = sorted(set(options) & set(RESERVED_OPTIONS))
    if clash:
        raise ValueError(
            f"{field} for {name!r} set {clash}; these come from the model fields "
            "(num_heads, head_dim, num_kv_heads, dropout_rate, dtype, param_dtype)"
        )
    return options


class TransformerBlock(nn.Module):
    """One block: x [B, T, E] -> [B, T, E] in `dtype`.

    mechanism / attention_options: registry name of the self-attention and its extra options for `attn.build`.
    cross_attention / cross_attention_options: registry name (input kind "cross", or a "sequence" mechanism that
      takes its keys and values from `context`) and options of an optional cross-attention sublayer; None means
      a block without one.
    grid: (h, w) patch grid with h * w == T, required by "spatial" mechanisms, which see x as [B, h, w, E].
    norm_eps: epsilon of the norms; mlp_bias: biases in the feed-forward projections.
    norm_position: "pre" or "post" (see the module docstring); the norms keep their names either way.
    """

    mechanism: str
    num_heads: int
    head_dim: int
    mlp_dim: int
    attention_options: Mapping[str, Any] = None  # type: ignore[assignment]
    cross_attention: str | None = None
    cross_attention_options: Mapping[str, Any] = None  # type: ignore[assignment]
    num_kv_heads: int | None = None
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"
    mlp_bias: bool = False
    norm_position: str = "pre"
    dropout_rate: float = 0.0
    grid: tuple[int, ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _attention_layer(self, name: str, options: dict[str, Any], module_name: str) -> nn.Module:
        layer = attn.build(
            name,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **options,
        )
        return layer.clone(parent=self, name=module_name)

    def _norm(self, name: str) -> nn.Module:
        return make_norm(self.norm, dtype=self.dtype, param_dtype=self.param_dtype, name=name, epsilon=self.norm_eps)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: attn.Mask | None = None,
        positions: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: attn.Mask | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """x [B, T, E]; context [B, Tc, Ec] for the cross-attention sublayer, with `context_mask` an attn.Mask
        over (x, context) pairs (e.g. kv_lengths of a padded context). Returns [B, T, E]."""
        input_kind = check_mechanism(self.mechanism, grid=self.grid)
        options = _check_options("attention_options", self.mechanism, self.attention_options)
        if self.cross_attention is None and (context is not None or context_mask is not None):
            raise ValueError("context / context_mask were given but this block has no cross_attention sublayer")
        dropout = nn.Dropout(self.dropout_rate)

        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        post = self.norm_position == "post"

        def sublayer_input(x: jax.Array, norm_name: str) -> jax.Array:
            return x if post else self._norm(norm_name)(x)

        def residual(x: jax.Array, h: jax.Array, norm_name: str) -> jax.Array:
            x = x + dropout(h, deterministic=deterministic)
            if post:
                x = self._norm(norm_name)(x)
            return nn.with_logical_constraint(x, ACTIVATION_AXES)

        # The submodule names are the paths models promise for sown weights, caches and interventions.
        attention = self._attention_layer(self.mechanism, options, "attention")
        h = sublayer_input(x, "attention_norm")
        if input_kind == "spatial":
            batch, length, features = h.shape
            if length != math.prod(self.grid):
                raise ValueError(f"grid={self.grid} does not cover the sequence length {length}")
            h = attention(h.reshape(batch, *self.grid, features), deterministic=deterministic)
            h = h.reshape(batch, length, features)
        else:
            h = attention(h, mask=mask, positions=positions, decode=decode, deterministic=deterministic)
        x = residual(x, h, "attention_norm")

        if self.cross_attention is not None:
            h = sublayer_input(x, "cross_attention_norm")
            h = self._cross_attend(h, context, context_mask, decode, deterministic)
            x = residual(x, h, "cross_attention_norm")

        h = Mlp(
            self.mlp_dim,
            self.mlp,
            use_bias=self.mlp_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="feed_forward",
        )(sublayer_input(x, "mlp_norm"))
        return residual(x, h, "mlp_norm")

    def _cross_attend(
        self,
        h: jax.Array,
        context: jax.Array | None,
        context_mask: attn.Mask | None,
        decode: bool,
        deterministic: bool,
    ) -> jax.Array:
        """The cross-attention sublayer on normalised h [B, T, E] -> [B, T, E]."""
        name = self.cross_attention
        check_cross_mechanism(name)
        options = _check_options("cross_attention_options", name, self.cross_attention_options)
        if context is None or context.ndim != 3:
            shape = None if context is None else context.shape
            raise ValueError(f"cross_attention={name!r} needs context [batch, context_length, embed]; got {shape}")
        layer = self._attention_layer(name, options, "cross_attention")
        try:
            return layer(h, context=context, mask=context_mask, decode=decode, deterministic=deterministic)
        except (TypeError, ValueError) as error:
            # Which mechanisms can attend to a context is not a registry claim: the layer itself decides, and
            # its refusal is reported here with the mechanism's name and the call that failed.
            during = " with decode=True" if decode else ""
            raise ValueError(
                f"cross_attention={name!r} cannot attend to a context of shape {context.shape}{during}: {error} "
                "(a cross-attention sublayer needs a mechanism of input kind 'cross', or a 'sequence' mechanism "
                "that projects its keys and values from `context`, as the softmax family does)"
            ) from error
