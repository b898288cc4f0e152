"""pss: progressive self-supervised attention learning — the mining rule and the attention loss against numpy loops,
the aspect row of the captured weights, the no-op setting, config errors, and (slow) a training side by side with
the baseline that reports the aspect attention on the mined and the planted words."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import aspect_tiny
from tests.train.test_techniques import _assert_trees_equal, _config, _train
from train import config_checks
from train.config_checks import ConfigError
from train.techniques import pss


def _numpy_mining_step(alpha, correct, candidates, max_entropy):
    b, t = alpha.shape
    mined = np.zeros((b, t), bool)
    active = np.zeros((b, t), bool)
    for row in range(b):
        if not candidates[row].any():
            continue
        p = np.array([alpha[row, i] if candidates[row, i] else 0.0 for i in range(t)])
        p = p / p.sum()
        entropy = -sum(x * np.log2(x) for x in p if x > 0)
        if entropy >= max_entropy:
            continue
        best = max((i for i in range(t) if candidates[row, i]), key=lambda i: alpha[row, i])
        mined[row, best] = True
        active[row, best] = bool(correct[row])
    return mined, active


def test_mining_step_matches_numpy_loops():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7)) * np.array([[3.0], [3.0], [0.01], [3.0], [3.0]])
    alpha = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    candidates = rng.random((5, 7)) < 0.7
    candidates[4] = False  # nothing left to mine
    correct = np.array([True, False, True, True, False])
    for max_entropy in (1.0, 2.0, 4.0):
        expected = _numpy_mining_step(alpha, correct, candidates, max_entropy)
        got = pss.mining_step(jnp.asarray(alpha), jnp.asarray(correct), jnp.asarray(candidates), max_entropy)
        np.testing.assert_array_equal(np.asarray(got[0]), expected[0])
        np.testing.assert_array_equal(np.asarray(got[1]), expected[1])
    n = int(candidates[2].sum())  # the near-uniform row has entropy ~ log2(n) bits: mined only below a higher bar
    low = pss.mining_step(jnp.asarray(alpha), jnp.asarray(correct), jnp.asarray(candidates), np.log2(n) - 0.1)
    high = pss.mining_step(jnp.asarray(alpha), jnp.asarray(correct), jnp.asarray(candidates), np.log2(n) + 0.1)
    assert n >= 3 and not np.asarray(low[0])[2].any() and np.asarray(high[0])[2].sum() == 1


def test_attention_supervision_loss_matches_numpy():
    rng = np.random.default_rng(1)
    alpha = rng.random((3, 6)).astype(np.float32)
    amask = rng.random((3, 6)) < 0.4
    avalue = amask & (rng.random((3, 6)) < 0.5)
    expected = np.mean([sum((amask[b, t] * alpha[b, t] - avalue[b, t]) ** 2 for t in range(6)) for b in range(3)])
    got = pss.attention_supervision_loss(jnp.asarray(alpha), jnp.asarray(amask), jnp.asarray(avalue))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_aspect_attention_is_the_head_mean_of_the_aspect_row_of_the_chosen_layer():
    rng = np.random.default_rng(2)
    weights = [rng.random((2, 3, 5, 5)).astype(np.float32) for _ in range(2)]
    intermediates = {
        f"layers_{i}": {"attention": {"attention_weights": (jnp.asarray(w),)}} for i, w in enumerate(weights)
    }
    positions = np.array([4, 1])
    for layer, index in ((-1, 1), (0, 0)):
        got = pss.aspect_attention(intermediates, jnp.asarray(positions), layer)
        expected = np.stack([weights[index][b, :, positions[b], :].mean(axis=0) for b in range(2)])
        np.testing.assert_allclose(got, expected, rtol=1e-6)


@functools.cache
def aspect_baseline():
    return _train(aspect_tiny.get_config("smoke"))


@pytest.mark.slow
def test_pss_off_trains_exactly_as_the_baseline():
    config = aspect_tiny.get_config("smoke")
    config.techniques = [{"name": "pss", "weight": 0.0}]
    params, metrics = _train(config)
    _assert_trees_equal(aspect_baseline()[0][-1], params[-1])
    assert [m["loss"] for m in metrics] == [m["loss"] for m in aspect_baseline()[1]]


def test_pss_refusals_name_the_problem():
    with pytest.raises(ConfigError, match=r"'pss' trains model kinds \('encoder',\); model.kind='decoder'"):
        config_checks.check_config(_config({"name": "pss"}))
    from configs import encoder_tiny

    mlm = encoder_tiny.get_config("smoke")
    mlm.techniques = [{"name": "pss"}]
    with pytest.raises(ConfigError, match=r"model.head='mlm', expected 'classification'"):
        config_checks.check_config(mlm)
    config = aspect_tiny.get_config("smoke")
    config.techniques = [{"name": "pss", "layer": 3}]
    with pytest.raises(ConfigError, match=r"layer=3 must be -1 \(the last\) or in \[0, 0\]"):
        config_checks.check_config(config)
    config.techniques = [{"name": "pss", "iterations": 0}]
    with pytest.raises(ConfigError, match=r"iterations=0"):
        config_checks.check_config(config)


def test_pss_needs_the_aspect_batch_keys():
    technique = pss.PSS()
    technique.bind_model(dict(aspect_tiny.get_config("smoke").model))
    batch = {"inputs": jnp.zeros((2, 12), jnp.int32), "labels": jnp.zeros((2,), jnp.int32)}
    with pytest.raises(ValueError, match=r"needs batch keys \['aspect_positions', 'context'\]"):
        technique.mine(None, batch)


@pytest.mark.slow
def test_pss_side_by_side_with_the_baseline_attends_to_the_mined_words():
    """300 steps of aspect_tiny without and with pss (supervision from step 100); prints the aspect attention report
    of both on 256 validation rows and checks that pss puts more attention on the words it mines."""
    from train.data import make_source

    reports = {}
    for name, entries in (("baseline", []), ("pss", [{"name": "pss", "weight": 0.1, "start_step": 100}])):
        config = aspect_tiny.get_config()
        config.total_steps = 300
        config.techniques = entries
        params, _ = _train(config, steps=300)
        technique = pss.PSS()
        technique.bind_model(dict(config.model))
        model_params = {k: v for k, v in params[-1].items() if k != "techniques"}
        source = make_source("aspect_sentiment", split="valid", batch_size=256, seq_len=config.seq_len, seed=0)
        batch = {k: jnp.asarray(v) for k, v in source.batch_at(0).items()}
        report = jax.jit(functools.partial(pss.aspect_attention_report, technique))(model_params, batch)
        reports[name] = {k: round(float(v), 4) for k, v in report.items()}
    print(reports)
    assert reports["pss"]["active_mass"] > reports["baseline"]["active_mass"]
