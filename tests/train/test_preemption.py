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
