"""eval.lm: the latest checkpoint of a run, evaluated at 1x/2x/4x the training length, written as JSON."""

import json
import os
import subprocess
import sys

import pytest

from configs import lm_tiny
from eval import lm
from train import trainer
from train.run import load_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step lm_tiny:smoke run with learned positions covering 2x (not 4x) the training length."""
    workdir = str(tmp_path_factory.mktemp("lm"))
    config = lm_tiny.get_config("smoke")
    config.total_steps = 2
    config.model.position_embedding = "learned"
    config.model.max_len = 2 * config.seq_len
    result = trainer.run(config, workdir)
    return workdir, config, result


def test_rows_keep_tokens_per_batch_and_divisibility():
    assert lm.rows_for_length(16, 1, 8) == 16
    assert lm.rows_for_length(16, 2, 8) == 8
    assert lm.rows_for_length(16, 4, 8) == 8  # never below one row per batch shard
    assert lm.rows_for_length(48, 2, 8) == 24


def test_evaluation_at_training_length_matches_the_trainer(trained):
    workdir, config, result = trained
    run = load_run(workdir)
    assert run.step == config.total_steps
    results = lm.evaluate_lengths(run, [1, 2, 4], config.eval.num_batches)
    by_factor = {entry["factor"]: entry for entry in results}
    # Same checkpoint, same validation batches: the trainer's final eval loss, exactly.
    assert by_factor[1]["loss"] == pytest.approx(result.eval_metrics["eval/loss"], rel=1e-6)
    assert by_factor[2]["seq_len"] == 2 * config.seq_len and by_factor[2]["loss"] > 0
    assert "max_len" in by_factor[4]["skipped"]  # learned positions do not reach 4x


def test_command_writes_json_to_workdir_and_output(trained, tmp_path):
    workdir, config, _ = trained
    output = tmp_path / "out" / "lm.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", "eval.lm", "--workdir", workdir, "--output", str(output), "--factors", "1,2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with open(os.path.join(workdir, "eval_lm.json"), encoding="utf-8") as f:
        report = json.load(f)
    with open(output, encoding="utf-8") as f:
        assert json.load(f) == report
    assert report["step"] == config.total_steps and report["train_seq_len"] == config.seq_len
    assert [entry["seq_len"] for entry in report["results"]] == [config.seq_len, 2 * config.seq_len]
    assert all(entry["perplexity"] > 1 for entry in report["results"])
