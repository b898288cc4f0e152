"""eval.run_metrics reads back the metrics.jsonl the trainer's writer produces (train.metrics.MetricWriter)."""

import json

from eval.run_metrics import last_metrics, read_metric_rows
from train.metrics import METRICS_FILE


def _write(workdir, rows):
    with open(workdir / METRICS_FILE, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write("\n")  # a trailing blank line is ignored


def test_a_run_without_metrics_has_no_rows(tmp_path):
    assert read_metric_rows(str(tmp_path)) == []
    assert last_metrics(str(tmp_path)) == ({}, {})


def test_last_metrics_takes_the_last_row_of_each_kind_including_rows_logged_again_after_a_resume(tmp_path):
    rows = [
        {"step": 10, "train/loss": 3.0, "perf/step_time_s": 0.5},
        {"step": 20, "train/loss": 2.5},
        {"step": 20, "eval/loss": 2.7, "eval/accuracy": 0.1},
        {"step": 15, "train/loss": 2.6},  # resumed from a checkpoint at step 10: steps after it are logged again
    ]
    _write(tmp_path, rows)
    assert read_metric_rows(str(tmp_path)) == rows
    eval_metrics, train_metrics = last_metrics(str(tmp_path))
    assert eval_metrics == {"step": 20, "eval/loss": 2.7, "eval/accuracy": 0.1}
    assert train_metrics == {"step": 15, "train/loss": 2.6}
