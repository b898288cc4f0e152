"""python -m eval.steer --vlm end to end on the smoke preset: it trains an empty workdir and writes the JSON and PNG
with every VLM system's numbers; the steering systems' no-op settings reproduce the unsteered accuracy."""

import json
import os

import pytest

from eval import steer


@pytest.mark.slow
def test_smoke_run_writes_every_vlm_system(tmp_path):
    output = str(tmp_path / "vlm.json")
    argv = ["--vlm", "--workdir", str(tmp_path / "run"), "--config", "configs/steer_vlm.py:smoke", "--output", output]
    result = steer.main([*argv, "--rows", "8", "--damro-k", "1"])
    with open(output, encoding="utf-8") as f:
        assert json.load(f)["baseline"] == result["baseline"]
    assert os.path.isfile(str(tmp_path / "vlm.png"))
    assert set(result["systems"]) == {"var", "vhr", "damro", "imbalance_fix", "carve"}
    for name in ("var", "vhr", "damro", "imbalance_fix", "carve"):
        assert 0.0 <= result[name]["accuracy"] <= 1.0
    assert len(result["imbalance_fix"]["image_share_before"]) == 1  # the smoke decoder's one layer
    noop = steer.main([*argv, "--rows", "8", "--damro-k", "1", "--var-p", "1", "--vhr-alpha", "1", "--damro-alpha",
                       "0", "--damro-beta", "0", "--imbalance-gamma", "0", "--carve-keep", "1", "--no-plot"])  # fmt: skip
    for name in ("var", "vhr", "damro", "imbalance_fix", "carve"):
        assert noop[name]["accuracy"] == noop["baseline"]["accuracy"]
