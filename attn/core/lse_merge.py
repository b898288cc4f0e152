"""The associative merge of partial softmax-attention results (log-sum-exp merging).

A partial result of softmax attention over a subset A of the keys is (o_A, lse_A): the attention output over A
alone, o_A = sum_{j in A} exp(s_j - lse_A) v_j, and lse_A = log sum_{j in A} exp(s_j). Two disjoint parts combine
exactly into the result over A u B:

    lse = logaddexp(lse_A, lse_B)
    o   = o_A exp(lse_A - lse) + o_B exp(lse_B - lse)

The operation is associative and commutative with identity (0, -inf) (an empty part: no visible key), so any split
of the keys, reduced in any order or as a tree, gives softmax attention over all of them (LeanAttention, arXiv
2405.10480: the softmax re-scaling as a reduction operator; Flash-Decoding's split-KV combine). Empty
parts never produce NaN: where both sides are empty the result is (0, -inf), and no gradient is NaN.

Shapes: lse is any [...] and o is [..., Dv] (one trailing value axis). Results are float32 (float64 for float64
inputs). Split-KV decoding (attn.core.split_kv_decode) and the Pallas decode kernel's partials use these; ring
attention merges the blocks it receives the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["merge", "merge_partials"]


def _check(o: Array, lse: Array, name: str) -> None:
    if o.ndim != lse.ndim + 1 or o.shape[:-1] != lse.shape:
        raise ValueError(
            f"{name}: o of shape {o.shape} and lse of shape {lse.shape} do not pair up; expected o [..., Dv] "
            f"with lse [...] = o.shape[:-1]"
        )


def _dtype(*arrays: Array):
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def merge(o_a: Array, lse_a: Array, o_b: Array, lse_b: Array) -> tuple[Array, Array]:
    """(o_a, lse_a) + (o_b, lse_b) -> (o, lse): softmax attention over the union of two disjoint key sets.

    o_a, o_b: [..., Dv]; lse_a, lse_b: [...] (-inf for an empty part). Returns o [..., Dv], lse [...] (float32).
    """
    _check(o_a, lse_a, "merge (first part)")
    _check(o_b, lse_b, "merge (second part)")
    if o_a.shape != o_b.shape:
        raise ValueError(f"merge: the parts have different shapes o_a {o_a.shape} and o_b {o_b.shape}")
    dtype = _dtype(o_a, lse_a, o_b, lse_b)
    lse_a, lse_b = lse_a.astype(dtype), lse_b.astype(dtype)
    top = jnp.maximum(lse_a, lse_b)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    w_a, w_b = jnp.exp(lse_a - shift), jnp.exp(lse_b - shift)  # 0 for an empty part, never exp(nan)
    total = w_a + w_b
    empty = total == 0.0
    safe = jnp.where(empty, 1.0, total)
    lse = jnp.where(empty, -jnp.inf, shift + jnp.log(safe))
    o = (o_a.astype(dtype) * (w_a / safe)[..., None]) + (o_b.astype(dtype) * (w_b / safe)[..., None])
    return o, lse


def merge_partials(o: Array, lse: Array, axis: int = 0) -> tuple[Array, Array]:
    """Reduces S partial results along `axis`: o [..., S, ..., Dv], lse [..., S, ...] (the same axis of both, which
    must not be o's value axis) -> o [..., Dv], lse [...] without that axis.

    One S-way step (every part rescaled by exp(lse_s - lse) at once), equal to folding `merge` over the parts in
    any order; parts with lse = -inf (empty splits) contribute nothing, all empty gives (0, -inf)."""
    _check(o, lse, "merge_partials")
    if not -lse.ndim <= axis < lse.ndim:
        raise ValueError(f"axis={axis} is out of range for lse of shape {lse.shape} (the split axis of lse and o)")
    axis = axis % lse.ndim
    dtype = _dtype(o, lse)
    lse = lse.astype(dtype)
    top = jnp.max(lse, axis=axis, keepdims=True)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - shift)
    total = jnp.sum(weights, axis=axis, keepdims=True)
    empty = total == 0.0
    safe = jnp.where(empty, 1.0, total)
    merged_lse = jnp.squeeze(jnp.where(empty, -jnp.inf, shift + jnp.log(safe)), axis)
    merged_o = jnp.sum(o.astype(dtype) * (weights / safe)[..., None], axis=axis)
    return merged_o, merged_lse
