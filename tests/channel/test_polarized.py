"""Polarized Self-Attention: 4 C r + 3 C parameters and both layouts against the paper's equations by hand."""

import jax
import numpy as np
import pytest

import attn


def softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def psa_by_hand(x, p, layout):
    """The paper's PSA on x [B, H, W, C] from the module's parameters (1x1 conv kernels [1, 1, in, out])."""

    def w(name):
        return p[name]["kernel"].reshape(p[name]["kernel"].shape[-2:])

    probs = softmax((x @ w("channel_query"))[..., 0].reshape(x.shape[0], -1), axis=1)  # [B, HW]
    values = (x @ w("channel_value")).reshape(x.shape[0], -1, w("channel_value").shape[1])  # [B, HW, r]
    z = np.einsum("bn,bnr->br", probs, values) @ p["channel_up"]["kernel"]
    z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
    a_ch = sigmoid(z * p["channel_norm"]["scale"] + p["channel_norm"]["bias"])
    z_ch = x * a_ch[:, None, None, :]
    source = x if layout == "parallel" else z_ch
    q = softmax((source @ w("spatial_query")).mean(axis=(1, 2)), axis=-1)  # [B, r]
    a_sp = sigmoid(np.einsum("bhwr,br->bhw", source @ w("spatial_value"), q))
    z_sp = source * a_sp[..., None]
    return (z_ch + z_sp if layout == "parallel" else z_sp), a_ch, a_sp


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_matches_the_paper_equations(layout, quick_params, count, features, jitted):
    x = features((2, 4, 5, 16))
    module = attn.build("polarized", layout=layout)
    p = quick_params(module, x)
    assert count(p) == 4 * 16 * 8 + 3 * 16  # r = C / 2
    out, state = jitted(module)({"params": p}, x, mutable=("intermediates",))
    expected, a_ch, a_sp = psa_by_hand(x, p, layout)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    got_ch, got_sp = state["intermediates"]["attention_map"][0]
    np.testing.assert_allclose(got_ch, a_ch, rtol=1e-4)
    np.testing.assert_allclose(got_sp, a_sp, rtol=1e-4)
    assert np.all((a_ch > 0) & (a_ch < 1)) and np.all((a_sp > 0) & (a_sp < 1))


def test_inner_channels_sets_the_width(abstract_params, count):
    params = abstract_params(attn.build("polarized", inner_channels=4), np.zeros((1, 3, 3, 16), np.float32))
    assert count(params) == 4 * 16 * 4 + 3 * 16


@pytest.mark.parametrize(
    ("options", "message"), [({"layout": "diagonal"}, "layout='diagonal'"), ({"inner_channels": 0}, "inner_channels=0")]
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(attn.build("polarized", **options).init, jax.random.key(0), np.zeros((1, 3, 3, 8), np.float32))
