"""aem: attention entropy maximisation on the MIL attention — no-op setting, the loss against numpy, config errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.test_mil import mil_baseline, mil_config
from tests.train.test_techniques import _assert_trees_equal, _train
from train import config_checks
from train.config_checks import ConfigError
from train.techniques import aem


def test_aem_weight_0_trains_exactly_as_the_baseline():
    params, metrics = _train(mil_config({"name": "aem", "weight": 0.0}))
    _assert_trees_equal(mil_baseline()[0][-1], params[-1])
    assert [m["loss"] for m in metrics] == [m["loss"] for m in mil_baseline()[1]]


@pytest.mark.slow
def test_aem_loss_is_reported_and_changes_the_step():
    baseline_params, baseline_metrics = mil_baseline()
    params, metrics = _train(mil_config({"name": "aem", "weight": 0.5}))
    assert "technique/aem/entropy" in metrics[0]
    np.testing.assert_allclose(metrics[0]["technique/aem/loss"], -0.5 * metrics[0]["technique/aem/entropy"], rtol=1e-6)
    # same first forward as the baseline: the bag loss is unchanged, the entropy term is added on top
    np.testing.assert_allclose(metrics[0]["loss"], baseline_metrics[0]["loss"], rtol=1e-6)
    assert not np.array_equal(params[-1]["attention_w"]["kernel"], baseline_params[-1]["attention_w"]["kernel"])


def _numpy_entropy(weights, top_k):
    out = np.zeros(weights.shape[:-1])
    for index in np.ndindex(*weights.shape[:-1]):
        row = weights[index]
        if top_k:
            row = np.sort(row)[::-1][:top_k]
            row = row / row.sum()
        out[index] = -sum(p * np.log(p) for p in row if p > 0)
    return out


@pytest.mark.parametrize("top_k", [0, 3])
def test_attention_entropy_matches_numpy_with_padding_zeros(top_k):
    rng = np.random.default_rng(1)
    weights = rng.random((3, 2, 6))
    weights[0, :, 4:] = 0.0  # padded instances
    weights /= weights.sum(axis=-1, keepdims=True)
    got = aem.attention_entropy(jnp.asarray(weights, jnp.float32), top_k)
    np.testing.assert_allclose(got, _numpy_entropy(weights, top_k), rtol=1e-5)


def test_aem_refuses_other_model_kinds_and_bad_options():
    from tests.train.tiny_run import tiny_config

    lm = tiny_config()
    lm.techniques = [{"name": "aem"}]
    with pytest.raises(ConfigError, match=r"'aem' trains model kinds \('mil',\); model.kind='decoder'"):
        config_checks.check_config(lm)
    with pytest.raises(ConfigError, match=r"weight=-1.0 must be a number >= 0"):
        config_checks.check_config(mil_config({"name": "aem", "weight": -1.0}))
    with pytest.raises(ConfigError, match=r"option 'topk' is unknown; did you mean 'top_k'"):
        config_checks.check_config(mil_config({"name": "aem", "topk": 2}))
