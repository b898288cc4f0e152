"""attention_iat / attention_ivat: perturbations of the attention logits restricted to the span of the batch's
attention differences — no-op settings, the directions and the perturbation against numpy loops, the span, and
config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.test_technique_attention_at import lm_baseline, tiny_lm
from tests.train.test_techniques import _assert_trees_equal, _config, _train
from train import config_checks
from train.config_checks import ConfigError
from train.techniques import attention_at, attention_vat


def _unit(x):
    norm = np.sqrt((x**2).sum())
    return x / max(norm, 1e-12)


@pytest.mark.slow
def test_attention_iat_off_trains_exactly_as_the_baseline():
    params, metrics = _train(_config({"name": "attention_iat", "weight": 0.0}))
    _assert_trees_equal(lm_baseline()[0][-1], params[-1])
    assert [m["loss"] for m in metrics] == [m["loss"] for m in lm_baseline()[1]]


def test_attention_ivat_off_is_skipped():
    assert not attention_vat.AttentionIVAT(epsilon=0.0).active
    assert attention_vat.AttentionIVAT().active and attention_at.AttentionIAT().name == "attention_iat"


def test_span_perturbation_matches_numpy_loops():
    rng = np.random.default_rng(0)
    b, h, tq, tk = 3, 2, 2, 4
    logits = rng.standard_normal((b, h, tq, tk)).astype(np.float32)
    logits[1, 0, 1, 3] = -np.inf  # a masked key in example 1
    gradient = rng.standard_normal((b, b, h, tq)).astype(np.float32)
    epsilon = 0.7
    expected = np.zeros((b, h, tq, tk), np.float32)
    for i in range(b):
        for head in range(h):
            for q in range(tq):
                alpha = _unit(gradient[i, :, head, q]) * epsilon
                for j in range(b):
                    with np.errstate(invalid="ignore"):
                        diff = logits[i, head, q] - logits[j, head, q]
                    diff = np.where(np.isfinite(diff), diff, 0.0)
                    expected[i, head, q] += alpha[j] * _unit(diff)
    directions = attention_at.batch_difference_directions(jnp.asarray(logits))
    coefficients = epsilon * attention_at.normalize_coefficients(jnp.asarray(gradient))
    got = attention_at.combine_directions(coefficients, directions)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(directions)[np.arange(b), np.arange(b)] == 0)  # d_ii = 0
    assert np.all(np.linalg.norm(np.asarray(got), axis=-1) <= epsilon * np.sqrt(b - 1) + 1e-5)


@pytest.mark.slow
def test_iat_perturbation_lies_in_the_span_and_raises_the_loss():
    forward, params, batch, task = tiny_lm()
    technique = attention_at.AttentionIAT(epsilon=1.0)
    technique.bind_model(dict(_config().model))

    def run():
        adversarial, _ = technique.forward_loss(forward, params, None, batch, jax.random.key(0))
        clean = attention_at.mean_task_loss(task, forward(params, batch), batch)
        recorded = {}

        def record(value, path):
            recorded[path] = value
            return value

        from attn import interventions

        with interventions.intervene(interventions.hook("attention_logits", record)):
            forward(params, batch)
        return adversarial, clean, recorded["layers_0/attention"]

    adversarial, clean, logits = jax.jit(run)()
    assert adversarial > clean
    # with two examples the span of example 0 is the one direction d_01: any r is a multiple of it
    directions = np.asarray(attention_at.batch_difference_directions(logits))
    coefficients = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 2, 32)), jnp.float32)
    r = np.asarray(attention_at.combine_directions(coefficients, jnp.asarray(directions)))
    cross = np.einsum("hqk,hqk->hq", r[0], directions[0, 1])
    np.testing.assert_allclose(np.abs(cross), np.linalg.norm(r[0], axis=-1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ivat_moves_the_prediction():
    forward, params, batch, _ = tiny_lm()
    technique = attention_vat.AttentionIVAT(epsilon=1.0)
    virtual, scalars = jax.jit(
        lambda: technique.forward_loss(forward, params, forward(params, batch), batch, jax.random.key(0))
    )()
    assert virtual > 0 and np.isfinite(scalars["virtual_adversarial_kl"])


def test_interpretable_variants_refuse_bad_options_and_model_kinds():
    with pytest.raises(ConfigError, match=r"epsilon=-1 must be a number >= 0"):
        config_checks.check_config(_config({"name": "attention_iat", "epsilon": -1}))
    with pytest.raises(ConfigError, match=r"xi=0 must be a number > 0"):
        config_checks.check_config(_config({"name": "attention_ivat", "xi": 0}))
    from tests.train.test_mil import mil_config

    with pytest.raises(ConfigError, match=r"'attention_iat' trains model kinds \('decoder', 'encoder', 'vit'\)"):
        config_checks.check_config(mil_config({"name": "attention_iat"}))
    config = _config({"name": "attention_ivat"})
    config.model.attention = "hedgehog"
    with pytest.raises(ConfigError, match=r"'attention_ivat' regularises the attention probabilities.*'hedgehog'"):
        config_checks.check_config(config)
