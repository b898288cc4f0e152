"""Each step's train metrics are logged exactly once: a run restarted in a workdir that already has metrics
(before any checkpoint) drops them in metrics.jsonl and TensorBoard, and a SIGTERM between two log steps logs
the partial window at the stop step instead of dropping it."""

import json
import os
import signal

import numpy as np
import pytest

from tests.train.tiny_run import tiny_config
from train import metrics, trainer


def _rows(workdir):
    with open(os.path.join(workdir, metrics.METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_truncation_keeps_earlier_rows_and_drops_a_cut_off_line(tmp_path):
    path = tmp_path / metrics.METRICS_FILE
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a": 3.0}\n{"step": 4, "a"')
    metrics.MetricWriter(tmp_path, is_primary=True, purge_step=3).close()
    assert _rows(tmp_path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    metrics.MetricWriter(tmp_path, is_primary=True, purge_step=0).close()
    assert _rows(tmp_path) == []


@pytest.mark.slow
def test_restart_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    workdir = str(tmp_path)
    # An earlier run logged steps 1..4 and died before its first checkpoint.
    with metrics.MetricWriter(workdir, is_primary=True) as writer:
        for step in range(1, 5):
            writer.scalars(step, {"train/loss": 100.0 + step})
    result = trainer.run(tiny_config(), workdir)
    assert result.start_step == 0
    rows = [row for row in _rows(workdir) if "train/loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["train/loss"] < 100 for row in rows)
    scalars = metrics.read_scalars(workdir)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    assert all(value < 100 for _, value in scalars["train/loss"])


@pytest.mark.slow
def test_sigterm_between_log_steps_logs_the_partial_window(tmp_path, monkeypatch):
    reference_dir, split_dir = str(tmp_path / "reference"), str(tmp_path / "split")
    config = tiny_config()
    config.total_steps, config.checkpoint_every = 4, 4
    trainer.run(config, reference_dir)  # log_every=1: every step's own loss
    per_step = {row["step"]: row["train/loss"] for row in _rows(reference_dir) if "train/loss" in row}

    make_train_step = trainer.make_train_step

    def sigterm_after_third_step(s, layout):
        compiled, seconds = make_train_step(s, layout)
        calls = []

        def step(*args):
            out = compiled(*args)
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        return step, seconds

    config.log_every = 4
    monkeypatch.setattr(trainer, "make_train_step", sigterm_after_third_step)
    first = trainer.run(config, split_dir)
    assert first.preempted and first.step == 3
    monkeypatch.undo()
    second = trainer.run(config, split_dir)
    assert (second.start_step, second.step) == (3, 4)
    rows = {row["step"]: row["train/loss"] for row in _rows(split_dir) if "train/loss" in row}
    assert sorted(rows) == [3, 4]
    np.testing.assert_allclose(rows[3], np.mean([per_step[1], per_step[2], per_step[3]]), rtol=1e-6)
    np.testing.assert_allclose(rows[4], per_step[4], rtol=1e-6)
    assert [step for step, _ in metrics.read_scalars(split_dir)["train/loss"]] == [3, 4]
