"""eval.gcog on a 2-step run of configs/gcog_tiny.py:smoke: every test is measured and the JSON (and PNG) written."""

from __future__ import annotations

import json
import os

import pytest

from eval import gcog
from train.run import load_config_file, train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "gcog_tiny.py")


@pytest.mark.slow
def test_evaluator_writes_every_test_of_a_two_step_run(tmp_path):
    workdir = str(tmp_path / "run")
    train(load_config_file(CONFIG + ":smoke"), workdir)
    output = str(tmp_path / "gcog.json")
    argv = ["--workdir", workdir, "--batches", "1", "--batch-size", "8", "--distractors", "10,40", "--output", output]
    report = gcog.main(argv)
    with open(output) as f:
        saved = json.load(f)
    assert os.path.exists(report["png_path"])
    tests = [r["test"] for r in saved["records"]]
    assert tests == [
        "in_distribution",
        "distractor_10",
        "distractor_40",
        "systematic",
        "systematic_tree",
        "productive",
    ]
    for record in saved["records"]:
        assert record["questions"] == 8 and record["step"] == 2 and record["run"] == "cross:softmax"
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.25 <= record["majority"] <= 1.0
        assert record["fidelity"] in ("paper", "official-code", "reconstructed")


def test_tests_of_a_single_generalisation_run():
    tests = gcog.tests_of({"generalization": "systematic", "test_distractors": 40}, None)
    assert [name for name, _ in tests] == ["in_distribution", "systematic"]
    assert tests[1][1]["ood"] and tests[1][1]["ood_test"] == "systematic" and not tests[0][1]["ood"]
    tests = gcog.tests_of({"generalization": "distractor", "test_distractors": 30}, None)
    assert [name for name, _ in tests] == ["in_distribution", "distractor_30"]


def test_bad_distractor_counts_are_rejected():
    with pytest.raises(ValueError, match="--distractors"):
        gcog.main(["--workdir", "unused", "--distractors", "ten"])
