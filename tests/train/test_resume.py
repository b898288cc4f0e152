"""Resume equality (2N steps == N steps + restart + N steps, bit for bit on CPU) and restore onto another mesh."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import lm_tiny
from train import trainer
from train.checkpointing import Checkpointer

STEPS = 6


def _config(mesh_shape=(-1,), mesh_axes=("data",)):
    config = lm_tiny.get_config("smoke")
    config.total_steps = STEPS
    config.log_every = 1  # one logged loss per step, so the two runs' logs compare step by step
    config.eval_every = 0  # evaluation only at the end (it does not touch the train state)
    config.checkpoint_every = STEPS // 2
    config.model.dropout_rate = 0.1  # resumed runs must also draw the same dropout masks
    config.mesh.shape, config.mesh.axes = mesh_shape, mesh_axes
    return config


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def _restore(workdir, config, step):
    """Params of checkpoint `step` in `workdir`, restored onto the mesh of `config`, as numpy, and layout."""
    s = trainer.setup(config, workdir)
    layout = trainer.layout_state(s)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=5, save_every=1)
    try:
        state, data_state, _, _ = checkpointer.restore(step, abstract_state=layout.abstract_state)
    finally:
        checkpointer.close()
    return state, data_state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    straight = str(tmp_path_factory.mktemp("straight"))
    split = str(tmp_path_factory.mktemp("split"))
    trainer.run(_config(), straight)
    first = trainer.run(_config(), split, stop_at_step=STEPS // 2)
    second = trainer.run(_config(), split)
    assert (first.step, second.start_step, second.step) == (STEPS // 2, STEPS // 2, STEPS)
    return straight, split


def test_resumed_run_logs_the_same_losses(runs):
    straight, split = runs
    expected = _losses(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert _losses(split) == expected  # exact float equality


def test_resumed_run_ends_with_identical_parameters(runs):
    straight, split = runs
    a, data_a = _restore(straight, _config(), STEPS)
    b, data_b = _restore(split, _config(), STEPS)
    assert data_a == data_b and data_a["step"] == STEPS
    leaves_a = jax.tree_util.tree_leaves_with_path(jax.device_get(a))
    leaves_b = jax.tree_util.tree_leaves(jax.device_get(b))
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_restore_onto_a_different_mesh_gives_the_same_parameters(runs):
    straight, _ = runs
    data_parallel, _ = _restore(straight, _config(), STEPS)
    tensor_parallel, _ = _restore(straight, _config((4, 2), ("data", "tensor")), STEPS)
    query = tensor_parallel.params["layers_0"]["attention"]["query"]["kernel"]
    assert "tensor" in str(query.sharding.spec)  # really laid out on the new mesh
    assert query.sharding.mesh.shape == {"data": 4, "tensor": 2}
    for x, y in zip(
        jax.tree_util.tree_leaves(jax.device_get(data_parallel.params)),
        jax.tree_util.tree_leaves(jax.device_get(tensor_parallel.params)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)


def test_training_continues_with_fsdp_and_tensor_parallelism(runs, tmp_path):
    """The 8-way data-parallel checkpoint resumes on a 2x2x2 data x fsdp x tensor mesh and trains as the unsharded
    (data-parallel) continuation of the same checkpoint does: the same losses at each step and the same parameters
    at the end, to float32 reduction-order tolerance (the two meshes sum in different orders)."""
    straight, _ = runs
    results, workdirs = {}, {}
    for name, mesh in (("sharded", ((2, 2, 2), ("data", "fsdp", "tensor"))), ("unsharded", ((-1,), ("data",)))):
        workdirs[name] = str(tmp_path / name)
        shutil.copytree(os.path.join(straight, "checkpoints"), os.path.join(workdirs[name], "checkpoints"))
        config = _config(*mesh)
        config.total_steps = STEPS + 2
        config.allow_changes = "total_steps"  # the resume check refuses a changed total_steps otherwise
        results[name] = trainer.run(config, workdirs[name])
    assert (results["sharded"].start_step, results["sharded"].step) == (STEPS, STEPS + 2)
    losses = {name: _losses(workdir) for name, workdir in workdirs.items()}
    assert sorted(losses["sharded"]) == sorted(losses["unsharded"]) == [STEPS + 1, STEPS + 2]
    for step, loss in losses["unsharded"].items():
        assert losses["sharded"][step] == pytest.approx(loss, rel=1e-5), step
    assert results["sharded"].eval_metrics["eval/loss"] == pytest.approx(
        results["unsharded"].eval_metrics["eval/loss"], rel=1e-5
    )
    sharded, _ = _restore(workdirs["sharded"], _config(), STEPS + 2)  # both read onto the data-parallel mesh
    unsharded, _ = _restore(workdirs["unsharded"], _config(), STEPS + 2)
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(unsharded.params))
    for (path, want), got in zip(leaves, jax.tree_util.tree_leaves(jax.device_get(sharded.params)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
