"""eval.techniques: overrides, and the side-by-side record of a technique and its baseline (JSON + PNG)."""

import json
import os

import pytest

from eval import techniques as evaluator
from tests.train.tiny_run import tiny_config


def test_set_overrides_nested_fields_and_names_unknown_ones():
    config = tiny_config()
    evaluator._override(config, "optimizer.learning_rate=0.03")
    evaluator._override(config, "techniques=[{'name': 'meap', 'ratio': 0.1}]")
    assert config.optimizer.learning_rate == 0.03
    assert list(config.techniques) == [{"name": "meap", "ratio": 0.1}]
    with pytest.raises(ValueError, match=r"--set optimizer.learnig_rate.*did you mean 'optimizer.learning_rate'"):
        evaluator._override(config, "optimizer.learnig_rate=1")
    with pytest.raises(ValueError, match="must be FIELD=VALUE"):
        evaluator._override(config, "optimizer.learning_rate")


def test_a_config_without_techniques_is_refused():
    with pytest.raises(ValueError, match="names no technique"):
        evaluator.TechniqueComparison(tiny_config())


@pytest.mark.slow
def test_comparison_records_both_runs(tmp_path):
    config = tiny_config()
    config.eval_every = 1
    config.eval.stats_batch_size = 2
    config.techniques = [{"name": "sigma_reparam"}]
    record = evaluator.TechniqueComparison(config, name="techniques_test", out_dir=str(tmp_path)).run()
    with open(tmp_path / "techniques_test.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert os.path.getsize(tmp_path / "techniques_test.png") > 0
    assert saved["techniques"] == [{"name": "sigma_reparam"}]
    for label in ("baseline", "technique"):
        run = record["runs"][label]
        assert sorted(run["train_loss"]) == [1, 2]
        assert sorted(run["entropy"]["0"]) == [1, 2]  # the probe batch's entropy of the one layer, every step
        assert not record["summary"][label]["diverged"]
    assert "technique/sigma_reparam/gamma_mean" in record["runs"]["technique"]["technique_scalars"]
