"""Config mistakes stop the run before any compilation, with a one-line message naming the fix."""

import os
import subprocess
import sys

import pytest

from configs import lm_tiny
from train import config_checks, trainer
from train.config_checks import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def no_compilation(monkeypatch):
    """Fails the test if the trainer gets as far as shapes, init or compilation."""

    def boom(*args, **kwargs):
        raise AssertionError("the trainer reached state layout/compilation before reporting the config error")

    monkeypatch.setattr(trainer, "layout_state", boom)
    monkeypatch.setattr(trainer, "make_steps", boom)
    monkeypatch.setattr(trainer, "init_state", boom)


def _smoke():
    return lm_tiny.get_config("smoke")


def _run_error(config, tmp_path) -> str:
    with pytest.raises(ConfigError) as info:
        trainer.run(config, str(tmp_path))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_unknown_field_names_the_closest_valid_one(tmp_path, no_compilation):
    config = _smoke()
    config.total_step = 5
    assert "did you mean 'total_steps'" in _run_error(config, tmp_path)

    config = _smoke()
    config.optimizer.learning_rat = 0.1
    assert "did you mean 'optimizer.learning_rate'" in _run_error(config, tmp_path)


def test_unknown_model_field_uses_the_model_kind(tmp_path, no_compilation):
    config = _smoke()
    config.model.patch_size = 4  # a ViT field; this is a decoder
    message = _run_error(config, tmp_path)
    assert "'model.patch_size'" in message and "d_model" in message


def test_unknown_attention_name(tmp_path, no_compilation):
    config = _smoke()
    config.model.attention = "sofmax"
    message = _run_error(config, tmp_path)
    assert "'sofmax'" in message and "did you mean 'softmax'" in message


def test_unknown_attention_option_names_the_closest(tmp_path, no_compilation):
    config = _smoke()
    config.model.attention_options.positon = "rope"
    message = _run_error(config, tmp_path)
    assert "'positon'" in message and "did you mean 'position'" in message


def test_batch_not_divisible_by_mesh_batch_axes(tmp_path, no_compilation):
    config = _smoke()
    config.batch_size = 12  # 8 fake devices on the data axis
    message = _run_error(config, tmp_path)
    assert "batch_size=12" in message and "8" in message


def test_missing_data_path(tmp_path, no_compilation):
    config = _smoke()
    missing = str(tmp_path / "no_such_corpus")
    config.data.path = missing
    message = _run_error(config, tmp_path)
    assert "data.path" in message and missing in message


def test_bad_values(tmp_path, no_compilation):
    config = _smoke()
    config.precision.compute_dtype = "float16"
    assert "precision.compute_dtype='float16'" in _run_error(config, tmp_path)
    config = _smoke()
    config.log_every = 0
    assert "log_every=0" in _run_error(config, tmp_path)
    config = _smoke()
    config.model.vocab_size = 100  # the text source has 256 byte values
    assert "model.vocab_size=100" in _run_error(config, tmp_path)


def test_override_message_for_unknown_and_nested_fields():
    config = _smoke()
    assert config_checks.unknown_override_message(config, "model.d_model") is None
    message = config_checks.unknown_override_message(config, "optimzer.learning_rate")
    assert "did you mean 'optimizer'" in message
    message = config_checks.unknown_override_message(config, "model.attention_options.window")
    assert "attention_options=" in message  # tells how to pass mechanism options


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_rewords_unknown_override_and_bad_preset(tmp_path):
    result = _cli("--config", "configs/lm_tiny.py:smoke", "--workdir", str(tmp_path), "--config.total_step=3")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert "--config.total_step" in last and "did you mean 'total_steps'" in last

    result = _cli("--config", "configs/lm_tiny.py:smok", "--workdir", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown preset 'smok'" in result.stderr


def test_cli_unknown_attention_exits_with_one_line(tmp_path):
    result = _cli("--config", "configs/lm_tiny.py:smoke", "--workdir", str(tmp_path), "--config.model.attention=sofmax")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "did you mean 'softmax'" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "checkpoints").exists()
