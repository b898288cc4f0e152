"""eval.sweep: mechanisms trained side by side on one config, resumable, failures recorded."""

from __future__ import annotations

import json

import pytest

from eval import sweep
from train.config_file import load_config_file


def test_sweep_trains_reads_back_and_records_failures(tmp_path):
    out = tmp_path / "report.json"
    argv = [
        "--config", "configs/vit_tiny.py:smoke",
        "--mechanisms", "softmax,window",
        "--workdir-root", str(tmp_path / "runs"),
        "--output", str(out),
        "--set", "model.pool=mean",
        "--option", "window.window_size=0",  # an invalid option: recorded, the sweep goes on
        "--no-plot",
    ]  # fmt: skip
    report = sweep.main(argv)
    assert report["chance"] == pytest.approx(0.25)
    softmax, window = report["records"]
    assert softmax["steps"] == 4 and softmax["start_step"] == 0 and "error" not in softmax
    assert 0.0 <= softmax["eval"]["eval/accuracy"] <= 1.0 and softmax["eval"]["step"] == 4
    assert "window_size" in window["error"]
    assert json.loads(out.read_text())["records"][0]["eval"] == softmax["eval"]

    again = sweep.main(argv[:3] + ["softmax"] + argv[4:10] + ["--no-plot"])  # finished runs are read back
    assert again["records"][0]["start_step"] == 4 and again["records"][0]["eval"] == softmax["eval"]
    assert "softmax" in sweep.table(again)


def test_bad_flags_name_the_argument(tmp_path):
    config = load_config_file("configs/vit_tiny.py:smoke")
    with pytest.raises(ValueError, match="^--set model.nope: unknown config field 'model.nope'"):
        sweep.set_field(config, "model.nope", 3)
    with pytest.raises(ValueError, match="expected key=value"):
        sweep.split_assignment("model.pool", "--set")
    with pytest.raises(ValueError, match="mechanism of"):
        sweep.mechanism_options(["halo.block_size=2"], ["softmax"])
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_config_file(str(tmp_path / "missing.py"))
    assert sweep.parse_value("(4, 4)") == (4, 4) and sweep.parse_value("mean") == "mean"
