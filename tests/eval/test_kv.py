"""eval.kv: a cache policy swapped into a trained softmax decoder; at a budget covering the context every policy
decodes exactly as the full cache, a smaller budget allocates proportionally fewer cache bytes; the leaderboard is
written as JSON + PNG; bad policy specs are clear errors (checkpoints: test_kv_checkpoint.py)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from configs import kv_retrieval
from eval import kv
from train.run import build_run

CONTEXT, PROMPT = 32, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The kv_retrieval:smoke run at its initial parameters (what eval.kv reads of a trained run, without training)."""
    config = kv_retrieval.get_config("smoke")
    config.seq_len = CONTEXT
    built = build_run(config, str(tmp_path_factory.mktemp("kv")))
    return dataclasses.replace(built, params=built.init_state(jax.random.key(0)).params)


def test_grid_full_budget_equals_full_cache_and_bytes_scale(run, tmp_path):
    lines = []
    results = kv.run_grid(
        run, ["h2o"], [1.0, 0.25], ["mqar"], context=CONTEXT, prompt=PROMPT, rows=2, num_batches=1, log=lines.append
    )
    full, whole, quarter = results
    assert full["policy"] == "full" and whole["budget_entries"] == CONTEXT and quarter["budget_entries"] == 8
    assert whole["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert whole["accuracy"] == full["accuracy"]
    # h2o's cache: keys and values (float32) + position + key mass per slot, 2 rows, 1 kv head, 32-wide heads, 2 layers
    per_slot = 2 * 1 * (2 * 32 * 4 + 4 + 4)
    assert whole["cache_bytes"] - quarter["cache_bytes"] == 2 * (CONTEXT - 8) * per_slot
    assert quarter["cache_ratio"] < 0.3 and len(lines) == 3
    report = {"workdir": str(tmp_path), "context": CONTEXT, "results": results}
    paths = kv.write(report, [str(tmp_path / "grid.json")])
    assert json.loads((tmp_path / "grid.json").read_text())["results"][2]["budget"] == 0.25
    assert (tmp_path / "grid.png").stat().st_size > 0 and len(paths) == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("softmax", "'softmax' is not a KV-cache policy"),
        ("streaming:sinks", "option 'sinks' must be option=value"),
    ],
)
def test_bad_policy_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        kv.parse_policy(spec)


def test_policy_spec_options():
    assert kv.parse_policy("streaming:sinks=0") == ("streaming", {"sinks": 0})
    assert kv.parse_policy("snapkv:pooling=avg") == ("snapkv", {"pooling": "avg"})


def test_score_counts_each_rows_answer_positions_in_order():
    rng = np.random.default_rng(0)
    rows, length, vocab, prompt = 3, 10, 7, 4
    logits = rng.standard_normal((rows, length, vocab))
    targets = rng.integers(0, vocab, size=(rows, length))
    weights = np.zeros((rows, length), np.float32)
    answers = [(4, 6), (5, 9), (7, 8)]  # each row's two scored positions, at different places
    for row, places in enumerate(answers):
        weights[row, list(places)] = 1.0
    targets[0, 4] = logits[0, 4].argmax()  # row 0 right on its first answer
    targets[2, 8] = logits[2, 8].argmax()  # row 2 right on its second
    batch = {"inputs": targets, "targets": targets, "weights": weights}
    scored = kv.score(logits, batch, prompt)
    expected = np.zeros(2)
    for row, places in enumerate(answers):
        for slot, t in enumerate(places):
            expected[slot] += float(max(range(vocab), key=lambda v: logits[row, t, v]) == targets[row, t])
    assert scored["by_position"].tolist() == expected.tolist() and scored["rows"] == rows
    assert scored["correct"] == expected.sum() and scored["weight"] == 6
    weights[1, 6] = 1.0  # rows scoring different counts: no per-position accuracy
    assert kv.score(logits, {**batch, "weights": weights}, prompt)["by_position"] is None
