"""`python -m eval.train` as a real process: SIGTERM saves a checkpoint and exits 0, as under `python -m train`."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train_process import REPO, sigterm_after_first_step
from train.checkpointing import Checkpointer


@pytest.mark.slow
def test_sigterm_under_eval_train_saves_and_exits_0(tmp_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "eval.train",
        "--config",
        "configs/lm_tiny.py:smoke",
        "--workdir",
        str(workdir),
        "--config.total_steps=100000",  # far more than the test waits for
        "--config.log_every=1",
        "--config.eval_every=0",
        "--config.checkpoint_every=50000",
        "--config.evals=({'tool': 'sink_rate', 'every': 50000},)",
    ]
    returncode, output = sigterm_after_first_step(command, {**os.environ, "JAX_PLATFORMS": "cpu"})
    assert returncode == 0, output
    assert "stopped by SIGTERM at step" in output and "saved checkpoint" in output, output
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, save_every=1)
    try:
        step = checkpointer.latest_step()
        assert step is not None and 1 <= step < 100000
        assert f"stopped by SIGTERM at step {step};" in output
    finally:
        checkpointer.close()


@pytest.mark.slow
def test_sigterm_during_start_up_exits_0_having_saved_nothing(tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "eval.train", "--config", "configs/lm_tiny.py:smoke", "--workdir", str(workdir)]
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    time.sleep(1.0)  # the guard is installed before absl and JAX load: a signal now only sets its flag
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    assert b"stopped before the first step; nothing to save" in output
    assert not os.path.isdir(workdir / "checkpoints") or not os.listdir(workdir / "checkpoints")
