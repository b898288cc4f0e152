"""attention_vat: virtual adversarial perturbations of the attention logits — no-op setting, the KL against numpy,
the power-iteration direction, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.test_technique_attention_at import lm_baseline, tiny_lm
from tests.train.test_techniques import _assert_trees_equal, _config, _train
from train import config_checks
from train.config_checks import ConfigError
from train.techniques import attention_at, attention_vat


def test_attention_vat_off_trains_exactly_as_the_baseline():
    params, metrics = _train(_config({"name": "attention_vat", "epsilon": 0.0}))
    _assert_trees_equal(lm_baseline()[0][-1], params[-1])
    assert [m["loss"] for m in metrics] == [m["loss"] for m in lm_baseline()[1]]


def test_prediction_kl_matches_numpy():
    rng = np.random.default_rng(3)
    clean, perturbed = rng.standard_normal((2, 3, 4, 6))
    weights = np.array([[1.0, 0.0, 1.0, 1.0], [0.5, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    p = np.exp(clean) / np.exp(clean).sum(-1, keepdims=True)
    q = np.exp(perturbed) / np.exp(perturbed).sum(-1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    expected = (kl * weights).sum() / weights.sum()
    got = attention_vat.prediction_kl(jnp.asarray(clean), jnp.asarray(perturbed), jnp.asarray(weights))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_virtual_adversarial_direction_moves_the_prediction_more_than_a_random_one():
    forward, params, batch, _ = tiny_lm()
    technique = attention_vat.AttentionVAT(epsilon=1.0)

    def divergences():
        clean = forward(params, batch)
        virtual, _ = technique.forward_loss(forward, params, clean, batch, jax.random.key(0))
        shapes = attention_at.logit_shapes(forward, params, batch)
        random = {
            path: attention_at.normalize_rows(jax.random.normal(jax.random.key(1), s.shape))
            for path, s in shapes.items()
        }
        moved = attention_at.perturbed_forward(forward, params, batch, random)
        return virtual, attention_vat.prediction_kl(clean, moved, batch["weights"])

    virtual, random = jax.jit(divergences)()
    assert virtual > random > 0


def test_attention_vat_options_and_refusals():
    with pytest.raises(ConfigError, match=r"xi=0 must be a number > 0"):
        config_checks.check_config(_config({"name": "attention_vat", "xi": 0}))
    from configs import cnn_tiny

    cnn = cnn_tiny.get_config()
    cnn.techniques = [{"name": "attention_vat"}]
    with pytest.raises(ConfigError, match=r"'attention_vat' trains model kinds \('decoder', 'encoder', 'vit'\)"):
        config_checks.check_config(cnn)
