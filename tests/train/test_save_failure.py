"""A checkpoint that cannot be written (an injected ENOSPC stands in for a full or read-only disk) stops the run
at once with one line: which checkpoint, why, and which checkpoint is the last one on disk."""

import errno
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from orbax.checkpoint._src.path import atomicity

from tests.train.tiny_run import tiny_config
from train import trainer
from train.checkpointing import Checkpointer, CheckpointSaveError, _save_failure_reason

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _disk_full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))


def _state(x):
    return {"w": jnp.full((4, 4), float(x)), "step": jnp.int32(x)}


def _wait_for(predicate, limit_s=60.0):
    deadline = time.monotonic() + limit_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_poll_reports_a_failed_background_save(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, keep=3, save_every=1, async_save=True)
    try:
        ckpt.save(1, state=_state(1), data_state={}, rng=None, config={})
        ckpt.wait()
        ckpt.poll()  # nothing pending: no error
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", _disk_full)
        ckpt.save(2, state=_state(2), data_state={}, rng=None, config={})
        _wait_for(lambda: not ckpt._manager.is_saving_in_progress())
        with pytest.raises(CheckpointSaveError) as info:
            ckpt.poll()
        assert str(info.value) == (
            "checkpoint 2 could not be written: no space left on device; the last checkpoint on disk is 1"
        )
        assert (info.value.step, info.value.last_step) == (2, 1)
        ckpt.poll()  # reported once
    finally:
        ckpt.close()  # returns promptly and does not raise the reported failure again


def test_the_next_save_names_the_failed_step(tmp_path, monkeypatch):
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", _disk_full)
    ckpt = Checkpointer(tmp_path, keep=3, save_every=1, async_save=True)
    try:
        ckpt.save(4, state=_state(4), data_state={}, rng=None, config={})
        with pytest.raises(
            CheckpointSaveError,
            match="^checkpoint 4 could not be written: no space left on device; no checkpoint is on disk$",
        ):
            ckpt.save(5, state=_state(5), data_state={}, rng=None, config={})
    finally:
        ckpt.close()


def test_reason_from_a_tensorstore_error():
    error = ValueError("RESOURCE_EXHAUSTED: Failed to write 37424 bytes to file 19: No space left [os_error_code='28']")
    assert _save_failure_reason(error) == "no space left on device"
    assert _save_failure_reason(RuntimeError("first line\nsecond")) == "first line"


@pytest.mark.slow
def test_trainer_stops_at_the_step_after_the_failed_save(tmp_path, monkeypatch):
    config = tiny_config()
    config.total_steps, config.checkpoint_every = 6, 2
    original = Checkpointer.save

    def save(self, step, **kwargs):
        if step == 4:
            self.wait()  # checkpoint 2 is on disk before the disk "fills"
            monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", _disk_full)
        return original(self, step, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save)
    with pytest.raises(CheckpointSaveError) as info:
        trainer.run(config, str(tmp_path))
    assert (
        str(info.value)
        == "checkpoint 4 could not be written: no space left on device; the last checkpoint on disk is 2"
    )
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        logged = [line for line in f if "train/loss" in line]
    assert len(logged) <= 6  # stopped at step 5 (or, if the write was still running then, at the save of 6)


_FAILING_RUN = """
import errno, os, runpy, sys
from orbax.checkpoint._src.path import atomicity
from train.checkpointing import Checkpointer

async def disk_full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

original = Checkpointer.save
def save(self, step, **kwargs):
    if step == 2:
        atomicity.AtomicRenameTemporaryPath.finalize = disk_full
    return original(self, step, **kwargs)
Checkpointer.save = save
sys.argv = ["train"] + sys.argv[1:]
runpy.run_module("train", run_name="__main__")
"""


@pytest.mark.slow
def test_command_line_says_one_line_and_exits_promptly(tmp_path):
    script = tmp_path / "failing_run.py"
    script.write_text(_FAILING_RUN)
    workdir = tmp_path / "run"
    args = ["--config", "configs/lm_tiny.py:smoke", "--workdir", str(workdir), "--config.model.num_layers=1"]
    args += ["--config.total_steps=8", "--config.checkpoint_every=2", "--config.eval_every=0"]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: checkpoint 2 could not be written: no space left on device; no checkpoint is on disk"], (
        proc.stderr[-3000:]
    )
