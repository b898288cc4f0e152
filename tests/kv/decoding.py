"""The decode loop the cache-policy tests share: create the cache on x, then feed x again in chunks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def decode_pieces(layer, params, x, pieces):
    """Creates the decode cache with a call on x [B, T, E], then decodes x in `pieces` (chunk sizes summing to T).
    Returns (y [B, T, E] as numpy, the final cache). The step is jitted: one compile per chunk size."""
    apply = jax.jit(functools.partial(layer.apply, decode=True, mutable=["cache"]))
    _, state = apply(params, x)
    cache, outs, start = state["cache"], [], 0
    for size in pieces:
        y, state = apply({**params, "cache": cache}, x[:, start : start + size])
        outs.append(y)
        cache, start = state["cache"], start + size
    assert start == x.shape[1]
    return np.asarray(jnp.concatenate(outs, axis=1)), cache
