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
    # One line per length and the paths written: the checkpoint restore's INFO logs stay quiet.
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("seq_len") and lines[2].startswith("wrote"), lines


def _eval_lm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval.lm", *args], cwd=REPO, capture_output=True, text=True, timeout=180
    )


@pytest.mark.parametrize("state", ["missing", "empty", "no_checkpoint_yet"])
def test_workdir_without_a_run_is_one_line(tmp_path, state):
    workdir = tmp_path / "run"
    if state != "missing":
        workdir.mkdir()
    if state == "no_checkpoint_yet":
        (workdir / "checkpoints").mkdir()
        (workdir / "checkpoints" / "10.orbax-checkpoint-tmp-1").mkdir()  # a save in progress is not a checkpoint
    done = _eval_lm("--workdir", str(workdir))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: --workdir="), done.stderr[-2000:]
    expected = {"missing": "does not exist", "empty": "no checkpoints/", "no_checkpoint_yet": "no finished checkpoint"}
    assert expected[state] in lines[0]
    assert (state == "missing") != workdir.exists()  # nothing created in a missing workdir


def test_unknown_step_lists_the_checkpoints(trained):
    workdir, config, _ = trained
    done = _eval_lm("--workdir", workdir, "--step", "999")
    assert done.returncode != 0
    assert done.stderr.strip() == f"error: --step=999 is not a checkpoint of {workdir!r}; its checkpoints: [2]"


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_or_is_one_line(tmp_path):
    """A damaged newest checkpoint: eval.lm evaluates the newest one that verifies (saying so); asked for the damaged
    step, it answers in one line."""
    from tests.train.damage import array_data_files, overwrite_throughout
    from tests.train.tiny_run import tiny_config

    workdir = str(tmp_path / "run")
    trainer.run(tiny_config(), workdir)  # checkpoints 1 and 2
    for path in array_data_files(os.path.join(workdir, "checkpoints", "2")):
        overwrite_throughout(path)  # orbax reads the garbage without complaint: only the recorded checksums catch it
    done = _eval_lm("--workdir", workdir, "--output", str(tmp_path / "lm.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "checkpoint 2 of" in done.stderr and "is damaged" in done.stderr
    assert json.loads((tmp_path / "lm.json").read_text())["step"] == 1
    done = _eval_lm("--workdir", workdir, "--step", "2")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "is damaged" in lines[0], done.stderr[-2000:]
