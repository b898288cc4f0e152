"""Argument checks shared by every attention op: each error names the argument, its value and what was expected."""

from __future__ import annotations

from typing import Any

import numpy as np


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_rank(name: str, x: Any, rank: int | tuple[int, ...], layout: str) -> None:
    """Raises ValueError unless `x` has one of the allowed ranks."""
    ranks = (rank,) if isinstance(rank, int) else rank
    if np.ndim(x) not in ranks:
        expected = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have rank {expected} {layout}, got shape {shape_of(x)} (rank {np.ndim(x)})")


def check_qkv(q: Any, k: Any, v: Any, *, spatial_axes: int = 1) -> tuple[int, int]:
    """Validates q [B, *S, H, D], k [B, *S', KVH, D], v [B, *S', KVH, Dv]; returns (num_heads, num_kv_heads)."""
    rank = spatial_axes + 3
    layout = "[batch, length, heads, head_dim]" if spatial_axes == 1 else "[batch, *spatial, heads, head_dim]"
    check_rank("q", q, rank, layout)
    check_rank("k", k, rank, layout)
    check_rank("v", v, rank, layout)
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    if ks[0] != qs[0] or vs[0] != qs[0]:
        raise ValueError(f"batch sizes differ: q has {qs[0]}, k has {ks[0]}, v has {vs[0]}; expected all equal")
    if ks[:-1] != vs[:-1]:
        raise ValueError(f"k and v must agree on all but the last axis, got k {ks} and v {vs}")
    if ks[-1] != qs[-1]:
        raise ValueError(f"head_dim mismatch: q has head_dim={qs[-1]} but k has head_dim={ks[-1]}; expected equal")
    heads, kv_heads = qs[-2], ks[-2]
    check_gqa(heads, kv_heads)
    return heads, kv_heads


def check_gqa(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} "
            "(MHA: equal, GQA: a divisor, MQA: 1)"
        )


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, choices))}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be {bound}")


def normalize_window(window: Any, *, q_len: int | None = None, kv_len: int | None = None) -> tuple[int, int] | None:
    """Returns the sliding window as (left, right) or None.

    An int `w` means (w, w): each query sees `w` keys to its left and `w` to its right (with `causal=True` the
    right side is empty anyway). When the lengths are known, a side larger than the longest sequence is an error:
    it would silently mean full attention, which is spelled `window=None`.
    """
    if window is None:
        return None
    if isinstance(window, (int, np.integer)):
        window = (int(window), int(window))
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ValueError(f"window={window!r} must be None, an int, or a pair (left, right) of ints")
    left, right = window
    if not all(isinstance(w, (int, np.integer)) for w in (left, right)) or left < 0 or right < 0:
        raise ValueError(f"window={tuple(window)!r} must be a pair (left, right) of non-negative ints")
    if q_len is not None and kv_len is not None:
        limit = max(q_len, kv_len)
        if left > limit or right > limit:
            raise ValueError(
                f"window={tuple(window)!r} is larger than allowed for q_len={q_len}, kv_len={kv_len}: each side "
                f"must be <= {limit}; use window=None for full attention"
            )
    return int(left), int(right)
