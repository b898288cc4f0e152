"""MetricWriter round trips through TensorBoard event files and metrics.jsonl; progress line format."""

import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from train.metrics import (
    MetricWriter,
    ProgressReporter,
    format_count,
    format_duration,
    read_scalars,
    read_text,
)


def _jsonl(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_scalars_round_trip(tmp_path):
    with MetricWriter(tmp_path, is_primary=True) as writer:
        writer.scalars(0, {"train/loss": 2.5, "train/lr": jnp.float32(1e-3)})
        writer.scalars(10, {"train/loss": np.float64(1.25), "train/lr": 2e-3})
        writer.scalars(20, {"eval/accuracy": jnp.array(0.75)})
    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"train/loss", "train/lr", "eval/accuracy"}
    assert scalars["train/loss"] == [(0, 2.5), (10, 1.25)]
    assert [s for s, _ in scalars["train/lr"]] == [0, 10]
    np.testing.assert_allclose([v for _, v in scalars["train/lr"]], [1e-3, 2e-3], rtol=1e-6)
    assert scalars["eval/accuracy"] == [(20, 0.75)]
    lines = _jsonl(tmp_path)
    assert lines[0] == {"step": 0, "train/loss": 2.5, "train/lr": pytest.approx(1e-3)}
    assert lines[1] == {"step": 10, "train/loss": 1.25, "train/lr": 2e-3}
    assert lines[2] == {"step": 20, "eval/accuracy": 0.75}


def test_resume_purges_steps_after_checkpoint(tmp_path):
    with MetricWriter(tmp_path, is_primary=True) as writer:
        for step in range(1, 6):
            writer.scalars(step, {"loss": float(step)})
    # The run restarts from a checkpoint at step 3 and logs steps 4.. again with new values.
    with MetricWriter(tmp_path, is_primary=True, purge_step=4) as writer:
        writer.scalars(4, {"loss": 40.0})
    assert [(line["step"], line["loss"]) for line in _jsonl(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]
    assert read_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_non_primary_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricWriter(workdir, is_primary=False) as writer:
        writer.scalars(1, {"loss": 1.0})
        writer.text(0, "config", "x")
        writer.flush()
    assert not workdir.exists()


def test_text_round_trip(tmp_path):
    config_text = "model:\n  d_model: 64\n  attention: softmax  # ünïcode"
    with MetricWriter(tmp_path, is_primary=True) as writer:
        writer.text(0, "config", config_text)
        writer.text(5, "notes", "second")
    assert read_text(tmp_path) == {"config": [(0, config_text)], "notes": [(5, "second")]}


def test_bad_values(tmp_path):
    with MetricWriter(tmp_path, is_primary=True) as writer:
        with pytest.raises(ValueError, match="scalar 'loss' has value 'high'"):
            writer.scalars(1, {"loss": "high"})
        with pytest.raises(ValueError, match="reserved"):
            writer.scalars(1, {"step": 3})


def test_progress_line_format():
    now = [100.0]
    reporter = ProgressReporter(total_steps=1000, tokens_per_step=9492, clock=lambda: now[0])
    first = reporter.update(100, 2.9)
    now[0] += 21.0  # 100 steps in 21 s: 0.21 s/step, 9492 / 0.21 = 45.2k tok/s
    line = reporter.update(200, 2.3141)
    assert line == "step 200/1000 | loss 2.314 | 45.2k tok/s | 0.21 s/step | ETA 2m48s"
    assert first.startswith("step 100/1000 | loss 2.900 | ")
    assert re.fullmatch(r"step \d+/\d+ \| loss [\d.]+ \| .* tok/s \| .* s/step \| ETA .+", first)
    assert reporter.seconds_per_step == pytest.approx(0.21)
    assert reporter.tokens_per_second == pytest.approx(9492 / 0.21)


def test_formatters():
    assert format_count(45200) == "45.2k"
    assert format_count(950) == "950"
    assert format_count(2.5e6) == "2.5M"
    assert format_duration(185) == "3m05s"
    assert format_duration(42) == "42s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(2 * 86400 + 3600) == "2d01h"
    assert format_duration(math.nan) == "?"
