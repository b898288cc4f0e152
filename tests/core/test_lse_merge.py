"""The log-sum-exp merge of partial attention results against softmax over the concatenated keys (numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core.lse_merge import merge, merge_partials


def partial_numpy(logits, values):
    """Softmax attention over one part, written out: logits [R, n], values [n, Dv] -> (o [R, Dv], lse [R]).
    An empty part (n = 0 or all logits -inf) gives (0, -inf)."""
    rows = logits.shape[0]
    if logits.shape[1] == 0 or not np.isfinite(logits).any():
        return np.zeros((rows, values.shape[-1])), np.full(rows, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - top)
    return (e @ values) / e.sum(axis=1, keepdims=True), np.log(e.sum(axis=1)) + top[:, 0]


def random_parts(rng, sizes, rows=3, dv=5):
    """Logits [rows, n_i] and values [n_i, dv] for parts of the given sizes, with their numpy partials."""
    logits = [rng.normal(size=(rows, n)) * 3.0 for n in sizes]
    values = [rng.normal(size=(n, dv)) for n in sizes]
    partials = [partial_numpy(s, v) for s, v in zip(logits, values, strict=True)]
    return logits, values, partials


def as_jnp(partial):
    return jnp.asarray(partial[0], jnp.float32), jnp.asarray(partial[1], jnp.float32)


def test_merge_equals_softmax_over_concatenation():
    rng = np.random.default_rng(0)
    logits, values, partials = random_parts(rng, (4, 7))
    o, lse = merge(*as_jnp(partials[0]), *as_jnp(partials[1]))
    ref_o, ref_lse = partial_numpy(np.concatenate(logits, axis=1), np.concatenate(values, axis=0))
    np.testing.assert_allclose(o, ref_o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-6)


def test_merge_is_commutative_and_associative():
    rng = np.random.default_rng(1)
    _, _, (a, b, c) = [x for x in random_parts(rng, (3, 5, 2))]
    a, b, c = as_jnp(a), as_jnp(b), as_jnp(c)
    ab, ba = merge(*a, *b), merge(*b, *a)
    np.testing.assert_allclose(ab[0], ba[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ab[1], ba[1], rtol=1e-6, atol=1e-7)
    left = merge(*merge(*a, *b), *c)
    right = merge(*a, *merge(*b, *c))
    np.testing.assert_allclose(left[0], right[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(left[1], right[1], rtol=1e-6, atol=1e-6)


def test_empty_parts_are_the_identity_and_never_nan():
    rng = np.random.default_rng(2)
    _, _, (a, empty) = random_parts(rng, (4, 0))
    a, empty = as_jnp(a), as_jnp(empty)
    for o, lse in (merge(*a, *empty), merge(*empty, *a)):
        np.testing.assert_allclose(o, a[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(lse, a[1], rtol=1e-6)
    o, lse = merge(*empty, *empty)
    assert np.all(np.asarray(o) == 0.0) and np.all(np.asarray(lse) == -np.inf)
    # gradients through an all-empty merge are finite (zero)
    grads = jax.grad(lambda x, y: jnp.sum(merge(x, empty[1], y, empty[1])[0]), argnums=(0, 1))(empty[0], empty[0])
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_merge_partials_equals_softmax_and_pairwise_fold():
    rng = np.random.default_rng(3)
    sizes = (6, 0, 3, 1, 0)  # empty splits among them
    logits, values, partials = random_parts(rng, sizes)
    o_parts = jnp.stack([as_jnp(p)[0] for p in partials])
    lse_parts = jnp.stack([as_jnp(p)[1] for p in partials])
    o, lse = merge_partials(o_parts, lse_parts, axis=0)
    ref_o, ref_lse = partial_numpy(np.concatenate(logits, axis=1), np.concatenate(values, axis=0))
    np.testing.assert_allclose(o, ref_o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-6)
    folded = as_jnp(partials[-1])
    for p in reversed(partials[:-1]):  # right-to-left fold: another order, same result
        folded = merge(*as_jnp(p), *folded)
    np.testing.assert_allclose(o, folded[0], rtol=1e-5, atol=1e-6)
    # the split axis anywhere (here axis 1 of lse [R, S], axis 1 of o [R, S, Dv])
    o_t, lse_t = merge_partials(jnp.swapaxes(o_parts, 0, 1), lse_parts.T, axis=1)
    np.testing.assert_allclose(o_t, o, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lse_t, lse, rtol=1e-6)


def test_merge_partials_all_empty():
    o, lse = merge_partials(jnp.ones((3, 2, 4)), jnp.full((3, 2), -jnp.inf), axis=0)
    assert np.all(np.asarray(o) == 0.0) and np.all(np.asarray(lse) == -np.inf)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="do not pair up"):
        merge(jnp.zeros((2, 3)), jnp.zeros((3,)), jnp.zeros((2, 3)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="different shapes"):
        merge(jnp.zeros((2, 3)), jnp.zeros((2,)), jnp.zeros((2, 4)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="axis=2"):
        merge_partials(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)), axis=2)
