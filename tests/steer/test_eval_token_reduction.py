"""python -m eval.token_reduction end to end on the smoke preset: it trains an empty workdir, writes the JSON and PNG
with every system's curve, keeping every token gives one accuracy for all systems, kept shares follow the budgets;
bad flags exit with status 2."""

import json
import math
import os

import pytest

from eval import token_reduction


@pytest.mark.slow
def test_smoke_run_writes_every_curve(tmp_path):
    output = str(tmp_path / "tr.json")
    argv = ["--workdir", str(tmp_path / "run"), "--config", "configs/token_reduction.py:smoke", "--output", output]
    result = token_reduction.main([*argv, "--rows", "8", "--calibration-rows", "8", "--budgets", "1", "0.25",
                                   "--taus", "1", "0.5", "--steepness", "1"])  # fmt: skip
    with open(output, encoding="utf-8") as f:
        assert json.load(f)["curves"] == result["curves"]
    assert os.path.isfile(str(tmp_path / "tr.png"))
    curves = result["curves"]
    assert set(curves) == set(token_reduction.SYSTEMS)
    # budget 1 and tau 1 keep every token (vmtc_cmai still inhibits attention there)
    full = {points[0]["accuracy"] for name, points in curves.items() if name != "vmtc_cmai"}
    assert len(full) == 1 and all(points[0]["kept"] == 1.0 for points in curves.values())
    n = result["image_tokens"]
    for name in ("random", "stride", "vtc_cls", "vmtc"):
        assert curves[name][1]["kept"] == pytest.approx(math.ceil(0.25 * n) / n)
    assert curves["g_search"][1]["kept"] == pytest.approx(0.25, abs=1 / n)
    assert all(b <= a for a, b in zip(result["g_search_schedule"]["ratios"], result["g_search_schedule"]["ratios"][1:],
                                      strict=False))  # fmt: skip


def test_bad_flags_exit_with_status_2(tmp_path, capsys):
    for flags, message in ((["--rows", "0"], "--rows=0 must be >= 1"), (["--budgets", "1.5"], "--budgets=1.5")):
        with pytest.raises(SystemExit) as exit_info:
            token_reduction.main([*flags, "--workdir", str(tmp_path)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
