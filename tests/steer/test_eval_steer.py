"""python -m eval.steer end to end on the smoke preset: it trains an empty workdir, writes the JSON and PNG with
every system's numbers, and alpha=1 reproduces the unsteered accuracy exactly; bad flags exit with status 2."""

import json
import os

import pytest

from eval import steer


@pytest.mark.slow
def test_smoke_run_writes_every_system(tmp_path):
    output = str(tmp_path / "steer.json")
    argv = ["--workdir", str(tmp_path / "run"), "--config", "configs/steer_emphasis.py:smoke", "--output", output]
    result = steer.main([*argv, "--rows", "8", "--profile-rows", "8", "--k", "1", "--fit-steps", "2"])
    with open(output, encoding="utf-8") as f:
        assert json.load(f)["baseline"] == result["baseline"]
    assert os.path.isfile(str(tmp_path / "steer.png"))
    assert set(result["systems"]) >= {"pasta", "autopasta", "act"}
    assert result["pasta"]["alpha_sweep"]["1.0"] == result["baseline"]["accuracy"]
    assert 0.0 <= result["autopasta"]["identification_accuracy"] <= 1.0
    assert len(result["act"]["sinks_before"]["hidden"]) == 2  # layers
    assert set(result["soft_injection"]) == {"QA", "QW"}


def test_bad_flags_exit_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        steer.main(["--rows", "0", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--rows=0 must be >= 1" in capsys.readouterr().err
