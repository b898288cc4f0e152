"""ELA: the four versions' parameter counts, the closed form (shared conv + GN, sigmoid), rank-1 gates."""

import jax
import numpy as np
import pytest

import attn


def group_norm(z, groups, scale, bias, eps=1e-5):
    """GroupNorm of z [B, L, C]: statistics over (L, channels of the group)."""
    b, length, c = z.shape
    g = z.reshape(b, length, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(z.shape) * scale + bias


@pytest.mark.parametrize(("variant", "expected"), [("T", 5 * 32), ("B", 7 * 32), ("S", 5 * 32 * 8), ("L", 7 * 32 * 8)])
def test_parameter_count_of_each_version(variant, expected, abstract_params, count):
    params = abstract_params(attn.build("ela", variant=variant), np.zeros((1, 6, 6, 32), np.float32))
    assert count(params) == expected + 2 * 32  # conv k * C * C/groups, GroupNorm scale and bias


def test_output_matches_the_formula(quick_params, features, jitted):
    x = features((2, 6, 5, 32))
    module = attn.build("ela", variant="B")
    p = quick_params(module, x)
    kernel = p["conv"]["kernel"][:, 0, :]  # depthwise: [k, 1, C] -> [k, C]
    k = kernel.shape[0]

    def gate(z):  # z [B, L, C]: depthwise conv along L (zero padding), GroupNorm(16), sigmoid
        padded = np.pad(z, ((0, 0), (k // 2, k // 2), (0, 0)))
        conv = sum(padded[:, j : j + z.shape[1]] * kernel[j] for j in range(k))
        return 1 / (1 + np.exp(-group_norm(conv, 16, p["norm"]["scale"], p["norm"]["bias"])))

    a_h, a_w = gate(x.mean(axis=2)), gate(x.mean(axis=1))
    expected = x * a_h[:, :, None, :] * a_w[:, None, :, :]
    np.testing.assert_allclose(jitted(module)({"params": p}, x), expected, rtol=1e-4, atol=1e-5)


def test_grouped_version_gate_is_an_outer_product_per_channel(quick_params, features, jitted):
    x = features((1, 6, 7, 32)) + 3.0  # away from zero so out / x is well conditioned
    module = attn.build("ela", variant="S")
    gate = np.asarray(jitted(module)({"params": quick_params(module, x)}, x)) / x
    # rank one over (H, W) for each channel: g[h, w] g[h', w'] == g[h, w'] g[h', w]
    lhs = np.einsum("bhwc,bijc->bhwijc", gate, gate)
    rhs = np.einsum("bhjc,biwc->bhwijc", gate, gate)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)
    assert np.all(gate > 0) and np.all(gate < 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"variant": "X"}, "variant='X'"),
        ({"norm_groups": 5}, "norm_groups=5"),
        ({"kernel_size": 6}, "kernel_size=6"),
        ({"conv_groups": 3}, "conv_groups=3"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(attn.build("ela", **options).init, jax.random.key(0), np.zeros((1, 4, 4, 32), np.float32))
