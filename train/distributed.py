"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from `config.distributed`.

Call `initialize(config.distributed)` before anything touches a JAX device: afterwards `jax.devices()`
lists every process's devices and the mesh spans them. Each process runs the same command; with
coordinator address, process count and id left None, JAX auto-detects them (TPU pods, SLURM, Kubernetes).
On CPU, cross-process collectives use gloo (JAX's default CPU implementation; set explicitly here so an
environment that changed it does not silently break multi-process CPU runs).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

_log = logging.getLogger(__name__)


def initialize(distributed: Mapping[str, Any]) -> bool:
    """Initializes the JAX distributed runtime when `distributed["initialize"]` is true.

    Args:
      distributed: config.distributed with fields initialize (bool), coordinator_address ("host:port" or
        None), num_processes (int or None), process_id (int or None).

    Returns:
      True if this call initialized the runtime; False when not configured or already initialized.
    """
    if not distributed["initialize"]:
        return False
    if jax.distributed.is_initialized():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=distributed["coordinator_address"],
        num_processes=distributed["num_processes"],
        process_id=distributed["process_id"],
    )
    _log.info(
        "jax.distributed initialized: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def coordination_client() -> Any:
    """The JAX distributed runtime's client (key-value store, barriers), or None when `jax.distributed` is not
    initialized."""
    from jax._src import distributed as jax_distributed  # the client has no public accessor

    return jax_distributed.global_state.client


class BarrierAborted(RuntimeError):
    """A barrier of an `AbortableBarrier` gave up because some process aborted it.

    Attributes:
      process: the index of the process that aborted (the lowest one, if several did).
      reason: its abort message (also the exception's message).
    """

    def __init__(self, reason: str, process: int) -> None:
        super().__init__(reason)
        self.reason, self.process = reason, process


class AbortableBarrier:
    """Barriers across all processes, built on the coordination service's key-value store, that any process can
    abort: every process waiting at one (now or later) then raises `BarrierAborted` at once instead of waiting
    for a process that will never arrive.

    The call signature is orbax's `BarrierSyncFn` (`barrier(key=..., timeout_ms=...)`), so it can replace the
    barriers of orbax's background save threads (`AsyncOptions.barrier_sync_fn`). A barrier entered from a
    background thread while an exception propagates (orbax's save-finalize thread reaches its barrier in a
    `finally` after this process's write failed) aborts with `describe(exception)` before waiting.

    Every process calls the same keys in the same order; a key may be reused (each use is one generation).

    Args:
      namespace: key-value-store prefix, the same on every process and unique to this set of barriers.
      describe: the abort message for an exception raised on this process (default: its first line).
      poll_s: seconds between looks at the store while waiting.
    """

    def __init__(
        self, namespace: str, *, describe: Callable[[BaseException], str] | None = None, poll_s: float = 0.02
    ) -> None:
        if not namespace or namespace.endswith("/"):
            raise ValueError(f"namespace={namespace!r}; expected a non-empty key prefix not ending in '/'")
        if poll_s <= 0:
            raise ValueError(f"poll_s={poll_s} must be > 0 (seconds between looks at the key-value store)")
        client = coordination_client()
        if client is None:
            raise RuntimeError("AbortableBarrier needs jax.distributed.initialize() first")
        self._client = client
        self._namespace = namespace
        self._describe = describe or (lambda error: str(error).strip().splitlines()[0] if str(error).strip() else "")
        self._poll_s = float(poll_s)
        self._generations: dict[str, int] = {}
        self._lock = threading.Lock()

    def abort(self, message: str) -> None:
        """Aborts every barrier of this namespace, present and future, on every process, with `message`."""
        self._client.key_value_set(f"{self._namespace}/aborted/{jax.process_index()}", message, allow_overwrite=True)

    def aborted(self) -> tuple[int, str] | None:
        """(process index, message) of the lowest-numbered process that aborted, or None; one look at the store."""
        entries = self._client.key_value_dir_get(f"{self._namespace}/aborted/")
        if not entries:
            return None
        process, message = min((int(key.rsplit("/", 1)[-1]), value) for key, value in entries)
        return process, message

    def __call__(self, *, key: str, timeout_ms: int) -> None:
        """Waits until every process reached barrier `key`.

        Raises:
          BarrierAborted: a process aborted (before or while this one waits).
          TimeoutError: not every process arrived within `timeout_ms` milliseconds.
        """
        in_flight = sys.exc_info()[1]
        if in_flight is not None and threading.current_thread() is not threading.main_thread():
            if not isinstance(in_flight, BarrierAborted):
                self.abort(self._describe(in_flight))
        with self._lock:
            generation = self._generations.get(key, 0)
            self._generations[key] = generation + 1
        name = f"{self._namespace}/barrier/{key}/{generation}"
        self._raise_if_aborted()
        arrived = self._client.key_value_increment(name, 1)
        deadline = time.monotonic() + timeout_ms / 1000
        while arrived < jax.process_count():
            self._raise_if_aborted()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{arrived} of {jax.process_count()} processes reached barrier {key!r} in {timeout_ms / 1000:g}s"
                )
            time.sleep(self._poll_s)
            arrived = self._client.key_value_increment(name, 0)
        if generation:  # every process has left the previous generation's wait: its counter is no longer read
            self._client.key_value_delete(f"{self._namespace}/barrier/{key}/{generation - 1}")

    def _raise_if_aborted(self) -> None:
        aborted = self.aborted()
        if aborted is not None:
            raise BarrierAborted(aborted[1], aborted[0])
