"""One run per workdir: a second run on a locked workdir stops with one line naming the holder's PID and host."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.train.tiny_run import tiny_config
from train import trainer
from train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLocked, lock_workdir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_second_lock_names_the_holder_and_release_frees_it(tmp_path):
    first = WorkdirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(WorkdirLocked) as info:
            WorkdirLock(tmp_path).acquire()
        message = str(info.value)
        assert (
            f"workdir {tmp_path} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}," in message
        )
        assert "\n" not in message
    finally:
        first.release()
    with WorkdirLock(tmp_path) as again:  # free once released
        assert again.held


def test_lock_of_a_killed_process_is_free(tmp_path):
    """The lock lives as long as the holder process: a leftover lock file from a killed run blocks nothing."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from train.workdir_lock import WorkdirLock; "
            "lock = WorkdirLock(sys.argv[1]); lock.acquire(); print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLocked, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            lock_workdir(tmp_path, process_index=0, process_count=1)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert os.path.exists(tmp_path / LOCK_FILE)
    lock = lock_workdir(tmp_path, process_index=0, process_count=1)
    assert lock.held
    lock.release()
    assert lock_workdir(tmp_path, process_index=1, process_count=1) is None  # only process 0 locks


def test_trainer_refuses_a_locked_workdir_before_writing_anything(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
            trainer.run(tiny_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]  # no checkpoints, no metrics


def test_command_line_prints_one_line(tmp_path):
    with WorkdirLock(tmp_path):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "train", "--config", "configs/lm_tiny.py:smoke", "--workdir", str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: workdir {tmp_path} is in use by another run (pid {os.getpid()} on host ")
    assert time.monotonic() - started < 240
