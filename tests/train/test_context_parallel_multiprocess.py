"""Context parallelism across processes: lm_tiny:smoke on a (data 2, context 2) mesh over two CPU processes of two
fake devices each (ring attention's ppermute and the sequence-sharded batch cross the process boundary) logs the
losses of the single-process data-parallel run, step by step, to float32 reduction-order tolerance."""

import json
import os

import pytest

from configs import lm_tiny
from tests.train.test_multiprocess import run_processes
from train import trainer

STEPS = 3


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.mark.slow
def test_two_processes_with_context_parallelism_log_the_single_process_losses(tmp_path):
    schedule = (f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.eval_every=0")
    outputs = run_processes(
        tmp_path / "context",
        *schedule,
        f"--config.checkpoint_every={STEPS}",
        "--config.mesh.shape=(2, 2)",
        "--config.mesh.axes=('data', 'context')",
        "--config.model.attention_options={'context_parallel': 'ring'}",
        devices=2,
        timeout=900,  # two compilations of the ring train step on a shared 2-core machine took 258 s
    )
    assert "mesh {'data': 2, 'context': 2}" in outputs[0], outputs[0]
    assert f"step {STEPS}/{STEPS}" in outputs[0] and f"step {STEPS}/{STEPS}" not in outputs[1]

    config = lm_tiny.get_config("smoke")  # the same model, data and schedule in this process, data parallel
    config.total_steps, config.log_every, config.eval_every, config.checkpoint_every = STEPS, 1, 0, STEPS
    trainer.run(config, str(tmp_path / "single"))

    single, context = _losses(tmp_path / "single"), _losses(tmp_path / "context")
    assert sorted(context) == sorted(single) == list(range(1, STEPS + 1))
    for step, loss in single.items():
        assert context[step] == pytest.approx(loss, rel=1e-4), step
