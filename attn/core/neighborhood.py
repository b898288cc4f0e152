"""Neighborhood attention over 1-D, 2-D and 3-D token layouts, with NATTEN's semantics (kernel size, dilation,
stride, causal per axis), computed with linear memory by gathering each query's key window.

Per spatial axis of extent n, with kernel size k, dilation d, stride s (NATTEN 0.20+, "Generalized Neighborhood
Attention"):

  dilation group   query i and key j interact only if i % d == j % d. Inside its group a token has the local
                   coordinate i // d, and the group has n_g = ceil((n - i % d) / d) members.
  stride group     local queries are tiled in groups of s; the group shares the window of its leader:
                     non-causal: L = min((i_l // s) * s + s // 2, n_g - 1)    (the center; right-center if s even)
                     causal:     L = min((i_l // s) * s + s - 1,  n_g - 1)    (the last query of the group)
  window           non-causal: the k consecutive local keys starting at clamp(L - k // 2, 0, n_g - k): the window
                   shifts inward at the borders and never shrinks, so every query sees exactly k keys per axis
                   (an even k has one more key on the left than on the right).
                   causal: local keys in [max(L - k + 1, 0), i_l]: at most k keys, none after the query (no
                   inward shift at the start, which would reach into the future).

A query attends to the Cartesian product of its per-axis windows (prod(k) keys when no axis is causal). s = 1 is
neighborhood attention [75]; d > 1 is dilated NA (DiNA) [131]; s = k is blocked (non-overlapping window)
attention and k = n is full self-attention along that axis [125]. The window always contains its query.

Constraints (NATTEN's): k * d <= n (each dilation group holds a full window) and 1 <= s <= k (no gaps). NATTEN
also requires k >= 2; here k = 1 is accepted (then s = 1 and a query sees only itself along that axis) because it
gives row/column patterns such as kernel_size=(1, W).

Relative position bias (NAT): `rpb` float [H, 2k_0 - 1, ...] adds rpb[h, (j_0 - i_0) / d_0 + k_0 - 1, ...] to the
logit of query i and key j (offsets in units of the dilation, always in [0, 2k - 2] because the window contains
the query).

Cost: time O(B N prod(k) H D) and memory O(B N prod(k) (KVH D + H)) for N tokens: the gathered key/value windows
and the window logits; no N x N array is built. `neighborhood_mask` builds the equivalent dense [N, N] mask for
tests, references and plots only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core import dispatch
from attn.core.validation import check_qkv, check_rank, shape_of

Array = jax.Array

IntPerAxis = int | Sequence[int]
BoolPerAxis = bool | Sequence[bool]


# ---------------------------------------------------------------------------------------------- arguments
def _is_kind(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def per_axis(name: str, value: Any, rank: int, kind: type) -> tuple:
    """`value` (an int or bool per `kind`, or a tuple/list of them) as a tuple of `rank` entries; a scalar is
    repeated. ValueError naming `name` otherwise."""
    expected = "bool" if kind is bool else "int"
    if _is_kind(value, kind):
        return (kind(value),) * rank
    if isinstance(value, (tuple, list)) and all(_is_kind(v, kind) for v in value):
        if len(value) != rank:
            raise ValueError(
                f"{name}={tuple(value)!r} has {len(value)} entries but the input has {rank} spatial axes; "
                f"expected one {expected} or a tuple of {rank}"
            )
        return tuple(kind(v) for v in value)
    raise ValueError(f"{name}={value!r} must be an {expected} or a tuple of {rank} {expected}s (one per axis)")


def normalize_neighborhood_args(
    spatial_shape: Sequence[int],
    kernel_size: IntPerAxis,
    dilation: IntPerAxis = 1,
    stride: IntPerAxis = 1,
    causal: BoolPerAxis = False,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Validates the per-axis arguments against the token layout; returns them as tuples of len(spatial_shape).

    Raises ValueError (naming the argument, its value and the bound) when kernel_size < 1, dilation < 1,
    stride < 1, stride > kernel_size, or kernel_size * dilation > extent.
    """
    spatial_shape = tuple(int(n) for n in spatial_shape)
    rank = len(spatial_shape)
    if not 1 <= rank <= 3:
        raise ValueError(f"spatial_shape={spatial_shape} must have 1, 2 or 3 axes")
    kernel = per_axis("kernel_size", kernel_size, rank, int)
    dil = per_axis("dilation", dilation, rank, int)
    strd = per_axis("stride", stride, rank, int)
    caus = per_axis("causal", causal, rank, bool)
    for axis, (n, k, d, s) in enumerate(zip(spatial_shape, kernel, dil, strd, strict=True)):
        if k < 1:
            raise ValueError(f"kernel_size={kernel} must be >= 1 on every axis (axis {axis} has {k})")
        if d < 1:
            raise ValueError(f"dilation={dil} must be >= 1 on every axis (axis {axis} has {d})")
        if s < 1:
            raise ValueError(f"stride={strd} must be >= 1 on every axis (axis {axis} has {s})")
        if s > k:
            raise ValueError(
                f"stride={strd} must be <= kernel_size={kernel} on every axis (axis {axis}: stride {s} > "
                f"kernel_size {k} would leave keys no query attends to)"
            )
        if k * d > n:
            raise ValueError(
                f"kernel_size={kernel} with dilation={dil} does not fit spatial_shape={spatial_shape}: axis "
                f"{axis} needs kernel_size * dilation = {k * d} <= extent {n} (kernel_size <= extent / dilation)"
            )
    return kernel, dil, strd, caus


# ---------------------------------------------------------------------------------------------- windows
def window_start(
    index: Any, *, extent: int, kernel_size: int, dilation: int = 1, stride: int = 1, causal: bool = False
) -> Any:
    """Index of the first key in the window of query `index` along one axis (global coordinates).

    The window's keys are start, start + d, ..., start + (k - 1) d; with causal=True only those <= index count.
    `index` may be a Python int, a NumPy array or a jax array (traced, e.g. inside a kernel); the result has the
    same kind. Arguments are assumed valid (see `normalize_neighborhood_args`).
    """
    xp = jnp if isinstance(index, jax.Array) else np
    group = index % dilation
    local = index // dilation
    group_extent = (extent - group + dilation - 1) // dilation
    tile = (local // stride) * stride
    if causal:
        leader = xp.minimum(tile + stride - 1, group_extent - 1)
        start = xp.maximum(leader - kernel_size + 1, 0)
    else:
        leader = xp.minimum(tile + stride // 2, group_extent - 1)
        start = xp.clip(leader - kernel_size // 2, 0, group_extent - kernel_size)
    return group + dilation * start


def window_indices(
    extent: int, kernel_size: int, dilation: int = 1, stride: int = 1, causal: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The key window of every query along one axis.

    Returns:
      indices: int32 [extent, kernel_size], the keys of query i in order (always inside [0, extent)).
      valid: bool [extent, kernel_size], False for keys after the query when causal (all True otherwise).
    """
    queries = np.arange(extent)
    start = window_start(
        queries, extent=extent, kernel_size=kernel_size, dilation=dilation, stride=stride, causal=causal
    )
    indices = start[:, None] + dilation * np.arange(kernel_size)[None, :]
    valid = indices <= queries[:, None] if causal else np.ones_like(indices, dtype=bool)
    return indices.astype(np.int32), valid


def _window_tables(
    spatial_shape: tuple[int, ...],
    kernel: tuple[int, ...],
    dil: tuple[int, ...],
    strd: tuple[int, ...],
    caus: tuple[bool, ...],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Flat tables over [N, W] (N tokens row-major, W = prod(kernel) window slots, row-major over the axes).

    Returns (key index int32 [N, W], valid bool [N, W] or None when no axis is causal, relative-position index
    into a flattened [prod(2k - 1)] bias table int32 [N, W]).
    """
    rank = len(spatial_shape)
    key = np.zeros((1,) * (2 * rank), np.int64)
    rel = np.zeros((1,) * (2 * rank), np.int64)
    valid = np.ones((1,) * (2 * rank), bool)
    key_stride = 1
    rel_stride = 1
    for axis in reversed(range(rank)):
        n, k, d = spatial_shape[axis], kernel[axis], dil[axis]
        idx, ok = window_indices(n, k, d, strd[axis], caus[axis])
        offset = (idx - np.arange(n)[:, None]) // d + k - 1  # exact: key and query share the dilation group
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = n, k
        key = key + idx.reshape(shape).astype(np.int64) * key_stride
        rel = rel + offset.reshape(shape) * rel_stride
        valid = valid & ok.reshape(shape)
        key_stride *= n
        rel_stride *= 2 * k - 1
    full = tuple(spatial_shape) + tuple(kernel)
    tokens, slots = math.prod(spatial_shape), math.prod(kernel)
    key = np.broadcast_to(key, full).reshape(tokens, slots).astype(np.int32)
    rel = np.broadcast_to(rel, full).reshape(tokens, slots).astype(np.int32)
    mask = np.broadcast_to(valid, full).reshape(tokens, slots) if any(caus) else None
    return key, mask, rel


def neighborhood_key_indices(
    spatial_shape: Sequence[int],
    kernel_size: IntPerAxis,
    dilation: IntPerAxis = 1,
    stride: IntPerAxis = 1,
    causal: BoolPerAxis = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Flat key index int32 [N, W] of every query's window slots (W = prod(kernel_size)), and valid bool [N, W]
    (False for slots a causal axis hides). Tokens are numbered row-major over `spatial_shape`."""
    shape = tuple(int(n) for n in spatial_shape)
    args = normalize_neighborhood_args(shape, kernel_size, dilation, stride, causal)
    key, valid, _ = _window_tables(shape, *args)
    return key, (np.ones(key.shape, bool) if valid is None else valid)


def neighborhood_mask(
    spatial_shape: Sequence[int],
    kernel_size: IntPerAxis,
    dilation: IntPerAxis = 1,
    stride: IntPerAxis = 1,
    causal: BoolPerAxis = False,
) -> np.ndarray:
    """The dense boolean mask [N, N] (query, key) equivalent to `neighborhood_attention` (N = prod(spatial_shape),
    tokens row-major). O(N^2) memory: for tests, references and visualisation only."""
    shape = tuple(int(n) for n in spatial_shape)
    kernel, dil, strd, caus = normalize_neighborhood_args(shape, kernel_size, dilation, stride, causal)
    mask = np.ones((1,) * (2 * len(shape)), bool)
    for axis, n in enumerate(shape):
        idx, ok = window_indices(n, kernel[axis], dil[axis], strd[axis], caus[axis])
        axis_mask = np.zeros((n, n), bool)
        np.put_along_axis(axis_mask, idx, ok, axis=1)
        view = [1] * (2 * len(shape))
        view[axis], view[len(shape) + axis] = n, n
        mask = mask & axis_mask.reshape(view)
    tokens = math.prod(shape)
    return np.broadcast_to(mask, shape + shape).reshape(tokens, tokens)


def window_probs_to_dense(probs: Array, key_indices: Array | np.ndarray, num_keys: int) -> Array:
    """Scatters window probabilities [B, H, N, W] with their key indices [N, W] into a dense [B, H, N, num_keys]
    array (for attention-weight capture and plots; O(N^2) memory)."""
    batch, heads, tokens, _ = probs.shape
    rows = np.arange(tokens)[:, None]
    dense = jnp.zeros((batch, heads, tokens, num_keys), probs.dtype)
    return dense.at[:, :, rows, jnp.asarray(key_indices)].add(probs)


# ---------------------------------------------------------------------------------------------- attention
def neighborhood_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    kernel_size: IntPerAxis,
    dilation: IntPerAxis = 1,
    stride: IntPerAxis = 1,
    causal: BoolPerAxis = False,
    rpb: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, dict[str, Array]]:
    """Neighborhood attention (NA / DiNA / GNA, NATTEN semantics; see the module docstring).

    Args:
      q: [B, *spatial, H, D] with 1, 2 or 3 spatial axes. k: [B, *spatial, KVH, D], v: [B, *spatial, KVH, Dv]
        (same spatial shape as q; H a multiple of KVH: MHA, GQA, MQA).
      kernel_size, dilation, stride: int or one int per spatial axis. causal: bool or one bool per axis.
      rpb: optional relative position bias, float [H, 2 k_0 - 1, ..., 2 k_{r-1} - 1] (NAT).
      scale: logit scale, default 1/sqrt(D).
      dropout_rate, dropout_rng: dropout on the attention probabilities.
      return_probs: also return {"probs": float32 [B, H, N, W], "key_indices": int32 [N, W]}: the probability
        of each query's window slot (0 for causally hidden slots) and the flat key index of the slot, with
        N = prod(spatial) tokens in row-major order and W = prod(kernel_size). `window_probs_to_dense` turns
        them into [B, H, N, N].
      implementation: None (fastest available), "xla" (this gather reference) or "pallas" (not yet available).
    Returns:
      [B, *spatial, H, Dv] in q.dtype, or (out, aux) with return_probs.
    """
    check_rank("q", q, (4, 5, 6), "[batch, *spatial (1 to 3 axes), heads, head_dim]")
    spatial_axes = np.ndim(q) - 3
    heads, kv_heads = check_qkv(q, k, v, spatial_axes=spatial_axes)
    spatial = tuple(shape_of(q)[1:-2])
    if tuple(shape_of(k)[1:-2]) != spatial:
        raise ValueError(
            f"k and v have spatial shape {tuple(shape_of(k)[1:-2])} but q has {spatial}; neighborhood attention "
            "expects the same token layout for queries and keys"
        )
    kernel, dil, strd, caus = normalize_neighborhood_args(spatial, kernel_size, dilation, stride, causal)
    if rpb is not None:
        expected = (heads, *(2 * kk - 1 for kk in kernel))
        if shape_of(rpb) != expected:
            raise ValueError(
                f"rpb must have shape [heads, 2 * kernel_size - 1 per axis] = {expected}, got {shape_of(rpb)}"
            )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
    dispatch.select(
        "neighborhood_attention",
        implementation,
        {"pallas": "no Pallas neighborhood-attention kernel is registered yet", "xla": None},
    )

    batch, head_dim = q.shape[0], q.shape[-1]
    tokens, groups = math.prod(spatial), heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    key_index, valid, rel_index = _window_tables(spatial, kernel, dil, strd, caus)
    slots = key_index.shape[1]

    # Gather each query's window of keys/values once per kv head: [B, N, W, KVH, D]. The grouped query layout
    # lets every query head of a GQA group share the gathered kv head without repeating it.
    key_index = jnp.asarray(key_index)
    keys = jnp.take(k.reshape(batch, tokens, kv_heads, head_dim), key_index, axis=1)
    values = jnp.take(v.reshape(batch, tokens, kv_heads, v.shape[-1]), key_index, axis=1)
    queries = q.reshape(batch, tokens, kv_heads, groups, head_dim)
    logits = jnp.einsum("bnkgd,bnwkd->bnkgw", queries, keys, preferred_element_type=jnp.float32) * scale
    if rpb is not None:
        table = jnp.asarray(rpb, jnp.float32).reshape(heads, -1)
        bias = jnp.take(table, jnp.asarray(rel_index), axis=1)  # [H, N, W]
        logits = logits + bias.reshape(kv_heads, groups, tokens, slots).transpose(2, 0, 1, 3)[None]
    if valid is not None:
        # Every query sees at least itself, so no row is fully masked.
        logits = jnp.where(jnp.asarray(valid)[None, :, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)

    attended = probs
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        attended = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bnkgw,bnwkd->bnkgd", attended.astype(v.dtype), values, preferred_element_type=jnp.float32)
    out = out.reshape(batch, *spatial, heads, v.shape[-1]).astype(q.dtype)
    if not return_probs:
        return out
    probs = probs.reshape(batch, tokens, heads, slots).transpose(0, 2, 1, 3)
    return out, {"probs": probs, "key_indices": key_index}
