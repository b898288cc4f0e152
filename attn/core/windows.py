"""Window partitioning of token grids and softmax attention inside non-overlapping windows: the one implementation
that `window`, `cswin` (stripes are (sw, W) / (H, sw) windows), `halo` (query blocks), `hilo` (pooling windows),
`spatial_sparse` and `swap` build on.

A grid x [B, *S, ...] (1 to 3 spatial axes S) is cut into windows of w tokens per axis. `shift` (per axis,
0 <= shift < w) moves the window boundaries to the positions = shift (mod w):

    win(i) = floor((i + (w - shift) mod w) / w)            per axis

which is Swin's shifted windows (cyclic roll by -shift, partition, and the mask that keeps wrapped-around regions
apart) computed without the roll. To make every window full, each axis is padded by (w - shift) mod w slots at the
start and by whatever rounds the extent up to a multiple of w at the end; the padded slots are reported by a
validity mask, and attention never uses them as keys (so a border window is smaller rather than padded).

Layouts: `partition_windows` maps [B, *S, *rest] -> [B * nW, prod(w), *rest], windows row-major over the window
grid and, inside a window, tokens row-major; `unpartition_windows` is its inverse (padding dropped). Both work on
NumPy arrays too (for static index tables).

`window_attention(q, k, v)` = softmax attention batched over windows (`attn.core.softmax.softmax_attention`):

    o_i = sum_{j : win(j) = win(i)} softmax_j(scale q_i k_j^T + bias) v_j

Time O(B N prod(w) H D), memory O(B N prod(w) H) for N = prod(S) tokens. window = S with shift 0 is plain softmax
attention over the flattened tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attn.core.masks import Mask
from attn.core.neighborhood import IntPerAxis, per_axis, window_probs_to_dense
from attn.core.softmax import softmax_attention
from attn.core.validation import check_qkv, check_rank, shape_of

Array = jax.Array
Plan = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

__all__ = [
    "dense_window_probs",
    "partition_windows",
    "unpartition_windows",
    "window_attention",
    "window_key_mask",
    "window_plan",
]


def window_plan(
    spatial: Sequence[int],
    window: IntPerAxis,
    shift: IntPerAxis = 0,
    *,
    clip: bool = False,
    window_name: str = "window",
) -> Plan:
    """Validated (window, front padding, back padding), one int per spatial axis.

    Args:
      spatial: the grid's extents S.
      window: int (every axis) or one int per axis, 1 <= window <= extent.
      shift: int or one int per axis, 0 <= shift < window.
      clip: a window larger than an extent is first clipped to it (the window covers that axis).
      window_name: the name the caller's users know the window by, for error messages (e.g. "window_size").
    Raises ValueError naming the argument otherwise.
    """
    spatial = tuple(int(n) for n in spatial)
    rank = len(spatial)
    windows = per_axis(window_name, window, rank, int)
    if clip:
        windows = tuple(min(w, n) for w, n in zip(windows, spatial, strict=True))
    shifts = per_axis("shift", shift, rank, int)
    for axis, (n, w, s) in enumerate(zip(spatial, windows, shifts, strict=True)):
        if not 1 <= w <= n:
            raise ValueError(
                f"{window_name}={windows} must be between 1 and the extent on every axis; axis {axis} has "
                f"window {w} and extent {n} (spatial shape {spatial})"
            )
        if not 0 <= s < w:
            raise ValueError(f"shift={shifts} must satisfy 0 <= shift < {window_name}={windows} (axis {axis} has {s})")
    front = tuple((w - s) % w for w, s in zip(windows, shifts, strict=True))
    back = tuple((-(f + n)) % w for n, w, f in zip(spatial, windows, front, strict=True))
    return windows, front, back


def _window_rank(window: Sequence[int] | int, x: Array | np.ndarray) -> int:
    if not isinstance(window, (tuple, list)):
        raise ValueError(
            f"window={window!r} must be a tuple with one int per spatial axis (partition_windows cannot tell the "
            f"spatial axes of an input of shape {shape_of(x)} from the others)"
        )
    if not 1 <= len(window) <= np.ndim(x) - 1:
        raise ValueError(
            f"window={tuple(window)} has {len(window)} axes but x of shape {shape_of(x)} is [batch, *spatial, ...] "
            f"with at most {np.ndim(x) - 1} spatial axes"
        )
    return len(window)


def partition_windows(
    x: Array | np.ndarray, window: Sequence[int], shift: IntPerAxis = 0, *, fill: float | int | bool = 0
) -> tuple[Array | np.ndarray, np.ndarray]:
    """Cuts a grid into (padded) windows.

    Args:
      x: [B, *S, *rest], any dtype; a jax or NumPy array (the result is of the same kind).
      window: one int per spatial axis (len(window) = number of spatial axes of x).
      shift: int or one int per axis, 0 <= shift < window.
      fill: value of the padded slots.
    Returns:
      (windows [B * nW, prod(window), *rest] (window b * nW + n is window n of batch row b), valid bool [nW,
      prod(window)]: False for padded slots, the same for every batch row).
    """
    rank = _window_rank(window, x)
    spatial = tuple(shape_of(x)[1 : 1 + rank])
    window, front, back = window_plan(spatial, window, shift)
    valid = _partition(np.ones((1, *spatial), bool), window, front, back, False)
    return _partition(x, window, front, back, fill), valid


def _partition(x, window: tuple[int, ...], front: tuple[int, ...], back: tuple[int, ...], fill):
    """[B, *S, *rest] -> [B * nW, prod(window), *rest] with each spatial axis padded by (front, back)."""
    xp = np if isinstance(x, np.ndarray) else jnp
    rank = len(window)
    rest = x.shape[1 + rank :]
    if any(front) or any(back):
        x = xp.pad(x, [(0, 0), *zip(front, back, strict=True), *[(0, 0)] * len(rest)], constant_values=fill)
    counts = [p // w for p, w in zip(x.shape[1 : 1 + rank], window, strict=True)]
    # [B, c_0, w_0, c_1, w_1, ..., *rest] -> [B, c_0, c_1, ..., w_0, w_1, ..., *rest]
    x = x.reshape(x.shape[0], *(d for c, w in zip(counts, window, strict=True) for d in (c, w)), *rest)
    order = [0, *(1 + 2 * a for a in range(rank)), *(2 + 2 * a for a in range(rank))]
    x = x.transpose(order + list(range(1 + 2 * rank, x.ndim)))
    return x.reshape(x.shape[0] * math.prod(counts), math.prod(window), *rest)


def unpartition_windows(
    windows: Array | np.ndarray, spatial: Sequence[int], window: IntPerAxis, shift: IntPerAxis = 0
) -> Array | np.ndarray:
    """Inverse of `partition_windows`: [B * nW, prod(window), *rest] -> [B, *spatial, *rest] (padding dropped)."""
    spatial = tuple(int(n) for n in spatial)
    window, front, back = window_plan(spatial, window, shift)
    rank = len(spatial)
    padded = [n + f + b for n, f, b in zip(spatial, front, back, strict=True)]
    counts = [p // w for p, w in zip(padded, window, strict=True)]
    num_windows, size = math.prod(counts), math.prod(window)
    shape = shape_of(windows)
    if len(shape) < 2 or shape[0] % num_windows or shape[1] != size:
        raise ValueError(
            f"windows of shape {shape} must be [batch * {num_windows} windows, {size} tokens, ...] for spatial shape "
            f"{spatial}, window {window} and shift {shift}"
        )
    rest = shape[2:]
    batch = shape[0] // num_windows
    y = windows.reshape(batch, *counts, *window, *rest)
    # [B, c_0, c_1, ..., w_0, w_1, ..., *rest] -> [B, c_0, w_0, c_1, w_1, ..., *rest]
    order = [0, *(d for a in range(rank) for d in (1 + a, 1 + rank + a))]
    y = y.transpose(order + list(range(1 + 2 * rank, y.ndim))).reshape(batch, *padded, *rest)
    return y[(slice(None), *(slice(f, f + n) for f, n in zip(front, spatial, strict=True)))]


def window_key_mask(valid: np.ndarray, batch: int) -> Mask | None:
    """The key mask of window-partitioned attention over [batch * nW] windows from valid bool [nW, K] (the key
    slots of each window that are real tokens, the same for every batch row): None without padding, key lengths
    when the real keys of every window are a prefix of it (kernels support that), else a dense [B * nW, 1, 1, K]
    mask."""
    if valid.all():
        return None
    lengths = valid.sum(axis=1)
    if (valid == (np.arange(valid.shape[1]) < lengths[:, None])).all():
        return Mask(kv_lengths=jnp.asarray(np.tile(lengths, batch), jnp.int32))
    return Mask(dense=jnp.asarray(np.tile(valid, (batch, 1))[:, None, None, :]))


def window_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    window: IntPerAxis,
    shift: IntPerAxis = 0,
    bias: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, dict[str, Array]]:
    """Softmax attention within the non-overlapping (optionally shifted) windows of a token grid.

    Args:
      q: [B, *S, H, D] with 1 to 3 spatial axes; k: [B, *S, KVH, D]; v: [B, *S, KVH, Dv] (the same grid; H a
        multiple of KVH; k/v may come from another stream than q: windowed cross-attention).
      window: int or one int per axis, 1 <= window <= extent. shift: int or per axis, 0 <= shift < window.
      bias: float, broadcastable to [B * nW, H, T, T] (T = prod(window), windows as `partition_windows`), e.g. a
        relative position bias [1, H, T, T] shared by the windows; added to the logits.
      scale: logit scale, default 1/sqrt(D). dropout_rate, dropout_rng: dropout on the probabilities.
      return_probs: also return {"probs": float32 [B * nW, H, T, T]}, the per-window probabilities (padded keys
        get 0; rows of padded queries are present too); `dense_window_probs` maps them onto the tokens.
      implementation: backend of `attn.core.softmax.softmax_attention`.
    Returns:
      [B, *S, H, Dv] in q.dtype, or (out, aux) with return_probs.
    """
    check_rank("q", q, (4, 5, 6), "[batch, *spatial (1 to 3 axes), heads, head_dim]")
    check_qkv(q, k, v, spatial_axes=np.ndim(q) - 3)
    batch, spatial = q.shape[0], tuple(q.shape[1:-2])
    if tuple(shape_of(k)[1:-2]) != spatial:
        raise ValueError(f"k and v have spatial shape {tuple(shape_of(k)[1:-2])} but q has {spatial}")
    window = window_plan(spatial, window, shift)[0]
    (qw, valid), (kw, _), (vw, _) = (partition_windows(t, window, shift) for t in (q, k, v))
    result = softmax_attention(
        qw,
        kw,
        vw,
        mask=window_key_mask(valid, batch),
        bias=bias,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        return_probs=return_probs,
        implementation=implementation,
    )
    if return_probs:
        out, aux = result
        return unpartition_windows(out, spatial, window, shift), {"probs": aux["probs"]}
    return unpartition_windows(result, spatial, window, shift)


def dense_window_probs(
    probs: Array,
    spatial: Sequence[int],
    window: IntPerAxis,
    shift: IntPerAxis = 0,
    *,
    key_indices: np.ndarray | None = None,
) -> Array:
    """Probabilities of window-partitioned attention -> float32 [B, H, N, N] over the original tokens (N =
    prod(spatial); O(N^2) memory: for attention-weight capture and plots).

    probs: [B * nW, H, T, K] for queries partitioned by `partition_windows(..., window, shift)` (T = prod(window)).
    key_indices: int [nW, K], the flat token index of every key slot of every window (slots whose probability is 0
    may hold any index in range); None = the window's own tokens (K = T), as in `window_attention`.
    """
    spatial = tuple(int(n) for n in spatial)
    tokens = math.prod(spatial)
    if key_indices is None:
        window = window_plan(spatial, window, shift)[0]
        key_indices = partition_windows(np.arange(tokens).reshape(1, *spatial), window, shift)[0]
    num_windows, size = key_indices.shape
    heads, queries = probs.shape[1], probs.shape[2]
    # The key table rides along with the queries through unpartitioning: [N, K] keys of every token's window.
    table = np.broadcast_to(key_indices[:, None, :], (num_windows, queries, size))
    keys = unpartition_windows(table, spatial, window, shift).reshape(tokens, size)
    per_query = unpartition_windows(probs.transpose(0, 2, 1, 3), spatial, window, shift).reshape(
        -1, tokens, heads, size
    )
    return window_probs_to_dense(per_query.transpose(0, 2, 1, 3).astype(jnp.float32), keys, tokens)
