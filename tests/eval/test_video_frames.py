"""eval.video_frames: video-question accuracy against the number of frames, one line per cross-attention."""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest

from configs import video_timing
from eval import video_frames
from train.data import make_source


def test_frames_config_sets_the_clip_and_the_mask_to_the_same_frame_count():
    base = video_timing.get_config("")
    ccam = video_frames.frames_config(base, "video_ccam", 8, seed=3)
    assert ccam.data.num_frames == 8 and ccam.seed == 3
    assert ccam.model.cross_attention == "video_ccam" and ccam.model.cross_attention_options.to_dict() == {
        "num_frames": 8
    }
    plain = video_frames.frames_config(base, "softmax", 16, seed=0)
    assert plain.model.cross_attention == "softmax" and plain.model.cross_attention_options.to_dict() == {}
    assert plain.data.num_frames == 16 and plain.model.vision_position_embedding == "learned"
    dual = video_frames.frames_config(base, "crosslmm", 8, seed=0)  # 8 frames x 4 tokens, pooled in pairs
    assert dual.model.visual_prefix_pool == 2 and dual.model.cross_attention == "crosslmm"
    assert dual.model.cross_attention_options.to_dict() == {"visual_tokens": 16, "num_frames": 8}
    fixed = video_frames.frames_config(base, "softmax_sincos2d", 4, seed=0)
    assert fixed.model.cross_attention == "softmax" and fixed.model.vision_position_embedding == "sincos2d"
    assert base.data.num_frames == 4 and base.model.cross_attention == "video_ccam"  # the base is not changed
    # 8 frames of 8x8 pixels: a 64x8 image, 4 patch tokens per frame
    options = ccam.data.to_dict()
    source = make_source(options.pop("name"), split="valid", batch_size=2, seed=0, **options)
    assert source.element_spec["images"][0] == (2, 64, 8, 3)


@pytest.mark.parametrize(
    "mechanism, frames, message",
    [("cross_lmm", 4, "mechanism='cross_lmm'"), ("softmax", 0, "frames=0"), ("softmax", 2.0, "frames=2.0")],
)
def test_frames_config_rejects_bad_input(mechanism, frames, message):
    with pytest.raises(ValueError, match=message):
        video_frames.frames_config(video_timing.get_config(""), mechanism, frames, seed=0)


def test_plan_runs_frames_outermost_and_bad_flags_exit_before_training():
    runs = video_frames.plan(video_timing.get_config("smoke"), ["video_ccam", "softmax"], [2, 4], [0, 1])
    order = [(r["frames"], r["seed"], r["mechanism"]) for r in runs]
    assert order[:3] == [(2, 0, "video_ccam"), (2, 0, "softmax"), (2, 1, "video_ccam")] and len(order) == 8
    with pytest.raises(SystemExit, match="--frames '2,x'"):
        video_frames.main(["--frames", "2,x"])
    with pytest.raises(SystemExit, match="--steps 0"):
        video_frames.main(["--config", "configs/video_timing.py:smoke", "--steps", "0"])


def test_run_one_records_the_last_eval_accuracy_with_two_standard_errors(tmp_path, monkeypatch):
    def fake_train(config, workdir):  # the trainer's metrics.jsonl: train rows, then eval rows
        os.makedirs(workdir, exist_ok=True)
        rows = [
            {"step": 5, "train/loss": 1.3, "perf/step_time_s": 0.5},
            {"step": 10, "train/loss": 1.1, "perf/step_time_s": 0.1},
            {"step": 10, "eval/accuracy": 0.5, "eval/loss": 1.2},
            {"step": 20, "train/loss": 0.9, "perf/step_time_s": 0.2},
            {"step": 20, "eval/accuracy": 0.75, "eval/loss": 0.8},
        ]
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        return types.SimpleNamespace(step=20, start_step=4)

    monkeypatch.setattr(video_frames, "train", fake_train)
    config = video_frames.frames_config(video_timing.get_config(""), "video_ccam", 2, seed=0)
    run = {"mechanism": "video_ccam", "frames": 2, "seed": 0, "config": config}
    record = video_frames.run_one(run, str(tmp_path / "run"))
    n = config.eval.num_batches * config.batch_size  # 8 batches of 32 questions
    assert record["eval_questions"] == n == 256
    assert record["accuracy"] == 0.75 and record["eval_step"] == 20
    assert record["accuracy_by_step"] == {10: 0.5, 20: 0.75}
    assert record["accuracy_2se"] == pytest.approx(2 * math.sqrt(0.75 * 0.25 / 256))
    assert record["eval_loss"] == 0.8 and record["train_loss"] == 0.9
    assert record["steps"] == 20 and record["image_tokens"] == 8  # 2 frames x (8/4)^2 patches
    assert record["seconds_per_step"] == 0.2  # the median of the logged train-step times
    assert record["cross_attention_options"] == {"num_frames": 2} and "error" not in record
    assert record["vision_position_embedding"] == "learned"


def _report(records):
    return {
        "records": records,
        "frames": [2, 4],
        "seeds": [0, 1],
        "steps": 10,
        "chance": 0.25,
        "eval_questions": 256,
        "machine": {"device": "cpu"},
    }


def test_curves_average_seeds_and_the_table_and_plot_show_every_run(tmp_path):
    def rec(mechanism, frames, seed, accuracy):
        se = None if accuracy is None else 2 * math.sqrt(accuracy * (1 - accuracy) / 256)
        return {
            "mechanism": mechanism,
            "frames": frames,
            "seed": seed,
            "image_tokens": 4 * frames,
            "accuracy": accuracy,
            "accuracy_2se": se,
            "eval_loss": 1.0,
            "steps": 10,
            "seconds_per_step": 0.1,
        }

    records = [
        rec("video_ccam", 2, 0, 1.0),
        rec("video_ccam", 2, 1, 0.5),
        rec("softmax", 2, 0, 0.25),
        rec("video_ccam", 4, 0, 0.75),
        {**rec("softmax", 4, 0, None), "error": "FloatingPointError: nan"},
    ]
    report = _report(records)
    assert video_frames.curves(report) == {"video_ccam": {2: [1.0, 0.5], 4: [0.75]}, "softmax": {2: [0.25]}}
    text = video_frames.table(report)
    assert text.count("\n| ") == 5  # one row per run
    assert "| video_ccam | 4 | 16 | 0 | 0.750 ± 0.054 |" in text
    assert "softmax — FloatingPointError: nan | 4 | 16 | 0 | — |" in text
    png = tmp_path / "frames.png"
    video_frames.plot(report, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sweep_trains_each_run_and_records_the_accuracy_the_checkpoint_gives(tmp_path, capsys):
    from train.run import load_run

    out = tmp_path / "frames.json"
    argv = [
        "--config", "configs/video_timing.py:smoke", "--frames", "2", "--mechanisms", "video_ccam,softmax",
        "--steps", "2", "--workdir-root", str(tmp_path / "runs"), "--output", str(out),
    ]  # fmt: skip
    report = video_frames.main(argv)
    assert json.loads(out.read_text())["records"] == json.loads(json.dumps(report["records"]))
    assert os.path.exists(tmp_path / "frames.png") and "chance level: 0.25" in capsys.readouterr().out
    assert report["machine"]["platform"] == "cpu" and report["steps"] == 2
    for record in report["records"]:
        assert record["steps"] == 2 and "error" not in record
        run = load_run(record["workdir"])
        assert run.config.data.num_frames == 2
        source = run.data("valid", per_process=False)
        correct = total = 0
        for _ in range(run.config.eval.num_batches):  # the answer position's argmax, by hand
            batch = source.next_batch()
            with run.tracing():
                logits = np.asarray(run.task.apply({"params": run.params}, batch))
            answer = logits[:, -1].argmax(-1)
            correct += int(np.sum(answer == batch["targets"][:, -1]))
            total += len(answer)
        assert record["accuracy"] == pytest.approx(correct / total, abs=1e-6)
        assert record["eval_questions"] == total


def test_check_plan_names_each_run_the_trainer_cannot_build(tmp_path):
    runs = video_frames.plan(video_timing.get_config("smoke"), ["softmax"], [17], [0])
    problems = video_frames.check_plan(runs, str(tmp_path))
    assert problems == ["softmax_f17_s0: data: num_frames=17 must be at most 16 (the frame-number words)"]
