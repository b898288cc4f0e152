"""What the cache-policy tests share: the decode loop (create the cache on x, then feed x again in chunks), the
bytes of a decode cache, the full-budget reduction to softmax, and the numpy decode of accumulated-mass policies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.core import cache as cache_lib
from tests.kv.score_reference import np_rope


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


def decode_cache_bytes(layer, params, x):
    """Bytes of the cache a decode call of `layer` on x [B, T, E] creates (shapes only: jax.eval_shape runs nothing;
    params may be arrays or ShapeDtypeStructs)."""
    shapes = jax.eval_shape(lambda p: layer.apply(p, x, decode=True, mutable=["cache"])[1], params)
    return cache_lib.nbytes(shapes["cache"])


def decode_equals_softmax(layer, params, x, pieces, *, mask, atol=2e-5):
    """Asserts that decoding x in `pieces` through `layer` (a cache policy whose budget holds every token) equals
    plain softmax attention ("softmax" with the layer's head shapes and the same parameters) on x under `mask`;
    returns (y, cache) of the decode."""
    y, cache = decode_pieces(layer, params, x, pieces)
    softmax = attn.build("softmax", num_heads=layer.num_heads, head_dim=layer.head_dim, num_kv_heads=layer.num_kv_heads)
    np.testing.assert_allclose(y, softmax.apply(params, x, mask=mask), atol=atol)
    return y, cache


def np_mass_policy_decode(q, k, v, keep):
    """Token-by-token decoding with a per-(batch, kv head) cache ranked by accumulated attention mass, as an explicit
    loop: q [B, T, H, D], k, v [B, T, KVH, D] (before RoPE); each step attends the kept entries plus itself (RoPE at
    original positions), adds every query head's weights to the entries' mass, then `keep(cands, mass, t)` returns the
    entries kept. Returns (out [B, T, H, D], kept [B][KVH] lists, mass [B][KVH] dicts)."""
    B, T, H, D = q.shape
    KVH = k.shape[2]
    out = np.zeros((B, T, H, D))
    kept = [[[] for _ in range(KVH)] for _ in range(B)]
    mass = [[{} for _ in range(KVH)] for _ in range(B)]
    for b in range(B):
        for g in range(KVH):
            for t in range(T):
                cands = kept[b][g] + [t]
                mass[b][g][t] = 0.0
                keys = np_rope(k[b, cands, g], np.array(cands))
                for h in range(g * (H // KVH), (g + 1) * (H // KVH)):
                    logits = keys @ np_rope(q[b, t, h], t) / np.sqrt(D)
                    w = np.exp(logits - logits.max())
                    w /= w.sum()
                    out[b, t, h] = w @ v[b, cands, g]
                    for j, wj in zip(cands, w, strict=True):
                        mass[b][g][j] += wj
                kept[b][g] = keep(cands, mass[b][g], t)
    return out, kept, mass
