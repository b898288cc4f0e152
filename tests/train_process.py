"""Running a training command as a real process in tests: start it, send SIGTERM once training is under way."""

import signal
import subprocess
import time

REPO = __file__.rsplit("/tests/", 1)[0]


def sigterm_after_first_step(command: list[str], env: dict, *, start_timeout: float = 240) -> tuple[int, str]:
    """Runs `command` from the repository root, sends SIGTERM when its first "step " progress line appears, and
    returns (exit code, everything it printed). Fails the calling test if no progress line comes within
    `start_timeout` seconds, or if the process has not exited 120 s after the signal."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + start_timeout
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step "):  # training is under way
                process.send_signal(signal.SIGTERM)
                break
            assert time.monotonic() < deadline, "no progress line:\n" + "".join(lines)
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, "".join(lines) + rest
