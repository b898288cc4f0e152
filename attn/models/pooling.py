"""How the classifiers reduce tokens to one vector: a built-in pool or any registered "pooling" mechanism.

    x [B, T, E] (+ lengths int [B]) -> pooled [B, F]

"mean" is the masked mean over valid tokens (and "cls", for the ViT, the class token, handled there). Any
registry name whose input kind is "pooling" (e.g. "attentive_pooling" [41], "low_rank_pooling" [65]) is built
with `attn.build(name, num_heads=..., head_dim=..., **pool_options)` and called with the padding mask, so an
encoder or a ViT can be probed with an attentive pooling head by config alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.core.padding import valid_tokens


def check_pool(pool: str, builtin: tuple[str, ...]) -> None:
    """ValueError unless `pool` is one of `builtin` or a registered mechanism of input kind "pooling"."""
    if pool in builtin:
        return
    poolers = [name for name in attn.list_mechanisms() if attn.get(name).input_kind == "pooling"]
    if pool not in poolers:
        raise ValueError(f"pool={pool!r} is not supported; expected one of {list(builtin) + poolers}")


def pool_tokens(
    owner: nn.Module,
    x: jax.Array,
    *,
    pool: str,
    lengths: jax.Array | None,
    num_heads: int,
    head_dim: int,
    pool_options: Mapping[str, Any],
    dtype: Any,
    param_dtype: Any,
) -> jax.Array:
    """Pooled features float32 [B, F]: the masked mean (pool="mean") or the named pooling mechanism.

    `owner` is the calling model, inside its compact `__call__`: the pooling mechanism becomes its submodule "pool".
    """
    if pool == "mean":
        valid = valid_tokens(lengths, x.shape[0], x.shape[1])
        # where (not multiply) so that whatever the padded rows hold never reaches the mean.
        summed = jnp.where(valid[..., None], x, 0).sum(axis=1, dtype=jnp.float32)
        return summed / jnp.maximum(valid.sum(axis=1, keepdims=True), 1)
    mask = None if lengths is None else attn.Mask(kv_lengths=lengths)
    options = {"num_heads": num_heads, "head_dim": head_dim, "dtype": dtype, "param_dtype": param_dtype}
    layer = attn.build(pool, **options, **dict(pool_options)).clone(parent=owner, name="pool")
    return layer(x, mask=mask).astype(jnp.float32)
