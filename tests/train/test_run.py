"""train.run, the run API of eval/: a run built from a config (data, parameter count, FLOP estimate, its train step)
and a run restored from a workdir (the checkpoint's step and parameters, the trainer's evaluation)."""

import jax
import numpy as np
import pytest

from configs import lm_tiny
from train import run as run_api


@pytest.fixture(scope="module")
def config():
    config = lm_tiny.get_config("smoke")
    config.total_steps = 2
    return config


@pytest.fixture(scope="module")
def built(config, tmp_path_factory):
    return run_api.build_run(config, str(tmp_path_factory.mktemp("built")))


def test_built_run_data_and_counts(built, config):
    assert built.params is None and built.step == 0
    rows = built.data("valid", batch_size=8, seq_len=2 * config.seq_len, per_process=False).next_batch()
    assert rows["inputs"].shape == (8, 2 * config.seq_len)
    # The whole batch of a one-process source and the share of this (only) process are the same rows.
    shared = built.data("valid", batch_size=8, seq_len=2 * config.seq_len).next_batch()
    np.testing.assert_array_equal(shared["inputs"], rows["inputs"])
    assert built.batch_divisor == 8  # the 8 fake CPU devices of tests/conftest.py, data-parallel
    state = built.init_state(jax.random.key(0))
    assert built.num_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    model = config.model
    expected = 6 * built.num_params + 12 * model.num_layers * model.num_heads * (model.d_model // model.num_heads) * 64
    assert built.train_flops_per_token(64) == pytest.approx(expected)
    assert built.tokens_per_example == config.seq_len


def test_built_run_trains_one_step_and_needs_params_to_evaluate(built):
    train_step, seconds = built.train_step()
    assert seconds > 0
    state = built.init_state(jax.random.key(0))
    with built.tracing():
        state, metrics = train_step(state, built.next_train_batch(), jax.random.key(1))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    with pytest.raises(ValueError, match="params=None"):
        built.evaluate(built.data("valid"), 1)
    assert built.evaluate(built.data("valid"), 1, params=state.params)["loss"] > 0


def test_load_run_restores_the_trained_parameters(config, tmp_path):
    result = run_api.train(config, str(tmp_path))
    run = run_api.load_run(str(tmp_path))
    assert run.step == result.step == config.total_steps and run.config.model.attention == "softmax"
    metrics = run.evaluate(run.data("valid"), config.eval.num_batches)
    # Same checkpoint, same validation batches: the trainer's final evaluation, exactly.
    assert metrics["loss"] == pytest.approx(result.eval_metrics["eval/loss"], rel=1e-6)
