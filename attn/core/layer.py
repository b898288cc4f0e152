"""The base every sequence attention layer builds on: q/k/v/o projections with logical axis names, positions,
the KV cache and attention-weight capture.

`SpatialAttentionLayer` is the base of layers over a token grid x [batch, *spatial, embed] (1 to 3 axes): the
same projections, applied to the flattened tokens so the logical names apply.

The uniform layer call is

    layer(x, *, context=None, mask=None, positions=None, decode=False, deterministic=True)

with x [batch, length, embed] -> [batch, length, embed]. Subclasses change `attend` (how q, k, v become the
per-head output), or the projections, and keep the rest.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import kv_cache
from attn.core.masks import Mask
from attn.core.validation import check_gqa, check_rank

Array = jax.Array


class HeadProjection(nn.Module):
    """x [..., E] -> [..., heads, head_dim]. The kernel is created in its final 3-D shape so that its logical axis
    names apply under `nn.logical_axis_rules` (nn.DenseGeneral initialises a flat 2-D kernel)."""

    heads: int
    head_dim: int
    heads_axis: str = "heads"
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), ("embed", self.heads_axis, "head_dim")
            ),
            (x.shape[-1], self.heads, self.head_dim),
            self.param_dtype,
        )
        y = jnp.einsum("...e,ehd->...hd", x.astype(self.dtype), jnp.asarray(kernel, self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.heads_axis, "head_dim")),
                (self.heads, self.head_dim),
                self.param_dtype,
            )
            y = y + jnp.asarray(bias, self.dtype)
        return y


class OutputProjection(nn.Module):
    """y [..., H, Dv] -> [..., features] with kernel [H, Dv, features] named ("heads", "head_dim", "embed")."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: Array) -> Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "head_dim", "embed")
            ),
            (y.shape[-2], y.shape[-1], self.features),
            self.param_dtype,
        )
        out = jnp.einsum("...hd,hde->...e", y.astype(self.dtype), jnp.asarray(kernel, self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (self.features,),
                self.param_dtype,
            )
            out = out + jnp.asarray(bias, self.dtype)
        return out


class AttentionLayer(nn.Module):
    """Fields shared by every sequence attention mechanism (see attn.registry.COMMON_OPTION_DOCS)."""

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    dropout_rate: float = 0.0
    use_bias: bool = False
    capture: bool = False
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # ------------------------------------------------------------------ checks
    @property
    def kv_heads(self) -> int:
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        check_gqa(self.num_heads, kv)
        return kv

    def check_input(self, x: Array, context: Array | None) -> None:
        check_rank("x", x, 3, "[batch, length, embed]")
        if context is not None:
            check_rank("context", context, 3, "[batch, context_length, embed]")
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"context batch {context.shape[0]} != x batch {x.shape[0]}")
        if self.num_heads <= 0 or self.head_dim <= 0:
            raise ValueError(f"num_heads={self.num_heads} and head_dim={self.head_dim} must be positive")
        _ = self.kv_heads

    # ------------------------------------------------------------------ projections
    def dense_heads(self, x: Array, heads: int, heads_axis: str, name: str) -> Array:
        """[B, T, E] -> [B, T, heads, head_dim]; kernel [E, heads, head_dim] named ("embed", heads_axis, "head_dim")."""
        y = HeadProjection(
            heads=heads,
            head_dim=self.head_dim,
            heads_axis=heads_axis,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)
        return nn.with_logical_constraint(y, ("batch", "length", heads_axis, "head_dim"))

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        source = x if context is None else context
        q = self.dense_heads(x, self.num_heads, "heads", "query")
        k = self.dense_heads(source, self.kv_heads, "kv_heads", "key")
        v = self.dense_heads(source, self.kv_heads, "kv_heads", "value")
        return q, k, v

    def project_out(self, y: Array, features: int) -> Array:
        """[B, T, H, Dv] -> [B, T, features] with kernel [H, Dv, features] named ("heads", "head_dim", "embed")."""
        out = OutputProjection(
            features=features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="out"
        )(y)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def head_norm(self, x: Array, name: str) -> Array:
        """RMS norm over head_dim with a learned scale ("head_dim",) (QK-norm)."""
        return nn.RMSNorm(
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)

    # ------------------------------------------------------------------ positions, cache, capture
    def query_positions(self, positions: Array | None, batch: int, length: int, offset: Any) -> Array:
        """int32 [B, T]: the given positions, or offset + arange(T)."""
        if positions is not None:
            positions = jnp.asarray(positions, jnp.int32)
            if positions.shape[-1] != length:
                raise ValueError(f"positions has shape {positions.shape}; expected [batch, {length}] to match x")
            return jnp.broadcast_to(positions if positions.ndim == 2 else positions[None], (batch, length))
        return jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))

    def wants_weights(self) -> bool:
        return self.capture or self.is_mutable_collection("intermediates")

    def dropout_rng(self, deterministic: bool) -> Array | None:
        if deterministic or self.dropout_rate == 0.0:
            return None
        return self.make_rng("dropout")

    def cache_write(self, k: Array, v: Array, mask: Mask | None) -> tuple[Array, Array, Mask | None, Any]:
        """Decode step: writes k, v into the cache; returns (keys, values, mask, q_offset) to attend with."""
        keys, values, start = kv_cache.write(self, k, v)
        if start is None:  # the creating call: an ordinary forward
            return k, v, mask, 0
        return keys, values, kv_cache.decode_mask(mask, k.shape[0], start, k.shape[1]), start


class SpatialAttentionLayer(AttentionLayer):
    """Base of layers whose input is a token grid x [B, *spatial, E] (1 to 3 spatial axes) -> [B, *spatial, E]."""

    def check_input(self, x: Array, context: Array | None) -> None:
        check_rank("x", x, (3, 4, 5), "[batch, *spatial (1 to 3 axes), embed]")
        if context is not None:
            raise ValueError(
                f"context is not supported by the spatial layer {type(self).__name__} (self-attention over the "
                f"token grid only), got a context of shape {context.shape}"
            )
        if self.num_heads <= 0 or self.head_dim <= 0:
            raise ValueError(f"num_heads={self.num_heads} and head_dim={self.head_dim} must be positive")
        _ = self.kv_heads

    def check_call(self, mask: Mask | None, positions: Array | None, decode: bool) -> None:
        name = type(self).__name__
        if decode:
            raise ValueError(f"decode=True is not supported by the spatial layer {name} (it has no KV cache)")
        if mask is not None:
            raise ValueError(
                f"mask is not supported by the spatial layer {name}; its pattern comes from its options "
                "(e.g. causal=True)"
            )
        if positions is not None:
            raise ValueError(f"positions is not supported by the spatial layer {name}; got shape {positions.shape}")

    def spatial_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """x [B, *S, E] -> q [B, *S, H, D], k and v [B, *S, KVH, D] (projected on the flattened tokens)."""
        batch, *spatial, features = x.shape
        q, k, v = self.project_qkv(x.reshape(batch, math.prod(spatial), features), None)
        return (
            q.reshape(batch, *spatial, *q.shape[-2:]),
            k.reshape(batch, *spatial, *k.shape[-2:]),
            v.reshape(batch, *spatial, *v.shape[-2:]),
        )

    def spatial_out(self, y: Array, features: int) -> Array:
        """y [B, *S, H, Dv] -> [B, *S, features]."""
        batch, *spatial = y.shape[:-2]
        tokens = math.prod(spatial)
        out = self.project_out(y.reshape(batch, tokens, *y.shape[-2:]), features)
        return out.reshape(batch, *spatial, features)
