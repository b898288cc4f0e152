"""LKA: C^2 + 77 C parameters, x * conv chain by hand, and the 23 x 23 receptive field of the 21 x 21 decomposition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn


def depthwise(x, kernel, bias, dilation=1):
    """Reference depthwise conv with "same" padding through lax (independent of flax.linen.Conv)."""
    channels = x.shape[-1]
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding="SAME",
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
        precision="highest",
    )
    return y + bias


def test_output_is_x_times_the_conv_chain(quick_params, count, features, jitted):
    x = features((2, 9, 11, 8))
    module = attn.build("lka")
    p = quick_params(module, x)
    assert count(p) == 8 * 8 + 77 * 8
    assert p["depthwise"]["kernel"].shape == (5, 5, 1, 8)
    assert p["depthwise_dilated"]["kernel"].shape == (7, 7, 1, 8)
    attention = depthwise(x, p["depthwise"]["kernel"], p["depthwise"]["bias"])
    attention = depthwise(attention, p["depthwise_dilated"]["kernel"], p["depthwise_dilated"]["bias"], dilation=3)
    attention = attention @ p["pointwise"]["kernel"][0, 0] + p["pointwise"]["bias"]
    np.testing.assert_allclose(jitted(module)({"params": p}, x), x * attention, rtol=1e-4, atol=1e-5)


def test_receptive_field_is_23_by_23(quick_params, features):
    x = features((1, 31, 31, 4))
    module = attn.build("lka")
    p = quick_params(module, x)
    grad = jax.jit(jax.grad(lambda x: module.apply({"params": p}, x)[0, 15, 15].sum()))(jnp.asarray(x))
    reached = np.abs(np.asarray(grad)).sum(axis=(0, 3)) > 0
    expected = np.zeros((31, 31), bool)
    expected[15 - 11 : 15 + 12, 15 - 11 : 15 + 12] = True  # 5 + (7 - 1) * 3 = 23 pixels per axis
    np.testing.assert_array_equal(reached, expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"kernel_size": 4}, "kernel_size=4"), ({"dilation": 0}, "dilation=0"), ({"dilated_kernel_size": 2}, "dilated")],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(attn.build("lka", **options).init, jax.random.key(0), np.zeros((1, 4, 4, 8), np.float32))
