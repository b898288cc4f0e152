"""lm_tiny with context parallelism 4 (configs/lm_tiny.py:context4, ring attention over the mesh's context axis)
trains as the data-parallel run does: the same losses step by step, to float32 reduction-order tolerance."""

import json
import os

import pytest

from configs import lm_tiny
from train import trainer


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.mark.slow
def test_context_parallel_training_logs_the_data_parallel_losses(tmp_path):
    losses = {}
    for preset in ("smoke", "context4"):
        config = lm_tiny.get_config(preset)
        if preset == "context4":  # the smoke model and schedule, split 2 (data) x 4 (context)
            smoke = lm_tiny.get_config("smoke")
            smoke.mesh, smoke.model.attention_options = config.mesh, config.model.attention_options
            config = smoke
        config.total_steps, config.log_every, config.eval_every, config.checkpoint_every = 3, 1, 0, 3
        workdir = str(tmp_path / preset)
        trainer.run(config, workdir)
        losses[preset] = _losses(workdir)
    assert sorted(losses["context4"]) == sorted(losses["smoke"]) == [1, 2, 3]
    for step, loss in losses["smoke"].items():
        assert losses["context4"][step] == pytest.approx(loss, rel=1e-4), step
