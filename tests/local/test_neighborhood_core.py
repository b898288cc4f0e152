"""attn.functional.neighborhood_attention: equal to dense softmax attention under NATTEN's mask (built here with
loops), key counts, special cases (full extent, blocked), probabilities, gradients, jit and errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from local_reference import dense_attention, loop_mask, loop_relative_bias, normal, per_axis

from attn import functional as F
from attn.core.neighborhood import (
    neighborhood_key_indices,
    neighborhood_mask,
    window_indices,
    window_probs_to_dense,
    window_start,
)

ATOL = 2e-5


@st.composite
def configs(draw):
    rank = draw(st.integers(1, 3))
    spatial, kernel, dil, strd, caus = [], [], [], [], []
    for _ in range(rank):
        n = draw(st.integers(1, 9 if rank == 1 else 6))
        k = draw(st.integers(1, n))
        d = draw(st.integers(1, n // k))
        spatial.append(n)
        kernel.append(k)
        dil.append(d)
        strd.append(draw(st.integers(1, k)))
        caus.append(draw(st.booleans()))
    return tuple(spatial), tuple(kernel), tuple(dil), tuple(strd), tuple(caus)


@settings(max_examples=60, deadline=None)
@given(configs())
def test_mask_equals_loop_definition(config):
    spatial, kernel, dil, strd, caus = config
    mask = neighborhood_mask(spatial, kernel, dil, strd, caus)
    np.testing.assert_array_equal(mask, loop_mask(spatial, kernel, dil, strd, caus))
    # The gathered windows describe the same mask, and every query is inside its own window.
    keys, valid = neighborhood_key_indices(spatial, kernel, dil, strd, caus)
    rebuilt = np.zeros_like(mask)
    np.put_along_axis(rebuilt, keys, valid, axis=1)
    np.testing.assert_array_equal(rebuilt, mask)
    assert np.diagonal(mask).all()


@pytest.mark.parametrize(
    "spatial, kernel, dilation",
    [((13,), 4, 3), ((7, 9), (3, 4), (2, 1)), ((4, 5, 6), (2, 3, 5), 1)],
)
def test_each_query_sees_exactly_its_keys(spatial, kernel, dilation):
    rank = len(spatial)
    kernel, dilation = per_axis(kernel, rank), per_axis(dilation, rank)
    # Non-causal: exactly prod(kernel) keys, whatever the stride, also at the borders.
    for stride in [(1,) * rank, kernel]:
        counts = neighborhood_mask(spatial, kernel, dilation, stride).sum(1)
        np.testing.assert_array_equal(counts, math.prod(kernel))
    # Causal, stride 1: min(position in the dilation group + 1, kernel) keys per axis.
    counts = neighborhood_mask(spatial, kernel, dilation, 1, True).sum(1)
    grids = np.meshgrid(*[np.arange(n) for n in spatial], indexing="ij")
    expected = np.prod([np.minimum(g // d + 1, k) for g, d, k in zip(grids, dilation, kernel, strict=True)], axis=0)
    np.testing.assert_array_equal(counts, expected.reshape(-1))


def test_full_extent_is_full_attention_and_stride_kernel_is_blocked():
    spatial = (6, 4, 3)
    assert neighborhood_mask(spatial, spatial).all()
    blocked = neighborhood_mask((6, 4), (3, 2), 1, (3, 2))
    rows, cols = np.meshgrid(np.arange(6), np.arange(4), indexing="ij")
    block = (rows // 3 * 2 + cols // 2).reshape(-1)
    np.testing.assert_array_equal(blocked, block[:, None] == block[None, :])


def qkv(spatial, heads=2, kv_heads=2, dim=8, seed=0):
    q = normal((2, *spatial, heads, dim), seed)
    k = normal((2, *spatial, kv_heads, dim), seed + 1)
    v = normal((2, *spatial, kv_heads, dim), seed + 2)
    return q, k, v


CASES = [
    # spatial, kernel, dilation, stride, causal, heads, kv_heads, rpb
    ((11,), 4, 2, 3, False, 2, 2, True),
    ((9,), 3, 2, 2, True, 4, 1, False),
    ((5, 7), (3, 4), (1, 1), (2, 1), (True, False), 4, 2, True),
    ((6, 5), (3, 3), (2, 1), 1, False, 2, 2, False),
    ((3, 4, 5), (2, 3, 3), (1, 1, 1), (2, 1, 3), (False, True, False), 2, 1, True),
    ((4, 3, 5), (2, 3, 2), (2, 1, 2), 1, False, 2, 2, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{len(c[0])}d-{i}" for i, c in enumerate(CASES)])
def test_equals_dense_masked_attention(case):
    spatial, kernel, dilation, stride, causal, heads, kv_heads, with_rpb = case
    q, k, v = qkv(spatial, heads, kv_heads)
    rank = len(spatial)
    rpb = None
    if with_rpb:
        shape = (heads, *(2 * kk - 1 for kk in per_axis(kernel, rank)))
        rpb = normal(shape, 7)
    op = jax.jit(
        functools.partial(F.neighborhood_attention, kernel_size=kernel, dilation=dilation, stride=stride, causal=causal)
    )
    out = op(q, k, v, rpb=rpb)
    mask = loop_mask(spatial, kernel, dilation, stride, causal)
    bias = None if rpb is None else loop_relative_bias(np.asarray(rpb), spatial, kernel, dilation, mask)
    np.testing.assert_allclose(out, dense_attention(q, k, v, mask, bias), atol=ATOL, rtol=1e-5)


def test_full_extent_equals_full_attention_and_probs():
    spatial = (4, 5)
    q, k, v = qkv(spatial, heads=4, kv_heads=2)
    out, aux = jax.jit(lambda q, k, v: F.neighborhood_attention(q, k, v, kernel_size=spatial, return_probs=True))(
        q, k, v
    )
    np.testing.assert_allclose(out, dense_attention(q, k, v), atol=ATOL, rtol=1e-5)
    dense = window_probs_to_dense(aux["probs"], aux["key_indices"], 20)
    flat = [t.reshape(2, 20, *t.shape[-2:]) for t in (q, k, v)]
    _, ref = jax.jit(lambda q, k, v: F.softmax_attention(q, k, v, return_probs=True))(*flat)
    np.testing.assert_allclose(dense, ref["probs"], atol=1e-6)


def test_blocked_probabilities_vanish_outside_the_block():
    q, k, v = qkv((6,))
    _, aux = jax.jit(
        lambda q, k, v: F.neighborhood_attention(q, k, v, kernel_size=3, stride=3, return_probs=True, causal=True)
    )(q, k, v)
    dense = np.asarray(window_probs_to_dense(aux["probs"], aux["key_indices"], 6))
    allowed = loop_mask((6,), 3, 1, 3, True)
    assert np.all(dense[:, :, ~allowed] == 0)
    np.testing.assert_allclose(dense.sum(-1), 1.0, atol=1e-6)


def test_gradients_match_dense_reference():
    spatial, kernel, dilation, stride, causal = (5, 6), (3, 2), (1, 2), (2, 1), (False, True)
    q, k, v = qkv(spatial, heads=2, kv_heads=1)
    rpb = 0.1 * normal((2, 5, 3), 3)
    mask = loop_mask(spatial, kernel, dilation, stride, causal)
    weights = normal(q.shape, 4)

    def loss(q, k, v, rpb):
        out = F.neighborhood_attention(
            q, k, v, kernel_size=kernel, dilation=dilation, stride=stride, causal=causal, rpb=rpb
        )
        return jnp.sum(out * weights)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, rpb)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)

    def reference(q, k, v):
        bias = loop_relative_bias(np.asarray(rpb), spatial, kernel, dilation, mask)
        return jnp.sum(dense_attention(q, k, v, mask, bias) * weights)

    for got, want in zip(grads[:3], jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, atol=4e-5, rtol=1e-4)


def test_window_start_traced_equals_numpy():
    args = dict(extent=11, kernel_size=4, dilation=2, stride=3)
    for causal in (False, True):
        traced = jax.jit(lambda i, c=causal: window_start(i, causal=c, **args))(jnp.arange(11))
        np.testing.assert_array_equal(traced, window_start(np.arange(11), causal=causal, **args))
    indices, valid = window_indices(11, 4, 2, 3, True)
    assert indices.min() >= 0 and indices.max() < 11 and valid.any(1).all()


def test_dropout_keeps_expectation_shape_and_needs_rng():
    q, k, v = qkv((8,))
    op = jax.jit(functools.partial(F.neighborhood_attention, kernel_size=3))
    out = jax.jit(
        functools.partial(F.neighborhood_attention, kernel_size=3, dropout_rate=0.5, dropout_rng=jax.random.key(0))
    )(q, k, v)
    assert out.shape == q.shape and not np.allclose(out, op(q, k, v))
    with pytest.raises(ValueError, match="dropout_rate > 0 needs dropout_rng"):
        F.neighborhood_attention(q, k, v, kernel_size=3, dropout_rate=0.5)


def test_errors_name_the_argument():
    q, k, v = qkv((6, 5))
    na = F.neighborhood_attention
    with pytest.raises(
        ValueError,
        match=r"kernel_size=\(4, 3\) with dilation=\(2, 1\) does not fit spatial_shape=\(6, 5\): axis 0 needs kernel_size \* dilation = 8 <= extent 6",
    ):
        na(q, k, v, kernel_size=(4, 3), dilation=(2, 1))
    with pytest.raises(ValueError, match=r"kernel_size=\(0, 3\) must be >= 1 on every axis \(axis 0 has 0\)"):
        na(q, k, v, kernel_size=(0, 3))
    with pytest.raises(ValueError, match=r"stride=\(3, 1\) must be <= kernel_size=\(2, 2\)"):
        na(q, k, v, kernel_size=2, stride=(3, 1))
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 3, 3\) has 3 entries but the input has 2 spatial axes"):
        na(q, k, v, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match=r"causal=\(True,\) has 1 entries but the input has 2 spatial axes"):
        na(q, k, v, kernel_size=3, causal=(True,))
    with pytest.raises(ValueError, match=r"dilation=1.5 must be an int or a tuple of 2 ints"):
        na(q, k, v, kernel_size=3, dilation=1.5)
    with pytest.raises(
        ValueError,
        match=r"q must have rank 4 or 5 or 6 \[batch, \*spatial \(1 to 3 axes\), heads, head_dim\], got shape \(2, 480\)",
    ):
        na(q.reshape(2, -1), k, v, kernel_size=3)
    with pytest.raises(ValueError, match=r"k and v have spatial shape \(5, 6\) but q has \(6, 5\)"):
        na(q, k.reshape(2, 5, 6, 2, 8), v.reshape(2, 5, 6, 2, 8), kernel_size=3)
    with pytest.raises(
        ValueError, match=r"rpb must have shape \[heads, 2 \* kernel_size - 1 per axis\] = \(2, 5, 5\), got \(2, 3, 3\)"
    ):
        na(q, k, v, kernel_size=3, rpb=jnp.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="implementation='pallas' is not available for neighborhood_attention"):
        na(q, k, v, kernel_size=3, implementation="pallas")


def test_no_token_by_token_array_is_built():
    # 96 x 96 tokens: a dense score matrix would hold N^2 = 85M entries; the gather path stays O(N k^2 D) (traced
    # only, nothing runs).
    spatial, tokens = (96, 96), 96 * 96
    q = jax.ShapeDtypeStruct((1, *spatial, 1, 4), jnp.float32)
    for args in [dict(kernel_size=3), dict(kernel_size=5, dilation=2, stride=2, causal=(True, False))]:
        jaxpr = jax.make_jaxpr(lambda q, k, v, a=args: F.neighborhood_attention(q, k, v, return_probs=True, **a))(
            q, q, q
        )
        sizes = [math.prod(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars]
        sizes += [np.size(c) for c in jaxpr.consts]
        assert max(sizes) < tokens * tokens // 20
