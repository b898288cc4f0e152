"""The dense KV cache: every token's keys and values, in order, on the cache protocol (`attn.core.cache.KVCache`).

Flax convention: the first call with decode=True, when no cache exists yet, creates a zero cache whose length is
the length of that call's input (so `model.init(rng, tokens[:, :max_len], decode=True)` or
`attn.models.init_cache` sizes it) and computes an ordinary forward. Every later decode call writes its chunk
[B, L, KVH, D] at `cache_index`, attends over the filled part and advances the index by L. The dense cache stores
only keys, values and the index (variables "cached_key", "cached_value", "cache_index"); its per-head lengths are
the index and its positions 0..index-1 (`KVCache.filled`, `KVCache.slot_positions`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.masks import Mask

Array = jax.Array


def cache_is_initialized(module: nn.Module) -> bool:
    return module.has_variable("cache", cache_lib.KV_VARIABLES["keys"])


def current_index(module: nn.Module) -> Array | int:
    """The index the next chunk will be written at (0 while the cache is being created)."""
    if not cache_is_initialized(module):
        return 0
    return module.get_variable("cache", cache_lib.KV_VARIABLES["index"])


def write(module: nn.Module, k: Array, v: Array) -> tuple[Array, Array, Array | None]:
    """Stores k, v [B, L, KVH, D] at the cache index.

    Returns (all keys, all values, index before the write); the index is None on the creating call, when the
    given k, v are returned unchanged.
    """
    cache = cache_lib.load(module)
    if cache is None:
        cache_lib.store(module, cache_lib.empty_kv(k, v, k.shape[1]))
        return k, v, None
    start = cache.index
    keys = jax.lax.dynamic_update_slice_in_dim(cache.keys, k.astype(cache.keys.dtype), start, 1)
    values = jax.lax.dynamic_update_slice_in_dim(cache.values, v.astype(cache.values.dtype), start, 1)
    cache_lib.store(module, cache.replace(keys=keys, values=values, index=start + k.shape[1]))
    return keys, values, start


def decode_mask(mask: Mask | None, batch: int, start: Array, length: int) -> Mask:
    """Restricts `mask` to the filled part of the cache (keys before start + length)."""
    if mask is not None and mask.q_segment_ids is not None:
        raise ValueError("segment ids are not supported with decode=True (decode one sequence per batch row)")
    filled = jnp.full((batch,), start + length, jnp.int32)
    mask = mask if mask is not None else Mask()
    if mask.kv_lengths is not None:
        filled = jnp.minimum(filled, jnp.asarray(mask.kv_lengths, jnp.int32))
    return mask.replace(kv_lengths=filled)
