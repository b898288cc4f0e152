"""Resuming with a config that differs from the checkpoint's: model, data and optimization changes are refused
with the list of differences unless --config.allow_changes names them; the schedule change is said in one line."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.train.tiny_run import tiny_config
from train import optim, trainer
from train.checkpointing import jsonable
from train.config_checks import ConfigError, allowed_changes, resume_drift

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pair():
    return jsonable(tiny_config().to_dict()), jsonable(tiny_config().to_dict())


def test_identical_and_free_fields_resume_silently():
    saved, current = _pair()
    current["log_every"], current["eval"]["num_batches"], current["mesh"]["shape"] = 5, 3, [4, 2]
    current["checkpoint_every"], current["keep_checkpoints"] = 7, 9
    assert resume_drift(saved, current, step=1, where="ckpt/1") == []


def test_every_refused_difference_is_listed_in_one_line():
    saved, current = _pair()
    current["model"]["attention"] = "hedgehog"
    current["model"]["attention_options"] = {"feature_dim": 8}
    current["seq_len"], current["batch_size"], current["seed"] = 64, 16, 3
    current["optimizer"]["learning_rate"] = 1e-4
    current["data"]["path"] = "/somewhere"
    with pytest.raises(ConfigError) as info:
        resume_drift(saved, current, step=1, where="ckpt/1")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the checkpoint ckpt/1 was written with a different config: ")
    for change in (
        "batch_size 8 -> 16",
        "data.path None -> '/somewhere'",
        "model.attention 'softmax' -> 'hedgehog'",
        "model.attention_options.feature_dim (absent) -> 8",
        "optimizer.learning_rate 0.003 -> 0.0001",
        "seed 0 -> 3",
        "seq_len 32 -> 64",
    ):
        assert change in message, change
    assert message.endswith(
        "--config.allow_changes=batch_size,data.path,model.attention,model.attention_options.feature_dim,"
        "optimizer.learning_rate,seed,seq_len"
    )


def test_allow_changes_accepts_named_fields_and_sections():
    saved, current = _pair()
    current["model"]["attention_options"] = {"feature_dim": 8}
    current["model"]["attention"] = "hedgehog"
    current["seed"] = 3
    current["allow_changes"] = "model, seed"
    assert allowed_changes(current) == ("model", "seed")
    notes = resume_drift(saved, current, step=1, where="ckpt/1")
    assert notes == [
        "resuming with config changes accepted by allow_changes: model.attention 'softmax' -> 'hedgehog', "
        "model.attention_options.feature_dim (absent) -> 8, seed 0 -> 3"
    ]
    current["allow_changes"] = "seed"
    with pytest.raises(ConfigError, match=r"model.attention 'softmax' -> 'hedgehog'"):
        resume_drift(saved, current, step=1, where="ckpt/1")


def test_allow_changes_must_name_fields():
    saved, current = _pair()
    current["allow_changes"] = ["total_step"]
    with pytest.raises(ConfigError, match=r"^allow_changes names 'total_step', which is no config field"):
        resume_drift(saved, current, step=1, where="ckpt/1")


def test_total_steps_growth_states_the_schedule_change():
    saved, current = _pair()
    saved["total_steps"] = 10
    current["total_steps"], current["allow_changes"] = 20, "total_steps"
    notes = resume_drift(saved, current, step=6, where="ckpt/6")
    _, before = optim.make_optimizer(saved["optimizer"], 10)
    _, after = optim.make_optimizer(current["optimizer"], 20)
    assert notes == [
        "resuming with config changes accepted by allow_changes: total_steps 10 -> 20",
        "learning-rate schedule changed: cosine decay to step 10 -> cosine decay to step 20; "
        f"at step 6 the learning rate is {float(after(6)):.4g} (was {float(before(6)):.4g})",
    ]
    assert float(after(6)) > float(before(6))  # a longer cosine decays more slowly


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """tiny_config trained to its end (step 2, checkpoints 1 and 2)."""
    workdir = str(tmp_path_factory.mktemp("drift"))
    trainer.run(tiny_config(), workdir)
    return workdir


def _copy(finished_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    return workdir


def test_trainer_refuses_a_changed_mechanism_and_seed(finished_run, tmp_path):
    workdir = _copy(finished_run, tmp_path)
    config = tiny_config()
    config.total_steps, config.seed = 3, 1
    config.model.attention = "clipped_softmax"
    config.model.attention_options = {"window": (4, 0)}
    with pytest.raises(ConfigError) as info:
        trainer.run(config, workdir)
    message = str(info.value)
    assert "\n" not in message
    assert "model.attention 'softmax' -> 'clipped_softmax'" in message
    assert "model.attention_options.window (absent) -> [4, 0]" in message
    assert "seed 0 -> 1" in message and "total_steps 2 -> 3" in message
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "3"))


def test_trainer_continues_with_allowed_total_steps_and_seed(finished_run, tmp_path, capsys):
    workdir = _copy(finished_run, tmp_path)
    config = tiny_config()
    config.total_steps, config.seed, config.allow_changes = 3, 1, "total_steps,seed"
    capsys.readouterr()
    result = trainer.run(config, workdir)
    out = capsys.readouterr().out
    assert (result.start_step, result.step) == (2, 3)
    assert "resuming with config changes accepted by allow_changes: seed 0 -> 1, total_steps 2 -> 3" in out
    assert "learning-rate schedule changed: cosine decay to step 2 -> cosine decay to step 3" in out


def test_command_line_seed_change_is_one_line(finished_run, tmp_path):
    workdir = _copy(finished_run, tmp_path)
    args = ["--config", "configs/lm_tiny.py:smoke", "--workdir", workdir, "--config.model.num_layers=1"]
    args += ["--config.total_steps=2", "--config.checkpoint_every=1", "--config.log_every=1", "--config.eval_every=0"]
    args += ["--config.eval.stats_batch_size=0", "--config.eval.num_batches=1", "--config.seed=5"]
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the checkpoint "), proc.stderr[-3000:]
    assert "seed 0 -> 5" in lines[0] and lines[0].endswith("--config.allow_changes=seed")
