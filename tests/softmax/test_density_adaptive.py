"""`density_adaptive` (DAAM): the official product-of-densities formula, the product-of-Gaussians identity, the
uniform limit, padding, gradients and option errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_finite_grads, init

import attn
from attn.softmax.density_adaptive import density_adaptive_attention

B, T, E, H, D, G = 2, 6, 8, 2, 4, 2
X = jax.random.normal(jax.random.key(0), (B, T, E))
V = jax.random.normal(jax.random.key(1), (B, T, H, D)) * 1.5 - 0.3
OFFSETS = jax.random.normal(jax.random.key(2), (H, G)) * 0.5
SCALES = jnp.exp(jax.random.normal(jax.random.key(3), (H, G)) * 0.3)
LENGTHS = jnp.array([6, 3])
PADDED = attn.Mask(q_lengths=LENGTHS, kv_lengths=LENGTHS)


def official_product(v, offsets, scales, axis):
    """The official DAAM head (DensityAdaptiveAttention) in numpy, with the population variance."""
    v = np.asarray(v, np.float64)
    ax = 1 if axis == "sequence" else 3
    mean, var = v.mean(ax, keepdims=True), v.var(ax, keepdims=True) + 1e-8
    g = 1.0
    for j in range(offsets.shape[1]):
        c2 = scales[None, None, :, None, j] ** 2 + 1e-8
        y = (v - (mean + offsets[None, None, :, None, j])) / np.sqrt(var)
        g = g * np.exp(-(y**2) / (2 * c2)) / np.sqrt(2 * np.pi * c2)
    return v * g / g.sum(ax, keepdims=True)


@pytest.mark.parametrize("axis", ["sequence", "features"])
def test_functional_equals_the_official_product_of_densities(axis):
    out = density_adaptive_attention(V, OFFSETS, SCALES, axis=axis)
    np.testing.assert_allclose(out, official_product(*map(np.asarray, (V, OFFSETS, SCALES)), axis), atol=2e-5)


def test_a_product_of_gaussians_is_one_gaussian_with_summed_precision():
    precision = 1.0 / SCALES**2
    scale = 1.0 / jnp.sqrt(precision.sum(-1, keepdims=True))
    offset = (OFFSETS * precision).sum(-1, keepdims=True) * scale**2
    both = density_adaptive_attention(V, OFFSETS, SCALES, lengths=LENGTHS, eps=1e-12)
    one = density_adaptive_attention(V, offset, scale, lengths=LENGTHS, eps=1e-12)
    np.testing.assert_allclose(both, one, rtol=1e-4, atol=1e-5)


def test_huge_variance_gives_the_masked_uniform_average():
    layer, params = init("density_adaptive", X, PADDED, num_heads=H, head_dim=D, projections=False, initial_scale=1e6)
    want = np.where(np.arange(T)[None, :, None] < LENGTHS[:, None, None], X / LENGTHS[:, None, None], 0.0)
    np.testing.assert_allclose(apply(layer, params, X, mask=PADDED), want, rtol=1e-5, atol=1e-6)


def test_official_initialisation_and_no_mixture_weights():
    layer, params = init("density_adaptive", X, num_heads=H, head_dim=D)
    p = nn.unbox(params)["params"]
    assert "mixture_logits" not in p and p["scale"].shape == (H, 4)
    assert float(p["scale"].min()) > 0 and float(jnp.std(p["scale"])) > 0  # exp(N(0, 1)), not a constant
    np.testing.assert_array_equal(p["mean_offset"], 0.0)


def test_padded_tokens_change_nothing_and_gradients_are_finite():
    layer, params = init("density_adaptive", X, PADDED, num_heads=H, head_dim=D)
    y = apply(layer, params, X, mask=PADDED)
    x2 = X.at[1, 3:].set(50.0)
    np.testing.assert_allclose(apply(layer, params, x2, mask=PADDED)[1, :3], y[1, :3], atol=1e-6)
    assert_finite_grads(layer, params, X, mask=PADDED)


def test_bad_options_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match=r"axis='channels' must be one of \('sequence', 'features'\)"):
        attn.build("density_adaptive", num_heads=H, head_dim=D, axis="channels")
    layer = attn.build("density_adaptive", num_heads=H, head_dim=D)
    with pytest.raises(ValueError, match="decode=True is not supported by density_adaptive"):
        jax.eval_shape(lambda k: layer.init(k, X, decode=True), jax.random.key(0))
    with pytest.raises(ValueError, match="may only hold padding lengths"):
        jax.eval_shape(lambda k: layer.init(k, X, mask=attn.Mask(window=(1, 1))), jax.random.key(0))
