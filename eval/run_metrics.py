"""Reading a run's scalars back: the one reader of the `metrics.jsonl` file the trainer writes in every workdir
(train/metrics.py: one JSON object per logging call, {"step": 120, "train/loss": 2.31, ...})."""

from __future__ import annotations

import json
import os
from typing import Any

from .trainer_api import METRICS_FILE


def read_metric_rows(workdir: str) -> list[dict[str, Any]]:
    """The rows of `workdir`'s metrics.jsonl in the order they were written ([] when the file does not exist yet).
    A resumed run logs the steps after its checkpoint again, so a step may appear twice: the later row wins in
    `last_metrics`."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def last_metrics(workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last logged eval/ and train/ scalars of a run, each as {"step": s, "eval/...": v, ...} ({} if none)."""
    eval_metrics: dict[str, Any] = {}
    train_metrics: dict[str, Any] = {}
    for row in read_metric_rows(workdir):
        step = row["step"]
        if any(key.startswith("eval/") for key in row):
            eval_metrics = {"step": step, **{k: v for k, v in row.items() if k.startswith("eval/")}}
        if any(key.startswith("train/") for key in row):
            train_metrics = {"step": step, **{k: v for k, v in row.items() if k.startswith("train/")}}
    return eval_metrics, train_metrics
