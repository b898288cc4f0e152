"""eval.sweep: mechanisms trained side by side on one config, resumable, failures recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval import sweep
from train.config_file import load_config_file
from train.run import load_run


def accuracy_by_hand(workdir):
    """Fraction of the validation images (the config's eval.num_batches batches) whose argmax logit is the label,
    under the run's last checkpoint."""
    run = load_run(workdir)
    source = run.data("valid", per_process=False)
    correct = total = 0
    for _ in range(run.config.eval.num_batches):
        batch = source.next_batch()
        with run.tracing():
            logits = np.asarray(run.task.apply({"params": run.params}, {"images": batch["images"]}))
        correct += int(np.sum(np.argmax(logits, axis=-1) == batch["labels"]))
        total += len(batch["labels"])
    return correct / total


def test_sweep_trains_reads_back_and_records_failures(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    argv = [
        "--config", "configs/vit_tiny.py:smoke",
        "--mechanisms", "softmax,window",
        "--workdir-root", str(root),
        "--set", "model.pool=mean",
        "--no-plot",
        "--option", "window.window_size=2",  # the smoke preset's patch grid is 4x4
    ]  # fmt: skip
    real_train = sweep.train

    def train_or_diverge(config, workdir):  # stands in for a run that fails while training
        if config.model.attention == "window":
            raise FloatingPointError("loss is nan at step 3")
        return real_train(config, workdir)

    monkeypatch.setattr(sweep, "train", train_or_diverge)
    with pytest.raises(SystemExit) as info:
        sweep.main(argv)
    assert info.value.code == 1  # a failed run makes the whole sweep fail, after the report is written
    assert "1 run(s) failed: window" in capsys.readouterr().err
    out = root / "sweep.json"  # the report's default place: under the workdir root, not the current directory
    report = json.loads(out.read_text())
    assert report["chance"] == pytest.approx(0.25)
    softmax, window = report["records"]
    assert softmax["steps"] == 4 and softmax["start_step"] == 0 and "error" not in softmax
    assert softmax["eval"]["step"] == 4
    assert softmax["eval"]["eval/accuracy"] == pytest.approx(accuracy_by_hand(softmax["workdir"]), abs=1e-6)
    assert window["error"] == "FloatingPointError: loss is nan at step 3"

    again = sweep.main(argv[:3] + ["softmax"] + argv[4:9])  # finished runs are read back
    assert again["records"][0]["start_step"] == 4 and again["records"][0]["eval"] == softmax["eval"]
    assert "softmax" in sweep.table(again)


def test_every_mechanism_is_checked_before_anything_trains(tmp_path, monkeypatch, capsys):
    def no_training(config, workdir):
        raise AssertionError("a run started although a mechanism of the sweep cannot be built")

    monkeypatch.setattr(sweep, "train", no_training)
    argv = [
        "--config", "configs/vit_tiny.py:smoke",
        "--mechanisms", "softmax,windw,window",
        "--workdir-root", str(tmp_path / "runs"),
        "--option", "window.window_size=0",  # a known option with a value the layer refuses
        "--no-plot",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        sweep.main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in "".join(lines)
    assert lines[0].startswith("error: windw: ") and "did you mean 'window'" in lines[0]
    assert lines[1].startswith("error: window: ") and "window_size=0 must be" in lines[1]
    assert lines[2] == "nothing trained: fix the 2 mechanism(s) above"
    assert not (tmp_path / "runs" / "softmax" / "checkpoints").exists()


def test_vit_tiny_docstring_quotes_the_measured_sweep():
    from configs import vit_tiny

    with open("benchmarks/results/vit_spatial_cpu.json", encoding="utf-8") as f:
        records = {r["mechanism"]: r for r in json.load(f)["records"]}
    doc = vit_tiny.__doc__
    softmax = records["softmax"]
    assert f"softmax reaches {softmax['eval']['eval/accuracy']:.3f} eval accuracy after its {softmax['steps']}" in doc
    assert f"neighborhood {records['neighborhood']['eval']['eval/accuracy']:.3f}" in doc
    config = vit_tiny.get_config()
    assert config.model.pool == "mean" and "no class token" in doc and "+ a class token" not in doc


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
