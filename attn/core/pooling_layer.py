"""The base of the attentive-pooling heads (input kind "pooling"): x [batch, length, embed] -> one vector per row.

`PoolingLayer.__call__` keeps the uniform layer call and owns what every pooling head does before it pools: check
x and the options, refuse a context and decode=True (a pooling head summarises x; it has no cache), and read the
padding lengths from the mask (`attn.core.padding.padding_lengths`: only padding can apply to a reduction over the
whole sequence). A mechanism implements `pool(x, lengths, deterministic)` -> [batch, features].
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from attn.core.layer import AttentionLayer
from attn.core.masks import Mask
from attn.core.padding import padding_lengths

Array = jax.Array


class PoolingLayer(AttentionLayer):
    """Base of pooling heads: `__call__(x [B, N, E], *, mask=None, ...)` -> `pool(x, lengths, deterministic)`.

    mask: an attn.Mask holding only padding lengths. context, positions and decode are not supported (positions
    is accepted for the uniform interface and ignored). `mechanism_name` names the mechanism in error messages.
    """

    mechanism_name: ClassVar[str]

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
        self.check_input(x, context)
        self.check_options()
        if context is not None or decode:
            raise ValueError(f"{self.mechanism_name} pools its input x; context and decode=True are not supported")
        return self.pool(x, padding_lengths(mask, x.shape[0], self.mechanism_name), deterministic)

    def pool(self, x: Array, lengths: Array | None, deterministic: bool) -> Array:
        """x [B, N, E], lengths int [B] valid tokens (or None) -> the pooled [B, features]."""
        raise NotImplementedError(f"{type(self).__name__} must implement pool(x, lengths, deterministic)")
