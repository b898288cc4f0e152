"""Argument checks shared by every attention op: each error names the argument, its value and what was expected."""

from __future__ import annotations

import numbers
from collections.abc import Callable
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
    try:
        check_gqa(heads, kv_heads)
    except ValueError as error:
        # q [B, H, T, D] / k [B, KVH, S, D] (the PyTorch layout) read as [B, T, H, D] fails here first.
        if spatial_axes == 1 and ks[1] > 0 and qs[1] % ks[1] == 0:
            raise ValueError(
                f"{error}; if q {qs} and k {ks} are [batch, heads, length, head_dim] (the PyTorch layout), note that "
                "these functions take [batch, length, heads, head_dim] (jax.nn.dot_product_attention's): pass "
                "q.transpose(0, 2, 1, 3) (and the same for k, v), and transpose the output back"
            ) from None
        raise
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


def clip_window(window: Any, *, q_len: int, kv_len: int) -> tuple[int, int] | None:
    """A layer's configured sliding window for one call: `normalize_window`, each side clipped to max(q_len, kv_len).

    A layer is configured once (e.g. Mistral's `sliding_window=4096`) and called at any length; a side longer than
    the sequence reaches every key on that side, so clipping it changes nothing. Functional calls
    (`F.softmax_attention(window=...)`) keep refusing a side larger than the sequence: there the caller spelled it.
    """
    window = normalize_window(window)
    if window is None:
        return None
    limit = max(q_len, kv_len)
    return min(window[0], limit), min(window[1], limit)


# Option validators: each is a callable (option_name, value) -> None raising ValueError("<name>=<value!r> must be
# <expected>"); its repr is the short form `python -m attn <name>` prints. The registry attaches them to options
# (register(..., validators={...})) and attn.registry.validate_options runs them on a module instance.


class OptionValidator:
    """A named check of one option value.

    Attributes:
      test: value -> bool, True when the value is acceptable.
      expected: what the value must be, phrased to follow "must be" in the error ("a positive int").
      label: the short form shown in listings ("positive int").
    """

    def __init__(self, test: Callable[[Any], bool], expected: str, label: str):
        self.test = test
        self.expected = expected
        self.label = label

    def __call__(self, name: str, value: Any) -> None:
        if not self.test(value):
            raise ValueError(f"{name}={value!r} must be {self.expected}")

    def __repr__(self) -> str:
        return self.label


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


positive_int = OptionValidator(lambda v: _is_int(v) and v > 0, "a positive int", "positive int")
non_negative_int = OptionValidator(lambda v: _is_int(v) and v >= 0, "a non-negative int", "non-negative int")
positive = OptionValidator(lambda v: _is_number(v) and v > 0, "a number > 0", "number > 0")
non_negative = OptionValidator(lambda v: _is_number(v) and v >= 0, "a number >= 0", "number >= 0")


def int_at_least(low: int) -> OptionValidator:
    """An int >= `low` (positive_int is int_at_least(1))."""
    return OptionValidator(lambda v: _is_int(v) and v >= low, f"an int >= {low}", f"int >= {low}")


def choice(*values: Any) -> OptionValidator:
    """One of `values` (compared with ==; a bool never matches an int choice)."""
    if not values:
        raise ValueError("choice() needs at least one allowed value")

    def equal(v: Any, c: Any) -> bool:
        if isinstance(v, (bool, np.bool_)) != isinstance(c, (bool, np.bool_)):
            return False
        try:
            return bool(v == c)
        except (TypeError, ValueError):  # an array compares elementwise: not one of the choices
            return False

    def test(v: Any) -> bool:
        return any(equal(v, c) for c in values)

    return OptionValidator(test, f"one of {values!r}", f"one of {values!r}")


def subset(*values: Any) -> OptionValidator:
    """A tuple or list of distinct entries of `values` (empty allowed)."""

    def test(v: Any) -> bool:
        if not isinstance(v, (tuple, list)):
            return False
        entries = [entry for entry in v if isinstance(entry, str) or _is_int(entry)]  # hashable, comparable
        return len(entries) == len(v) and len(set(v)) == len(v) and all(entry in values for entry in v)

    return OptionValidator(test, f"a tuple of distinct entries of {values!r}", f"distinct entries of {values!r}")


def in_range(low: float, high: float, *, low_inclusive: bool = True, high_inclusive: bool = True) -> OptionValidator:
    """A number between `low` and `high`, each end included or not ("[0, 1)")."""
    if not low <= high:
        raise ValueError(f"in_range(low={low!r}, high={high!r}) needs low <= high")

    def test(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v >= low if low_inclusive else v > low
        below = v <= high if high_inclusive else v < high
        return above and below

    interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    return OptionValidator(test, f"a number in {interval}", f"number in {interval}")


def optional(validator: OptionValidator) -> OptionValidator:
    """None, or a value `validator` accepts."""
    return OptionValidator(
        lambda v: v is None or validator.test(v), f"None or {validator.expected}", f"None or {validator.label}"
    )


def int_or_pair(validator: OptionValidator) -> OptionValidator:
    """A value `validator` accepts (an int, the same on every axis) or a tuple/list of such values, one per axis."""
    return OptionValidator(
        lambda v: (
            validator.test(v) or (isinstance(v, (tuple, list)) and len(v) > 0 and all(validator.test(x) for x in v))
        ),
        f"{validator.expected} or a tuple of them (one per axis)",
        f"{validator.label} or a tuple of them per axis",
    )
