"""Autoregressive KV cache kept in the flax "cache" collection.

Flax convention: the first call with decode=True, when no cache exists yet, creates a zero cache whose length is
the length of that call's input (so `model.init(rng, tokens[:, :max_len], decode=True)` or
`attn.models.init_cache` sizes it) and computes an ordinary forward. Every later decode call writes its chunk
[B, L, KVH, D] at `cache_index`, attends over the filled part and advances the index by L.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.masks import Mask

Array = jax.Array


def cache_is_initialized(module: nn.Module) -> bool:
    return module.has_variable("cache", "cached_key")


def current_index(module: nn.Module) -> Array | int:
    """The index the next chunk will be written at (0 while the cache is being created)."""
    if not cache_is_initialized(module):
        return 0
    return module.get_variable("cache", "cache_index")


def write(module: nn.Module, k: Array, v: Array) -> tuple[Array, Array, Array | None]:
    """Stores k, v [B, L, KVH, D] at the cache index.

    Returns (all keys, all values, index before the write); the index is None on the creating call, when the
    given k, v are returned unchanged.
    """
    initialized = cache_is_initialized(module)
    cached_k = module.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = module.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = module.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
        return k, v, None
    start = index.value
    cached_k.value = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k.astype(cached_k.value.dtype), start, 1)
    cached_v.value = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v.astype(cached_v.value.dtype), start, 1)
    index.value = start + k.shape[1]
    return cached_k.value, cached_v.value, start


def decode_mask(mask: Mask | None, batch: int, start: Array, length: int) -> Mask:
    """Restricts `mask` to the filled part of the cache (keys before start + length)."""
    if mask is not None and mask.q_segment_ids is not None:
        raise ValueError("segment ids are not supported with decode=True (decode one sequence per batch row)")
    filled = jnp.full((batch,), start + length, jnp.int32)
    mask = mask if mask is not None else Mask()
    if mask.kv_lengths is not None:
        filled = jnp.minimum(filled, jnp.asarray(mask.kv_lengths, jnp.int32))
    return mask.replace(kv_lengths=filled)
