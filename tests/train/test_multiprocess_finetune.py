"""Fine-tuning from a Hugging Face checkpoint on two CPU processes (4 devices each) under an fsdp x tensor mesh
whose fsdp axis spans the processes: init_from loads each process's blocks into the sharded train state, and save_hf
gathers the trained parameters across processes (process_allgather) for process 0, the only writer, to save."""

import os

import jax
import numpy as np
import pytest

from attn import pretrained
from tests.train.test_multiprocess import REPO, run_processes
from train import run as run_api


@pytest.mark.slow
def test_two_processes_fine_tune_and_save_hf(tmp_path):
    workdir = tmp_path / "run"
    outputs = run_processes(
        workdir,
        "--config.total_steps=2",
        "--config.log_every=1",
        "--config.eval_every=0",
        "--config.checkpoint_every=2",
        "--config.mesh.shape=(2, 4)",
        "--config.mesh.axes=('fsdp', 'tensor')",
        config="configs/finetune.py:smoke",
        timeout=500,
    )
    assert "mesh {'fsdp': 2, 'tensor': 4}" in outputs[0], outputs[0]
    assert "wrote the trained model as a Hugging Face directory" in outputs[0]
    assert "wrote the trained model" not in outputs[1]
    trained = jax.device_get(run_api.load_run(str(workdir)).params)
    _, saved, _, _ = pretrained.load(workdir / "hf")
    flat = dict(jax.tree_util.tree_leaves_with_path(trained))
    for path, value in jax.tree_util.tree_leaves_with_path(saved):
        np.testing.assert_array_equal(np.asarray(value), flat[path], err_msg=jax.tree_util.keystr(path))
    _, start, _, _ = pretrained.load(os.path.join(REPO, "tests", "fixtures", "hf", "llama"))
    assert not np.array_equal(np.asarray(start["lm_head"]["kernel"]), trained["lm_head"]["kernel"])  # it trained
