"""Two CPU processes (`jax.distributed` on localhost): a checkpoint write that fails on ONE process stops BOTH
promptly, each exiting 1 with the same line naming the process whose write failed. Before, orbax's background
save threads waited at barriers for the failed process (20-minute timeout) and the run hung. (A run takes about
100 s on 2 busy cores, mostly start-up and compilation; the subprocess timeout of 300 s bounds the hang.)

The injected errors stand in for a full or read-only disk: the final rename of the step directory (done only by
process 0) or this process's array writes (each process writes its own shards)."""

import os
import socket
import subprocess
import sys
import threading

import pytest

from train.checkpointing import CheckpointSaveError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs `python -m train` after arranging for the save of step 2 to fail on process FAIL_ON with ENOSPC, at the
# place FAIL_AT names: "rename" (process 0's atomic rename of the finished step) or "write" (the process's writes).
_RUN = """
import errno, os, runpy, sys
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.path import atomicity
from train.checkpointing import Checkpointer

process_id = int([a for a in sys.argv if a.startswith("--config.distributed.process_id=")][0].split("=")[1])
fail_on, fail_at = int(os.environ["FAIL_ON"]), os.environ["FAIL_AT"]

async def disk_full_async(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

def disk_full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "a shard of the state")

original = Checkpointer.save
def save(self, step, **kwargs):
    if step == 2 and process_id == fail_on:
        if fail_at == "rename":
            atomicity.AtomicRenameTemporaryPath.finalize = disk_full_async
        else:
            future.ChainedFuture.result = disk_full
    return original(self, step, **kwargs)
Checkpointer.save = save
sys.argv = ["train"] + sys.argv[1:]
runpy.run_module("train", run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_processes(tmp_path, fail_on: int, fail_at: str) -> list[tuple[int | None, str]]:
    """(exit code, stderr) of both processes of a tiny run whose save of step 2 fails on process `fail_on`."""
    script = tmp_path / "failing_run.py"
    script.write_text(_RUN)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", FAIL_ON=str(fail_on), FAIL_AT=fail_at)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # the 8-device mesh of the other tests
    args = ["--config", "configs/lm_tiny.py:smoke", "--workdir", str(tmp_path / "run")]
    args += ["--config.model.num_layers=1", "--config.total_steps=8", "--config.checkpoint_every=2"]
    args += ["--config.eval_every=0", "--config.distributed.initialize=True"]
    args += [f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2"]
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), *args, f"--config.distributed.process_id={index}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    errors = [""] * 2

    def drain(i: int) -> None:
        try:
            _, errors[i] = processes[i].communicate(timeout=300)
        except subprocess.TimeoutExpired:
            processes[i].kill()
            _, errors[i] = processes[i].communicate()
            errors[i] += "\n[killed after 300 s]"

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [(process.returncode, error) for process, error in zip(processes, errors, strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize(("fail_on", "fail_at"), [(0, "rename"), (1, "write")])
def test_a_save_failing_on_one_process_stops_both_with_one_line(tmp_path, fail_on, fail_at):
    expected = (
        f"error: checkpoint 2 could not be written on process {fail_on}: no space left on device; "
        "no checkpoint is on disk"
    )
    for index, (code, stderr) in enumerate(_run_two_processes(tmp_path, fail_on, fail_at)):
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 1, f"process {index} exited {code}:\n{stderr[-3000:]}"
        assert lines and lines[-1] == expected, f"process {index}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, f"process {index}:\n{stderr[-3000:]}"


def test_the_line_names_the_process_only_with_several():
    several = CheckpointSaveError(4, "no space left on device", 2, process=1)
    assert str(several) == (
        "checkpoint 4 could not be written on process 1: no space left on device; the last checkpoint on disk is 2"
    )
    assert str(CheckpointSaveError(4, "read-only file system", None)) == (
        "checkpoint 4 could not be written: read-only file system; no checkpoint is on disk"
    )
