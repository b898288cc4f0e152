"""acmil: ACMIL's branch cross-entropy and branch diversity losses — no-op setting, the math against numpy loops,
and the refusal of a single-branch model."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.test_mil import mil_config
from tests.train.test_techniques import _assert_trees_equal, _train
from train import config_checks
from train.config_checks import ConfigError
from train.techniques import acmil


def _acmil_config(*entries):
    config = mil_config(*entries)
    config.model.branches, config.model.mask_top_k, config.model.mask_drop = 3, 2, 0.5
    return config


def test_acmil_weights_0_train_exactly_as_the_multi_branch_baseline():
    baseline = _train(_acmil_config())
    params, metrics = _train(_acmil_config({"name": "acmil", "branch_weight": 0.0, "diversity_weight": 0.0}))
    _assert_trees_equal(baseline[0][-1], params[-1])
    assert [m["loss"] for m in metrics] == [m["loss"] for m in baseline[1]]


@pytest.mark.slow
def test_acmil_losses_are_reported_and_train_the_branch_heads():
    baseline = _train(_acmil_config())
    active_params, active = _train(_acmil_config({"name": "acmil"}))
    scalars = active[0]
    np.testing.assert_allclose(
        scalars["technique/acmil/loss"],
        scalars["technique/acmil/branch_ce"] + scalars["technique/acmil/diversity"],
        rtol=1e-6,
    )
    assert 0.0 < scalars["technique/acmil/diversity"] <= 1.0
    kernel = active_params[-1]["branch_classifiers"]  # step 1 is at learning rate 0 (warmup)
    assert not np.array_equal(kernel, baseline[0][-1]["branch_classifiers"])  # the branch heads now train


def test_branch_diversity_and_cross_entropy_match_numpy_loops():
    rng = np.random.default_rng(2)
    weights = rng.random((2, 3, 5))
    weights[1, :, 3:] = 0.0
    logits = rng.standard_normal((2, 3, 4))
    labels = np.array([1, 3])
    bag_weights = np.array([1.0, 0.5])
    expected_diversity, expected_ce = 0.0, 0.0
    for b in range(2):
        pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
        cosines = [weights[b, i] @ weights[b, j] / np.linalg.norm(weights[b, i]) / np.linalg.norm(weights[b, j])
                   for i, j in pairs]  # fmt: skip
        expected_diversity += np.mean(cosines) / 2
        for k in range(3):
            log_z = np.log(np.sum(np.exp(logits[b, k])))
            expected_ce += bag_weights[b] * (log_z - logits[b, k, labels[b]]) / 3
    expected_ce /= bag_weights.sum()
    got = acmil.branch_diversity(jnp.asarray(weights, jnp.float32))
    np.testing.assert_allclose(got, expected_diversity, rtol=1e-5)
    ce = acmil.branch_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(bag_weights))
    np.testing.assert_allclose(ce, expected_ce, rtol=1e-5)


def test_acmil_needs_several_branches_and_a_mil_model():
    with pytest.raises(ConfigError, match=r"'acmil' needs a multi-branch attention model: model.branches=1"):
        config_checks.check_config(mil_config({"name": "acmil"}))
    with pytest.raises(ConfigError, match=r"diversity_weight=-0.5 must be a number >= 0"):
        config_checks.check_config(_acmil_config({"name": "acmil", "diversity_weight": -0.5}))
    from configs import cnn_tiny

    cnn = cnn_tiny.get_config()
    cnn.techniques = [{"name": "acmil"}]
    with pytest.raises(ConfigError, match=r"'acmil' trains model kinds \('mil',\); model.kind='cnn'"):
        config_checks.check_config(cnn)
