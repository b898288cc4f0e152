"""Graceful stop on SIGTERM (preemption, ``kill``) and optionally SIGINT (Ctrl-C).

Inside ``with PreemptionGuard() as guard:`` the signals only set a flag; the training loop polls
``guard.should_stop`` once per step, saves a checkpoint and returns. The previous handlers come back
when the block exits. A second SIGINT raises ``KeyboardInterrupt`` as usual, so Ctrl-C twice still
kills a stuck run.

With several processes, a signal usually reaches only some of them (or reaches them at different
steps); ``should_stop`` then is a collective that ORs the flag over all processes, so they all stop
after the same step and write the same checkpoint. Every process must read it at the same point of
the loop.

This module does not import JAX, so `python -m train` installs the guard before anything slow starts: a
SIGTERM during start-up, setup or compilation also just sets the flag.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

_log = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager that turns SIGTERM (and SIGINT if ``handle_sigint``) into a stop request.

    Args:
      handle_sigint: also catch the first Ctrl-C (the second one still raises KeyboardInterrupt).

    Attributes:
      signal_received: name of the first signal caught ("SIGTERM", "SIGINT"), or None.
    """

    def __init__(self, *, handle_sigint: bool = False) -> None:
        self.handle_sigint = bool(handle_sigint)
        self.signal_received: str | None = None
        self._requested = threading.Event()
        self._previous: dict[int, Any] = {}
        self._sigint_count = 0

    @property
    def requested(self) -> bool:
        """Whether this process caught a signal (local, no communication)."""
        return self._requested.is_set()

    @property
    def should_stop(self) -> bool:
        """Whether the run should stop now: any process caught a signal.

        With more than one process this is a collective (all-gather of one flag): call it on every
        process at the same step.
        """
        local = self._requested.is_set()
        jax = sys.modules.get("jax")  # not imported here: the guard is installed before JAX loads
        if jax is None or jax.process_count() == 1:
            return local
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([local], dtype=np.bool_))
        return bool(np.any(flags))

    def request_stop(self, reason: str = "request_stop") -> None:
        """Sets the flag as a signal would (for tests and for stopping from code)."""
        if self.signal_received is None:
            self.signal_received = reason
        self._requested.set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._sigint_count += 1
            if self._sigint_count > 1:
                raise KeyboardInterrupt
        _log.warning("caught %s: finishing this step, saving a checkpoint and stopping", name)
        self.request_stop(name)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread (Python signal rules)")
        signums = [signal.SIGTERM] + ([signal.SIGINT] if self.handle_sigint else [])
        for signum in signums:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            # getsignal returns None for handlers installed outside Python; SIG_DFL is the closest.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
