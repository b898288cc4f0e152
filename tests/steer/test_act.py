"""attn.steer.act: the calibration against an explicit numpy loop of the official rule, row masses kept, the first
token never a sink, the exact no-op settings, the calibration search, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.steer import STEERERS, Act
from attn.steer import act as act_lib
from tests.steer.helpers import TOKENS, layer0_weights, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def act_reference(a, threshold, beta):
    """One head's causal map a [T, T] (prefill): explicit loops over the official rule."""
    t = a.shape[0]
    means = [sum(a[i, j] for i in range(t)) / (t - j) for j in range(t)]
    sinks = [j for j in range(1, t) if means[j] > threshold]
    out = a.copy()
    for i in range(t):
        freed = (1 - beta) * sum(a[i, j] for j in sinks)
        rest = sum(a[i, j] for j in range(t) if j not in sinks)
        if rest == 0:
            continue
        for j in range(t):
            out[i, j] = beta * a[i, j] if j in sinks else a[i, j] + freed * a[i, j] / rest
    return out, sinks


def causal_map_with_sinks(seed=0, t=7):
    """A causal softmax map [1, 2, t, t] whose key 3 draws much attention in head 0 (a hidden sink)."""
    logits = np.asarray(jax.random.normal(jax.random.key(seed), (1, 2, t, t)), np.float64)
    logits[0, 0, :, 3] += 3.0
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def test_calibration_matches_the_official_rule_on_a_small_map():
    weights = causal_map_with_sinks()
    out = np.asarray(act_lib.calibrate(jnp.asarray(weights), 0.2, 0.4), np.float64)
    for h in range(2):
        want, sinks = act_reference(weights[0, h], 0.2, 0.4)
        np.testing.assert_allclose(out[0, h], want, rtol=1e-6, atol=1e-7)
        if h == 0:
            assert 3 in sinks
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)  # rows keep their mass
    np.testing.assert_array_equal(np.triu(out[0, 0], 1), 0.0)  # nothing moves onto masked keys
    found = np.asarray(act_lib.hidden_sinks(jnp.asarray(weights), 0.2))
    assert not found[..., 0].any() and found[0, 0, 3]


def test_decode_rows_count_the_queries_that_see_each_key():
    np.testing.assert_array_equal(act_lib.visible_queries(3, 5), [3, 3, 3, 2, 1])
    np.testing.assert_array_equal(act_lib.visible_queries(4, 4), [4, 3, 2, 1])


def test_rule_calibrates_only_the_selected_heads(lm):
    model, variables = lm
    base = layer0_weights(model, variables)
    with attn.intervene(*Act({0: [2]}, beta=0.3, threshold=0.15).rules(model)):
        calibrated = layer0_weights(model, variables)
    for b in range(base.shape[0]):
        want, _ = act_reference(base[b, 2], 0.15, 0.3)
        np.testing.assert_allclose(calibrated[b, 2], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(calibrated[:, [0, 1, 3]], base[:, [0, 1, 3]])


def test_beta_one_and_no_heads_are_bit_identical(lm):
    model, variables = lm
    clean = model.apply(variables, TOKENS)
    with attn.intervene(*Act({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, beta=1.0, threshold=0.05).rules(model)):
        np.testing.assert_array_equal(model.apply(variables, TOKENS), clean)
    with attn.intervene(*Act({0: [0, 1, 2, 3]}, beta=0.0, threshold=0.05).rules(model)):
        assert not np.allclose(model.apply(variables, TOKENS), clean)
    assert Act({}).rules(model) == ()
    assert STEERERS["act"].no_op.startswith("beta=1")


def test_search_keeps_heads_that_beat_the_uncalibrated_model(lm):
    model, _ = lm
    gain = {(0, 1): 0.1, (1, 3): 0.05, (1, 0): -0.2}

    def score(config):
        return 0.5 + sum(gain.get((layer, h), 0.0) for layer, heads in config.items() for h in heads)

    config, gains = act_lib.search_heads(score, model)
    assert config == {0: (1,), 1: (3,)}
    assert gains[1, 0] == pytest.approx(-0.2) and gains[0, 0] == 0.0
    config, gains = act_lib.search_heads(score, model, layers=[1])
    assert config == {1: (3,)} and np.isnan(gains[0]).all()


def test_bad_input_names_the_argument(lm):
    model, _ = lm
    with pytest.raises(ValueError, match=r"head_config\[1\]=\[0, 7\] holds \[7\]"):
        Act({1: [0, 7]}).rules(model)
    with pytest.raises(ValueError, match="head_config has layer 3"):
        act_lib.search_heads(lambda c: 0.0, model, layers=[3])
    with pytest.raises(ValueError, match="beta=1.5"):
        Act({0: [0]}, beta=1.5)
    with pytest.raises(ValueError, match="threshold=0"):
        Act({0: [0]}, threshold=0)
    linear, _ = tiny_lm("linear")
    with pytest.raises(ValueError, match="model: act.*layer 0.*'linear'"):
        Act({0: [0]}).rules(linear)
