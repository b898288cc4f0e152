"""Passkey rows of a run trained on train.data "text_passkey": held-out text with a 5-digit key hidden at evenly
spaced depths and asked for at the end (the rows eval.sparse_quality and eval.kv score retrieval on)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def passkey_rows(run: Any, rows: int, seed: int = 0) -> dict[str, Any]:
    """`rows` passkey rows of the run's length from held-out text (the run's "text_passkey" valid split), needle
    depths evenly over [0, 1]; "answer" is the slice of the answer targets."""
    source = run.data("valid", batch_size=1, per_process=False)
    if not hasattr(source, "passkey_batch"):
        raise ValueError(f"the run's data source {run.config.data.name!r} has no passkeys; train with text_passkey")
    rng = np.random.default_rng(seed)
    parts = [source.passkey_batch(rng, 1, depth=float(depth)) for depth in np.linspace(0.0, 1.0, rows)]
    out = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    out["answer"] = source.answer_slice
    return out


def in_batches(rows: Mapping[str, Any], size: int) -> list[dict[str, Any]]:
    """The passkey rows cut into batches of `size` rows (the text batches' shape: one compilation per model)."""
    count = len(rows["inputs"])
    return [
        {**rows, **{k: rows[k][i : i + size] for k in ("inputs", "targets", "weights")}} for i in range(0, count, size)
    ]
