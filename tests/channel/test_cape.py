"""CAPE: parameter count, identity and condition-independence settings, the Fourier layer, option errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.channel.cape import SpectralConv2d

OPTIONS = {"width": 8, "kernel_size": 3, "modes": 2, "pool": 2}
CONDITION = np.array([[0.3, 2.0], [1.5, 0.7]], np.float32)


def cape_parameter_count(c, p, width, k, modes):
    h, w = width // 2, width
    return (
        k * k * c * h
        + 4 * h * w * modes**2
        + k * k * w
        + 2 * (h * w + w)
        + k * k * w * c
        + 3 * (p * h + h + h * w + w)
        + 2 * c
    )


@pytest.fixture(scope="module")
def setup(quick_params, features):
    x = features((2, 8, 8, 4))
    module = attn.build("cape", **OPTIONS)
    return module, x, quick_params(module, x, condition=CONDITION)


def test_parameter_count(setup, count):
    _, _, params = setup
    assert count(params) == cape_parameter_count(4, 2, 8, 3, 2)


def test_zero_norm_affine_gives_the_identity_and_the_condition_matters_otherwise(setup, jitted):
    module, x, params = setup
    apply = jitted(module)
    out = apply({"params": params}, x, condition=CONDITION)
    assert not np.allclose(out, x)
    other = apply({"params": params}, x, condition=CONDITION[::-1])
    assert not np.allclose(out, other)
    flat = {**params, "norm_scale": np.zeros(4, np.float32), "norm_bias": np.zeros(4, np.float32)}
    np.testing.assert_array_equal(apply({"params": flat}, x, condition=CONDITION), x)


def test_zero_mask_layers_make_the_output_independent_of_the_condition(setup, jitted):
    module, x, params = setup
    params = dict(params)
    for i in range(3):
        params[f"mask_{i}_out"] = jax.tree.map(np.zeros_like, params[f"mask_{i}_out"])
    apply = jitted(module)
    a = apply({"params": params}, x, condition=CONDITION)
    b = apply({"params": params}, x, condition=CONDITION * 3.0)
    np.testing.assert_array_equal(a, b)


def test_sigmoid_log_transform_is_p_over_one_plus_p(setup, jitted):
    module, x, params = setup
    transformed = attn.build("cape", condition_transform="sigmoid_log", **OPTIONS)
    np.testing.assert_allclose(
        jitted(transformed)({"params": params}, x, condition=CONDITION),
        jitted(module)({"params": params}, x, condition=CONDITION / (1 + CONDITION)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_fourier_layer_keeps_low_modes_and_commutes_with_shifts(quick_params, jitted):
    layer = SpectralConv2d(features=3, modes=2)
    grid = np.arange(8)
    high = (np.cos(2 * np.pi * 3 * grid / 8)[None, None, :, None] * np.ones((1, 8, 8, 2))).astype(np.float32)
    params = quick_params(layer, high)
    apply = jitted(layer)
    np.testing.assert_allclose(apply({"params": params}, high), 0.0, atol=1e-5)  # column frequency 3 >= modes
    u = np.random.default_rng(1).standard_normal((1, 8, 8, 2)).astype(np.float32)
    out = apply({"params": params}, u)
    assert np.abs(out).max() > 1e-3
    shifted = apply({"params": params}, np.roll(u, (2, 3), axis=(1, 2)))
    np.testing.assert_allclose(shifted, np.roll(out, (2, 3), axis=(1, 2)), atol=1e-5)


@pytest.mark.parametrize(
    ("options", "condition", "message"),
    [
        ({}, None, "needs condition"),
        ({"modes": 3}, CONDITION, "modes=3"),
        ({"width": 7}, CONDITION, "width=7"),
        ({"pool": 3}, CONDITION, "pool=3"),
        ({"condition_transform": "log"}, CONDITION, "condition_transform='log'"),
        ({}, CONDITION[:, 0], "condition must have shape"),
    ],
)
def test_bad_options_and_condition_are_named(options, condition, message):
    with pytest.raises(ValueError, match=message):
        module = attn.build("cape", **{**OPTIONS, **options})
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((2, 8, 8, 4)), condition=condition)
