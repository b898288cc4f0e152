"""[168] dgq: the log, uniform and grouped affine quantizers against numpy, k-means grouping, rules on a DiT, no-op
and bad input."""

import jax
import numpy as np
import pytest

import attn
from attn.interventions import run_with_cache
from attn.steer import STEERERS, Dgq
from attn.steer.dgq import (
    GroupCalibration,
    affine_quantize,
    calibrate,
    group_parameters,
    kmeans_groups,
    log_quantize,
    uniform_quantize_weights,
)
from tests.steer.tiny_dit import CAPTIONS, NOISE, TIMES, init_params, tiny_dit


def test_quantizers_match_numpy():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(6), size=(2, 3)).astype(np.float32)  # [B, Nq, Nk] rows summing to 1
    weights[0, 0, 0] = 0.0
    for bits in (2, 4, 8):
        expected = np.zeros_like(weights)
        expected_uniform = np.zeros_like(weights)
        for b in range(2):
            delta = weights[b].max()
            with np.errstate(divide="ignore"):
                codes = np.clip(np.round(-np.log2(weights[b] / delta)), 0, 2**bits - 1)
            expected[b] = delta * 2.0**-codes
            step = delta / (2**bits - 1)
            expected_uniform[b] = step * np.clip(np.round(weights[b] / step), 0, 2**bits - 1)
        np.testing.assert_allclose(jax.jit(log_quantize)(weights, bits), expected, rtol=1e-6)
        uniform = jax.jit(uniform_quantize_weights)(weights, bits)
        np.testing.assert_allclose(uniform, expected_uniform, rtol=1e-6)
    got = np.asarray(jax.jit(log_quantize)(weights, 8))
    assert got[0, 0, 0] < 1e-30 and np.all(got[weights > 0] > 0)  # zero -> the smallest code, never negative
    x = rng.normal(size=(5, 4)).astype(np.float32)
    step, zero = np.array([0.1, 0.2, 0.05, 0.3], np.float32), np.array([3.0, 1.0, 7.0, 0.0], np.float32)
    expected = step * (np.clip(np.round(x / step) + zero, 0, 15) - zero)
    np.testing.assert_allclose(jax.jit(affine_quantize)(x, step, zero, 4), expected, rtol=1e-6)


def test_groups_keep_an_outlier_channel_apart():
    lo = np.array([-1.0, -1.1, -0.9, -1.0, -20.0])
    hi = np.array([1.0, 1.1, 0.9, 1.05, 30.0])  # the last channel is an outlier
    labels = kmeans_groups(np.stack([lo, hi], 1), 2)
    assert len(set(labels[:4])) == 1 and labels[4] != labels[0]
    step, zero = group_parameters(lo, hi, 2, 8)
    np.testing.assert_allclose(step[:4], 2.2 / 255, rtol=1e-6)  # the group's range [-1.1, 1.1]
    np.testing.assert_allclose(step[4], 50.0 / 255, rtol=1e-6)
    np.testing.assert_allclose(zero[:4], round(1.1 / (2.2 / 255)))
    np.testing.assert_array_equal(kmeans_groups(np.zeros((3, 2)), 5), [0, 1, 2])


def test_bad_settings_and_no_op():
    for kwargs, name in (
        ({"bits": 1}, "bits=1"),
        ({"attention_bits": 17}, "attention_bits=17"),
        ({"groups": 0}, "groups=0"),
    ):
        with pytest.raises(ValueError, match=name):
            Dgq(**kwargs)
    model = tiny_dit()
    assert Dgq(bits=None, attention_bits=None).rules(model) == ()
    with pytest.raises(ValueError, match="calibration=None"):
        Dgq(bits=8).rules(model)
    with pytest.raises(ValueError, match="model: this DiT has cross_attention=None"):
        Dgq(bits=None).rules(tiny_dit(cross_attention=None))
    assert STEERERS["dgq"].fidelity == "official-code"


@pytest.mark.slow  # three compiles of the DiT
def test_rules_quantize_the_captured_stages_and_fewer_bits_move_the_output_more():
    model = tiny_dit()
    params = init_params(model)
    variables = {"params": params}
    calibration = calibrate(model, params, [(NOISE, TIMES, CAPTIONS)])
    assert isinstance(calibration, GroupCalibration) and set(calibration.ranges) == {
        "layers_0/attention",
        "layers_0/cross_attention",
    }
    apply = jax.jit(lambda v: model.apply(v, NOISE, TIMES, CAPTIONS))
    plain = np.asarray(apply(variables))
    with attn.intervene(*Dgq(bits=None, attention_bits=None).rules(model)):
        np.testing.assert_array_equal(np.asarray(apply(variables)), plain)
    errors = []
    for bits in (8, 3):
        with attn.intervene(*Dgq(bits=bits, attention_bits=bits, groups=2).rules(model, calibration)):
            errors.append(float(np.abs(np.asarray(apply(variables)) - plain).max()))
    assert 0 < errors[0] < errors[1]
    with attn.intervene(*Dgq(bits=None, attention_bits=3).rules(model)):
        _, cache = run_with_cache(model, variables, NOISE, TIMES, CAPTIONS, names=("attention_weights",))
    weights = np.asarray(cache["layers_0/cross_attention"]["attention_weights"])
    ratios = weights / weights.reshape(2, -1).max(-1)[:, None, None, None]
    codes = -np.log2(ratios)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-5)  # powers of two of the per-sample max
    assert codes.max() <= 7
