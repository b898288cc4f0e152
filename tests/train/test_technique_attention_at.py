"""attention_at: adversarial perturbations of the attention logits — no-op setting, the perturbation's norm and
direction, the logit hook against softmax's shift invariance, and config errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.test_techniques import _assert_trees_equal, _config, _train
from train import config_checks, tasks
from train.config_checks import ConfigError
from train.data import make_source
from train.techniques import attention_at


@functools.cache
def lm_baseline():
    """(parameters, metrics) of two steps of the tiny LM config without techniques, once per process."""
    return _train(_config())


@functools.cache
def tiny_lm():
    """(forward(params, batch) -> logits, params, batch, task) of the tiny LM config's model, eval forward."""
    config = _config()
    task = tasks.build_task(config.model)
    source = make_source(config.data.name, batch_size=2, seq_len=config.seq_len, seed=0)
    batch = {k: jnp.asarray(v) for k, v in source.batch_at(0).items()}
    params = nn.unbox(task.init(jax.random.key(0), batch)["params"])
    return (lambda p, b: task.apply({"params": p}, b)), params, batch, task


def test_attention_at_off_trains_exactly_as_the_baseline():
    params, metrics = _train(_config({"name": "attention_at", "weight": 0.0}))
    _assert_trees_equal(lm_baseline()[0][-1], params[-1])
    assert [m["loss"] for m in metrics] == [m["loss"] for m in lm_baseline()[1]]


def test_normalize_rows_matches_numpy_and_zeroes_masked_keys():
    rng = np.random.default_rng(0)
    gradient = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    gradient[0, 0, 0, 3:] = np.nan  # what -inf logits can give
    expected = np.where(np.isfinite(gradient), gradient, 0.0)
    expected = expected / np.maximum(np.sqrt((expected**2).sum(-1, keepdims=True)), 1e-12)
    np.testing.assert_allclose(attention_at.normalize_rows(jnp.asarray(gradient)), expected, rtol=1e-6)


def test_logit_hook_adds_the_delta_and_respects_softmax_shift_invariance():
    forward, params, batch, _ = tiny_lm()
    shapes = attention_at.logit_shapes(forward, params, batch)
    assert sorted(shapes) == ["layers_0/attention"] and shapes["layers_0/attention"].shape == (2, 2, 32, 32)
    clean = jax.jit(forward)(params, batch)
    run = jax.jit(lambda d: attention_at.perturbed_forward(forward, params, batch, d))
    row_constant = {"layers_0/attention": jnp.broadcast_to(jnp.arange(32.0)[None, None, :, None], (2, 2, 32, 32))}
    np.testing.assert_allclose(run(row_constant), clean, rtol=2e-5, atol=2e-5)  # softmax(a + c) = softmax(a)
    varying = {"layers_0/attention": jnp.broadcast_to(jnp.arange(32.0), (2, 2, 32, 32))}
    assert np.max(np.abs(np.asarray(run(varying)) - np.asarray(clean))) > 1e-3


def test_adversarial_direction_raises_the_loss_more_than_a_random_one():
    forward, params, batch, task = tiny_lm()
    technique = attention_at.AttentionAT(epsilon=1.0)
    technique.bind_model(dict(_config().model))

    def losses():
        adversarial, scalars = technique.forward_loss(forward, params, None, batch, jax.random.key(0))
        shapes = attention_at.logit_shapes(forward, params, batch)
        random = {
            path: attention_at.normalize_rows(jax.random.normal(jax.random.key(1), s.shape))
            for path, s in shapes.items()
        }
        random_loss = attention_at.mean_task_loss(
            task, attention_at.perturbed_forward(forward, params, batch, random), batch
        )
        clean = attention_at.mean_task_loss(task, forward(params, batch), batch)
        return adversarial, random_loss, clean

    adversarial, random_loss, clean = jax.jit(losses)()
    assert adversarial > random_loss and adversarial > clean


def test_attention_at_needs_attention_logits_and_a_softmax_model_kind():
    config = _config({"name": "attention_at"})
    config.model.attention = "hedgehog"
    with pytest.raises(ConfigError, match=r"'attention_at' regularises the attention probabilities.*'hedgehog'"):
        config_checks.check_config(config)
    from tests.train.test_mil import mil_config

    with pytest.raises(ConfigError, match=r"'attention_at' trains model kinds \('decoder', 'encoder', 'vit'\)"):
        config_checks.check_config(mil_config({"name": "attention_at"}))
    with pytest.raises(ConfigError, match=r"epsilon=-1 must be a number >= 0"):
        config_checks.check_config(_config({"name": "attention_at", "epsilon": -1}))
