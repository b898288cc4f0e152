"""A real full disk, not an injected error: the workdir on a 320 KiB tmpfs fills at the first checkpoint of a tiny
run, and `python -m train` ends with one line and exits 1.

Known remaining noise (about 2 runs in 5 with 8 host devices): tensorstore writes still failing after the
checkpointer has closed orbax's event loop print bare `RuntimeError: Event loop is closed` tracebacks (from
tensorstore's C++ callbacks, not through sys.excepthook) before that line. The test allows those and nothing else.

Mounting needs root and a kernel that lets this process mount (CAP_SYS_ADMIN): elsewhere the test is skipped.
"""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRACEBACK_HEAD = "Traceback (most recent call last):"
# The lines of tensorstore's late callbacks into a closed asyncio loop (asyncio's file path varies).
CLOSED_LOOP_LINES = (TRACEBACK_HEAD, "self._check_closed()", "raise RuntimeError('Event loop is closed')")
CLOSED_LOOP_FRAMES = ("in call_soon_threadsafe", "in _check_closed")


def _closed_loop_noise(line: str) -> bool:
    """Whether `line` (stripped) belongs to a RuntimeError('Event loop is closed') traceback raised in asyncio."""
    if line in CLOSED_LOOP_LINES or line == "RuntimeError: Event loop is closed":
        return True
    return line.startswith('File "') and "asyncio" in line and line.endswith(CLOSED_LOOP_FRAMES)


@pytest.fixture
def small_disk(tmp_path):
    """A 320 KiB tmpfs mounted at tmp_path/disk (unmounted afterwards); skips where mounting is not allowed."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line(small_disk):
    args = ["--config", "configs/lm_tiny.py:smoke", "--workdir", str(small_disk / "run")]
    args += ["--config.model.num_layers=1", "--config.total_steps=8", "--config.checkpoint_every=2"]
    args += ["--config.eval_every=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    # The first checkpoint of the smoke model (parameters, optimizer state, data state) does not fit in 320 KiB.
    assert lines[-1] == "error: checkpoint 2 could not be written: no space left on device; no checkpoint is on disk"
    unexpected = [line for line in lines[:-1] if not _closed_loop_noise(line.strip())]
    assert not unexpected, proc.stderr[-3000:]
