"""config.evals: analysis tools run from the training loop at their cadence (eval.analysis.train_with_evals), with
results in <workdir>/evals.jsonl and scalars in the run's metrics; a tool without an evaluator is a config error."""

import json
import os

import pytest

from configs import lm_tiny
from eval.analysis import cadence_evaluators, train_with_evals
from train import trainer
from train.config_checks import ConfigError, check_evals


def _config(evals):
    config = lm_tiny.get_config("smoke")
    config.total_steps = 2
    config.eval_every = 0
    config.evals = evals
    return config


@pytest.mark.slow
def test_tools_run_at_their_cadence(tmp_path):
    evals = [
        {"tool": "sink_rate", "every": 1},
        {"tool": "stiffness", "every": 2, "options": {"rows": 1, "length": 4, "layers": "1"}},
    ]
    train_with_evals(_config(evals), str(tmp_path))
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "evals.jsonl"))]
    assert [(r["step"], r["tool"]) for r in records] == [(1, "sink_rate"), (2, "sink_rate"), (2, "stiffness")]
    stiffness = records[-1]["result"]
    assert stiffness["layers"] == [1] and stiffness["options"]["length"] == 4
    assert stiffness["per_layer"][0]["token"]["rate_max"] > 0
    metrics = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    logged = {key for row in metrics for key in row if key.startswith("evals/")}
    assert "evals/stiffness/step_size" not in logged  # per-layer lists are not scalars
    assert any(key.startswith("evals/sink_rate/") for key in logged)


def test_a_tool_without_an_evaluator_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"evals\[0\].tool='sink_rate' has no evaluator in this run \(given: none\)"):
        trainer.run(_config([{"tool": "sink_rate", "every": 1}]), str(tmp_path))
    assert "icl_regression" not in cadence_evaluators() and "sink_rate" in cadence_evaluators()
    with pytest.raises(ConfigError, match=r"evals\[0\].every=0 must be a positive int"):
        check_evals([{"tool": "sink_rate", "every": 0}])
    with pytest.raises(ConfigError, match=r"evals\[0\] has unknown fields \['often'\]"):
        check_evals([{"tool": "sink_rate", "every": 1, "often": True}])
