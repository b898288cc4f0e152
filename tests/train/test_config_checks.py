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


# --- the model built at config-check time, and the npz data source from the command line -----------------------


def test_kv_heads_not_dividing_heads_is_one_line(tmp_path, no_compilation):
    config = _smoke()
    config.model.num_kv_heads = 3  # smoke has 2 heads
    message = _run_error(config, tmp_path)
    assert message.startswith("model.num_kv_heads=3 must divide model.num_heads=2"), message


def test_bad_value_inside_attention_options_is_one_line(tmp_path, no_compilation):
    config = _smoke()
    config.model.attention_options = {"window": "abc"}  # a valid option name with a value the layer refuses
    message = _run_error(config, tmp_path)
    assert "attention_options={'window': 'abc'}" in message and "window='abc' must be" in message


def _npz_config(path) -> object:
    from configs import vit_tiny

    config = vit_tiny.get_config("smoke")
    config.data.name = "npz"
    config.data.path = str(path)
    return config


def _write_npz(path, count: int, side: int = 16, classes: int = 4):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, side, side, 3)).astype(np.uint8)
    np.savez(path, images=images, labels=np.arange(count) % classes)  # every class present


def test_npz_source_from_the_config_fields(tmp_path, no_compilation):
    path = tmp_path / "mine.npz"
    _write_npz(path, 20)
    s = trainer.setup(_npz_config(path), str(tmp_path / "run"))
    assert s.train_source.num_classes == 4 and s.train_source.element_spec["images"][0][1:] == (16, 16, 3)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("empty", "is an empty .npz (no arrays)"),
        ("zero", "holds 0 examples"),
        ("text", "is not an .npz archive (it starts with b'hello"),
        ("pickle", "is not an .npz archive"),
        ("classes", "has labels up to 9, but data.num_classes=4; set --config.data.num_classes=10"),
        ("size", "holds 28x28 images, but data.image_size=16; set --config.data.image_size=28"),
    ],
)
def test_bad_npz_files_are_one_line(tmp_path, no_compilation, content, expected):
    import pickle

    import numpy as np

    path = tmp_path / "data.npz"
    if content == "empty":
        np.savez(path)
    elif content == "zero":
        np.savez(path, images=np.zeros((0, 16, 16, 3), np.uint8), labels=np.zeros((0,), np.int64))
    elif content == "text":
        path.write_text("hello, not an archive\n")
    elif content == "pickle":
        path.write_bytes(pickle.dumps({"images": [1, 2]}))
    elif content == "classes":
        _write_npz(path, 20, classes=10)
    else:
        _write_npz(path, 20, side=28)
    message = _run_error(_npz_config(path), tmp_path / "run")
    assert expected in message, message


def test_cli_accepts_data_path_for_the_npz_source(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("not an archive\n")
    result = _cli(
        "--config", "configs/vit_tiny.py:smoke", "--workdir", str(tmp_path / "run"),
        "--config.data.name=npz", f"--config.data.path={path}",
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an .npz archive" in lines[0], lines


def test_cli_bad_attention_option_value_is_one_line(tmp_path):
    result = _cli(
        "--config", "configs/lm_tiny.py:smoke", "--workdir", str(tmp_path),
        "--config.model.attention_options={'window': 'abc'}",
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "window='abc' must be None, an int, or a pair" in lines[0], lines
