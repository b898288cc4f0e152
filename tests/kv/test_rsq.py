"""RSQ (attn.kv.rsq): AttnCon equals explicit column sums min-max scaled; uniform importance gives GPTQ's Hessian;
GPTQ equals a numpy loop over columns (float64) for both quantizers; importance-weighted GPTQ reconstructs the
important tokens better than plain GPTQ and beats round-to-nearest on its own objective; bad input raises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.kv import rsq


def np_gptq(w, h, bits, symmetric, percdamp=0.01):
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    d_in = w.shape[1]
    for c in range(d_in):
        if h[c, c] == 0:
            h[c, c], w[:, c] = 1.0, 0.0
    wmin, wmax = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale, zero, lo, hi = np.maximum(np.maximum(-wmin, wmax), 1e-5) / top, 0 * wmin, -(top + 1), top
    else:
        scale = np.maximum(wmax - wmin, 1e-5) / (2**bits - 1)
        zero, lo, hi = np.round(-wmin / scale), 0, 2**bits - 1
    h += percdamp * np.mean(np.diag(h)) * np.eye(d_in)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for c in range(d_in):
        for r in range(w.shape[0]):
            q[r, c] = (np.clip(np.round(w[r, c] / scale[r]) + zero[r], lo, hi) - zero[r]) * scale[r]
        err = (w[:, c] - q[:, c]) / u[c, c]
        for c2 in range(c + 1, d_in):
            w[:, c2] -= err * u[c, c2]
    return q


def test_attention_concentration_is_scaled_column_sums():
    weights = np.random.default_rng(0).dirichlet(np.ones(6), size=(2, 3, 6))  # [S, H, Tq, T]
    expected = np.zeros((2, 6))
    for s in range(2):
        received = [sum(weights[s, h, i, j] for h in range(3) for i in range(6)) for j in range(6)]
        lo, hi = min(received), max(received)
        expected[s] = [1 + 2 * (a - lo) / (hi - lo) for a in received]
    np.testing.assert_allclose(rsq.attention_concentration(jnp.asarray(weights)), expected, rtol=1e-5)


def test_uniform_importance_is_the_gptq_hessian():
    x = jax.random.normal(jax.random.key(0), (3, 5, 4))
    plain = 2.0 / 3 * sum(np.asarray(x[s]).T @ np.asarray(x[s]) for s in range(3))
    np.testing.assert_allclose(rsq.weighted_hessian(x), plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rsq.weighted_hessian(x, jnp.full((3, 5), 2.5)), plain, rtol=1e-5, atol=1e-6)
    weight = np.array([[1.0, 3, 1, 1, 1]] * 3)  # normalised per sequence to mean 1
    w = weight / weight.sum(1, keepdims=True) * 5
    expected = 2.0 / 3 * sum(np.asarray(x[s]).T @ np.diag(w[s]) @ np.asarray(x[s]) for s in range(3))
    np.testing.assert_allclose(rsq.weighted_hessian(x, jnp.asarray(weight)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (3, False)])
def test_gptq_equals_numpy_loop(bits, symmetric):
    key_w, key_x = jax.random.split(jax.random.key(1))
    w = jax.random.normal(key_w, (6, 8))
    h = rsq.weighted_hessian(jax.random.normal(key_x, (2, 12, 8)))
    h = h.at[3, :].set(0.0).at[:, 3].set(0.0)  # a dead input channel
    q = rsq.gptq(w, h, bits=bits, symmetric=symmetric)
    expected = np_gptq(np.asarray(w), np.asarray(h), bits, symmetric)
    np.testing.assert_allclose(q, expected, atol=1e-4)
    assert np.all(np.asarray(q)[:, 3] == 0)
    levels = [len(np.unique(np.round(row, 5))) for row in np.asarray(q)]
    assert max(levels) <= 2**bits


def test_importance_steers_the_reconstruction():
    """Tokens with high attention are reconstructed better by RSQ than by plain GPTQ; both beat round-to-nearest on
    their own objective."""
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    w = jax.random.normal(k1, (16, 16))
    x = jax.random.normal(k2, (1, 32, 16)) * jnp.linspace(0.2, 2.0, 16)
    weights = jnp.full((1, 2, 32, 32), 1e-3).at[:, :, :, :4].set(1.0)  # the first 4 tokens get the attention
    importance = rsq.attention_concentration(weights)
    plain = rsq.gptq(w, rsq.weighted_hessian(x), bits=3)
    steered = rsq.rsq_quantize(w, x, weights, bits=3)

    def error(q, rows):
        return float(jnp.sum(((w - q) @ x[0, rows].T) ** 2))

    important = jnp.arange(4)
    assert error(steered, important) < error(plain, important)
    scale, zero, lo, hi = rsq.row_quantizer(w, 3, True)
    nearest = (jnp.clip(jnp.round(w / scale) + zero, lo, hi) - zero) * scale
    weighted = lambda q: float(jnp.sum(((w - q) @ x[0].T) ** 2 * importance[0]))  # noqa: E731
    assert weighted(steered) < weighted(nearest)
    assert error(plain, jnp.arange(32)) < error(nearest, jnp.arange(32))


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"weights has shape \(2, 3, 4\)"):
        rsq.attention_concentration(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"importance has shape \(2, 4\); expected \(2, 5\)"):
        rsq.weighted_hessian(jnp.ones((2, 5, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="bits=1 must be an int in"):
        rsq.gptq(jnp.ones((2, 3)), jnp.eye(3), bits=1)
    with pytest.raises(ValueError, match=r"w \(2, 3\) and hessian \(4, 4\)"):
        rsq.gptq(jnp.ones((2, 3)), jnp.eye(4))
