"""`python -m train` as real processes: SIGTERM saves and exits 0; two CPU processes train together."""

import os
import socket
import subprocess
import sys
import threading

import pytest

from configs import lm_tiny
from tests.train_process import REPO, sigterm_after_first_step
from train import trainer
from train.checkpointing import Checkpointer

SMOKE = "configs/lm_tiny.py:smoke"


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train_command(workdir, *overrides, config=SMOKE):
    return [sys.executable, "-m", "train", "--config", config, "--workdir", str(workdir), *overrides]


def test_sigterm_saves_a_restorable_checkpoint_and_exits_0(tmp_path):
    workdir = tmp_path / "run"
    returncode, output = sigterm_after_first_step(
        _train_command(
            workdir,
            "--config.total_steps=100000",  # far more than the test waits for
            "--config.log_every=1",
            "--config.eval_every=0",
            "--config.checkpoint_every=50000",
        ),
        _env(8),
    )
    assert returncode == 0, output
    assert "SIGTERM" in output and "saved checkpoint" in output, output

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, save_every=1)
    try:
        step = checkpointer.latest_step()
        assert step is not None and 1 <= step < 100000
        assert str(os.path.join(workdir, "checkpoints", str(step))) in output
        s = trainer.setup(lm_tiny.get_config("smoke"), str(workdir))
        layout = trainer.layout_state(s)
        state, data_state, _, _ = checkpointer.restore(step, abstract_state=layout.abstract_state)
        assert int(state.step) == step and data_state["step"] == step
    finally:
        checkpointer.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(
    workdir, *overrides, config: str = SMOKE, processes: int = 2, devices: int = 4, timeout: float = 300
) -> list[str]:
    """Launches `python -m train --config <config>` as `processes` CPU processes of `devices` fake devices each,
    joined by `jax.distributed` on a free localhost port, with `overrides`; returns their outputs once all exited
    (asserting each exited 0)."""
    port = _free_port()
    launched = [
        subprocess.Popen(
            _train_command(
                workdir,
                *overrides,
                "--config.distributed.initialize=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={processes}",
                f"--config.distributed.process_id={index}",
                config=config,
            ),
            cwd=REPO,
            env=_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(processes)
    ]
    outputs = [""] * processes

    def drain(i):
        outputs[i], _ = launched[i].communicate(timeout=timeout)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout + 20)
    for process in launched:
        if process.poll() is None:
            process.kill()
    for i, process in enumerate(launched):
        assert process.returncode == 0, f"process {i}:\n{outputs[i]}"
    return outputs


@pytest.mark.slow
def test_two_cpu_processes_train_together(tmp_path):
    workdir = tmp_path / "run"
    outputs = run_processes(workdir, devices=4)  # 2 processes x 4 devices = the usual 8-device mesh
    # Only process 0 prints progress and writes metrics; both took part in the checkpoint.
    assert "step 6/6" in outputs[0] and "step 6/6" not in outputs[1]
    assert "mesh {'data': 8}" in outputs[0]
    assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, save_every=3)
    try:
        assert checkpointer.all_steps() == [3, 6]
    finally:
        checkpointer.close()
