"""PreemptionGuard: a real SIGTERM sets the flag instead of killing the process; handlers come back."""

import os
import signal
import time

import pytest

from train.preemption import PreemptionGuard


def _wait_for(predicate, limit_s=10.0):
    # Python runs signal handlers between bytecodes of the main thread; give it a few chances.
    deadline = time.monotonic() + limit_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.001)
    return predicate()


def test_sigterm_sets_should_stop_and_process_survives():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: guard.should_stop)
        assert guard.signal_received == "SIGTERM"
        # A second SIGTERM while stopping is harmless too.
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: guard.requested)
    assert signal.getsignal(signal.SIGTERM) is before
    assert guard.should_stop  # The flag outlives the block, for the code that decides to exit.


def test_handlers_restored_after_exit_including_on_error():
    seen = []
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with PreemptionGuard(handle_sigint=True):
                assert signal.getsignal(signal.SIGINT) is not previous_int
                raise RuntimeError("boom")
        assert signal.getsignal(signal.SIGINT) is previous_int
        # The test's own handler is active again and receives the signal.
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: seen == [signal.SIGTERM])
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def test_sigint_first_flags_second_interrupts():
    with PreemptionGuard(handle_sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: guard.should_stop)
        assert guard.signal_received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False, limit_s=5.0)


def test_sigint_untouched_by_default():
    previous = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGINT) is previous
        guard.request_stop()
        assert guard.should_stop


# --- SIGTERM before the first step (setup, compilation, start-up of `python -m train`) -------------------------


def _sigterm_then(function):
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)

    return wrapped


def _assert_nothing_saved(workdir):
    checkpoints = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(checkpoints) or os.listdir(checkpoints) == []
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_sigterm_during_setup_stops_before_the_first_step(tmp_path, monkeypatch):
    from tests.train.tiny_run import tiny_config
    from train import trainer

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer, "layout_state", _sigterm_then(trainer.layout_state))
    result = trainer.run(tiny_config(), str(tmp_path))
    assert result.stopped_before_first_step and (result.start_step, result.step, result.checkpoint) == (0, 0, None)
    assert signal.getsignal(signal.SIGTERM) is before
    _assert_nothing_saved(str(tmp_path))


def test_sigterm_during_compilation_stops_before_the_first_step(tmp_path, monkeypatch):
    from tests.train.tiny_run import tiny_config
    from train import trainer

    monkeypatch.setattr(trainer, "make_train_step", _sigterm_then(trainer.make_train_step))
    result = trainer.run(tiny_config(), str(tmp_path))
    assert result.stopped_before_first_step and result.step == 0
    _assert_nothing_saved(str(tmp_path))


def _catches_sigterm(pid):
    """Whether process `pid` has a SIGTERM handler installed (Linux: the SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc to see the handler installed")
def test_command_line_sigterm_during_start_up_exits_0(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", "--config", "configs/lm_tiny.py:smoke", "--workdir", str(tmp_path)],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_for(lambda: proc.poll() is not None or _catches_sigterm(proc.pid), limit_s=60.0)
        proc.send_signal(signal.SIGTERM)  # JAX, the config and the data are still loading
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == "stopped before the first step; nothing to save", out
    _assert_nothing_saved(str(tmp_path))
