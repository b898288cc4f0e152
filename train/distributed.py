"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from `config.distributed`.

Call `initialize(config.distributed)` before anything touches a JAX device: afterwards `jax.devices()`
lists every process's devices and the mesh spans them. Each process runs the same command; with
coordinator address, process count and id left None, JAX auto-detects them (TPU pods, SLURM, Kubernetes).
On CPU, cross-process collectives use gloo (JAX's default CPU implementation; set explicitly here so an
environment that changed it does not silently break multi-process CPU runs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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
