"""Guided dual attention: PAM and CAM against their formulas (identity at gamma = 0), the guided composition,
the reconstruction loss, parameter counts, option errors."""

import jax
import numpy as np
import pytest

import attn
from attn.channel.dual_attention import ChannelAttention, PositionAttention


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def conv_norm_act(cin, cout, prelu=True):
    return 9 * cin * cout + cout + 2 * cout + (1 if prelu else 0)


def dual_attention_count(c, cf, ck, guidance):
    branch = conv_norm_act(cf, c) + conv_norm_act(c, c)
    total = 2 * branch + 2 * (c * ck + ck) + c * c + c + 1 + 1 + c * c + c
    if guidance:
        encoder = conv_norm_act(cf, 2 * cf, False) + conv_norm_act(2 * cf, 2 * cf, False)
        encoder += conv_norm_act(2 * cf, 4 * cf, False) + conv_norm_act(4 * cf, 4 * cf, False)
        decoder = conv_norm_act(4 * cf, 2 * cf, False) + conv_norm_act(2 * cf, 2 * cf, False) + 4 * 4 * cf * cf + 2 * cf
        decoder += conv_norm_act(2 * cf, cf, False) + conv_norm_act(cf, cf, False) + 4 * cf * cf + cf
        total += encoder + decoder + 9 * cf * c + c
    return total


def test_position_attention_is_softmax_attention_over_pixels_and_identity_at_gamma_zero(quick_params, features, jitted):
    u = features((2, 4, 3, 8))
    module = PositionAttention(key_channels=2)
    p = quick_params(module, u)
    flat = u.reshape(2, 12, 8)
    q = flat @ p["query"]["kernel"][0, 0] + p["query"]["bias"]
    k = flat @ p["key"]["kernel"][0, 0] + p["key"]["bias"]
    v = flat @ p["value"]["kernel"][0, 0] + p["value"]["bias"]
    expected = 0.7 * (softmax(q @ k.transpose(0, 2, 1)) @ v) + flat  # no 1/sqrt(d) scale
    apply = jitted(module)
    out = apply({"params": {**p, "gamma": np.float32(0.7)}}, u)
    np.testing.assert_allclose(np.asarray(out).reshape(2, 12, 8), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(apply({"params": {**p, "gamma": np.float32(0.0)}}, u), u)


def test_channel_attention_is_softmax_of_minus_the_gram_matrix(features, jitted):
    u = features((2, 4, 4, 6)) * 0.3
    module = ChannelAttention()
    tokens = u.reshape(2, 16, 6).transpose(0, 2, 1)  # [B, C, HW]
    energy = tokens @ tokens.transpose(0, 2, 1)
    weights = softmax(energy.max(-1, keepdims=True) - energy)  # DANet's form
    expected = (0.5 * (weights @ tokens) + tokens).transpose(0, 2, 1).reshape(u.shape)
    apply = jitted(module)
    out, state = apply({"params": {"gamma": np.float32(0.5)}}, u, mutable=("intermediates",))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    probs = np.asarray(state["intermediates"]["channel_attention_weights"][0])
    assert probs.shape == (2, 1, 6, 6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(apply({"params": {"gamma": np.float32(0.0)}}, u, mutable=("intermediates",))[0], u)


def test_guided_composition_loss_and_guide_input(quick_params, count, features, jitted):
    x, guide = features((2, 8, 8, 8)), features((2, 8, 8, 8), seed=1)
    module = attn.build("dual_attention")
    p = quick_params(module, x, guide=guide)
    assert count(p) == dual_attention_count(8, 16, 1, guidance=True)
    out, state = jitted(module)(
        {"params": p}, x, guide=guide, capture_intermediates=True, mutable=("losses", "intermediates")
    )
    inter = state["intermediates"]
    attended = inter["position_out"]["__call__"][0] + inter["channel_out"]["__call__"][0]
    guided = attended * inter["guidance_proj"]["__call__"][0]
    expected = guided @ p["out"]["kernel"][0, 0] + p["out"]["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert out.shape == x.shape
    code, reconstruction = inter["guidance"]["__call__"][0]
    assert code.shape == (2, 2, 2, 64) and reconstruction.shape == (2, 8, 8, 16)
    f = np.concatenate([x, guide], axis=-1)
    loss = state["losses"]["reconstruction"][0]
    np.testing.assert_allclose(loss, np.mean((np.asarray(reconstruction) - f) ** 2), rtol=1e-5)
    np.testing.assert_array_equal(inter["semantic_code"][0], code)


def test_without_guidance_it_is_danet_pam_plus_cam(abstract_params, count):
    params = abstract_params(attn.build("dual_attention", guidance=False), np.zeros((1, 6, 6, 16), np.float32))
    assert "guidance" not in params
    assert count(params) == dual_attention_count(16, 16, 2, guidance=False)


@pytest.mark.parametrize(
    ("options", "shape", "message"),
    [
        ({}, (1, 6, 6, 8), "guidance=True needs height and width divisible by 4"),
        ({"norm_groups": 3}, (1, 8, 8, 8), "norm_groups=3"),
        ({"key_channels": 0}, (1, 8, 8, 8), "key_channels=0"),
    ],
)
def test_bad_options_name_the_option(options, shape, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(attn.build("dual_attention", **options).init, jax.random.key(0), np.zeros(shape, np.float32))
