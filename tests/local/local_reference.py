"""Dense references for the local-attention tests, written with plain Python loops from NATTEN's definition
(independently of attn.core.neighborhood's index arithmetic)."""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F


def per_axis(value, rank):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def axis_allowed(i: int, j: int, n: int, k: int, d: int, s: int, causal: bool) -> bool:
    """NATTEN's 1-D rule: may query i attend to key j along an axis of extent n?"""
    if i % d != j % d:
        return False
    group_size = len(range(i % d, n, d))
    qi, kj = i // d, j // d
    if causal:
        leader = min((qi // s) * s + s - 1, group_size - 1)  # last query of the stride group
        return kj <= qi and leader - kj < k
    leader = min((qi // s) * s + s // 2, group_size - 1)  # center (right-center) of the stride group
    lo = leader - k // 2
    if lo < 0:
        lo = 0
    if lo + k > group_size:
        lo = group_size - k
    return lo <= kj < lo + k


def loop_mask(spatial, kernel_size, dilation=1, stride=1, causal=False) -> np.ndarray:
    """bool [N, N] over row-major tokens."""
    rank = len(spatial)
    kernel, dil, strd, caus = (per_axis(a, rank) for a in (kernel_size, dilation, stride, causal))
    coords = list(itertools.product(*[range(n) for n in spatial]))
    mask = np.zeros((len(coords), len(coords)), bool)
    for a, qc in enumerate(coords):
        for b, kc in enumerate(coords):
            mask[a, b] = all(
                axis_allowed(qc[x], kc[x], spatial[x], kernel[x], dil[x], strd[x], caus[x]) for x in range(rank)
            )
    return mask


def loop_window_mask(spatial, window, shift=0) -> np.ndarray:
    """bool [N, N]: same shifted window on every axis, win(i) = (i + (w - s) % w) // w."""
    rank = len(spatial)
    window, shift = per_axis(window, rank), per_axis(shift, rank)
    coords = list(itertools.product(*[range(n) for n in spatial]))
    block = [tuple((c[x] + (window[x] - shift[x]) % window[x]) // window[x] for x in range(rank)) for c in coords]
    return np.array([[bq == bk for bk in block] for bq in block])


def loop_relative_bias(table: np.ndarray, spatial, kernel_size, dilation, mask: np.ndarray) -> np.ndarray:
    """float [H, N, N]: table[h, (j - i) / d + k - 1 per axis] where mask allows, 0 elsewhere."""
    rank = len(spatial)
    kernel, dil = per_axis(kernel_size, rank), per_axis(dilation, rank)
    coords = list(itertools.product(*[range(n) for n in spatial]))
    bias = np.zeros((table.shape[0], len(coords), len(coords)), np.float32)
    for a, qc in enumerate(coords):
        for b, kc in enumerate(coords):
            if mask[a, b]:
                offset = tuple((kc[x] - qc[x]) // dil[x] + kernel[x] - 1 for x in range(rank))
                bias[(slice(None), a, b)] = table[(slice(None),) + offset]
    return bias


@jax.jit
def dense_attention(q, k, v, mask=None, bias=None):
    """softmax_attention on the flattened tokens: q [B, *S, H, D] -> [B, *S, H, D] (jitted: one compile)."""
    batch, spatial = q.shape[0], q.shape[1:-2]
    tokens = math.prod(spatial)
    flat = [t.reshape(batch, tokens, *t.shape[-2:]) for t in (q, k, v)]
    out = F.softmax_attention(
        *flat,
        mask=None if mask is None else jnp.asarray(mask)[None, None],
        bias=None if bias is None else jnp.asarray(bias)[None],
    )
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def layer_reference(params, x, attend):
    """The spatial layer's projections around `attend(q, k, v, params) -> [B, *S, H, D]`."""
    p = nn.meta.unbox(params)["params"]
    q = jnp.einsum("...e,ehd->...hd", x, p["query"]["kernel"])
    k = jnp.einsum("...e,ehd->...hd", x, p["key"]["kernel"])
    v = jnp.einsum("...e,ehd->...hd", x, p["value"]["kernel"])
    return jnp.einsum("...hd,hde->...e", attend(q, k, v, p), p["out"]["kernel"])


def normal(shape, seed=0, scale=1.0):
    """float32 normal draws from NumPy (jax.random would compile a sampler per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_params(layer, x, seed=0):
    """Parameters of `layer` for input `x`, shaped by tracing `init` (no compile), filled with N(0, 0.3^2)."""
    abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
    leaves, tree = jax.tree.flatten(abstract)
    return jax.tree.unflatten(tree, [normal(leaf.shape, seed + i, 0.3) for i, leaf in enumerate(leaves)])
