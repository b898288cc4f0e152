"""Pre-norm transformer block whose attention layer is any registered mechanism, chosen by name.

    x = x + dropout(attention(norm(x), mask, positions, decode))
    x = x + dropout(mlp(norm(x)))

The attention submodule is named `attention`, so its sown probabilities land at
`intermediates/.../layers_<i>/attention/attention_weights` and its KV cache at `cache/.../attention`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.models.layers import ACTIVATION_AXES, Mlp, make_norm

Dtype = Any

# Options the block sets itself; passing them again through attention_options would be ambiguous.
RESERVED_OPTIONS = ("num_heads", "head_dim", "num_kv_heads", "dropout_rate", "dtype", "param_dtype")

# Input kinds a transformer block can feed: a token sequence, or (for ViT) the patch grid.
BLOCK_INPUT_KINDS = ("sequence", "spatial")


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


class TransformerBlock(nn.Module):
    """One pre-norm block: x [B, T, E] -> [B, T, E] in `dtype`.

    mechanism / attention_options: registry name and its extra options for `attn.build`.
    grid: (h, w) patch grid with h * w == T, required by "spatial" mechanisms, which see x as [B, h, w, E].
    """

    mechanism: str
    num_heads: int
    head_dim: int
    mlp_dim: int
    attention_options: Mapping[str, Any] = None  # type: ignore[assignment]
    num_kv_heads: int | None = None
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    dropout_rate: float = 0.0
    grid: tuple[int, ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.input_kind = check_mechanism(self.mechanism, grid=self.grid)
        options = dict(self.attention_options or {})
        clash = sorted(set(options) & set(RESERVED_OPTIONS))
        if clash:
            raise ValueError(
                f"attention_options for {self.mechanism!r} set {clash}; these come from the model fields "
                "(num_heads, head_dim, num_kv_heads, dropout_rate, dtype, param_dtype)"
            )
        # The attribute name is the submodule name: "attention" is the path models promise for sown weights.
        self.attention = attn.build(
            self.mechanism,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **options,
        )
        self.attention_norm = make_norm(self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
        self.mlp_norm = make_norm(self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
        self.feed_forward = Mlp(self.mlp_dim, self.mlp, dtype=self.dtype, param_dtype=self.param_dtype)
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: attn.Mask | None = None,
        positions: jax.Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        h = self.attention_norm(x)
        if self.input_kind == "spatial":
            batch, length, features = h.shape
            if length != math.prod(self.grid):
                raise ValueError(f"grid={self.grid} does not cover the sequence length {length}")
            h = self.attention(h.reshape(batch, *self.grid, features), deterministic=deterministic)
            h = h.reshape(batch, length, features)
        else:
            h = self.attention(h, mask=mask, positions=positions, decode=decode, deterministic=deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        h = self.feed_forward(self.mlp_norm(x))
        x = x + self.dropout(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)
