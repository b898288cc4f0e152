"""The machine a measurement ran on, recorded the same way in every JSON that eval/ writes.

`machine_record()` gives the keys the benchmark reports share (eval.claims and the README read them): platform,
device, device_count, jax/jaxlib/python versions, host architecture, creation time and CPU count. `load_average()`
is sampled before and after a run, because other processes competing for the host skew its timings.
"""

from __future__ import annotations

import datetime
import os
import platform as py_platform
from typing import Any

import jax


def load_average() -> list[float] | None:
    """1, 5 and 15 minute host load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def machine_record() -> dict[str, Any]:
    """{"platform" ("cpu", "gpu", "tpu"), "device" (device_kind of JAX's first device, e.g. "cpu" or
    "NVIDIA H100 80GB HBM3"), "device_count", "jax_version", "jaxlib_version", "python", "host", "created" (UTC,
    ISO 8601), "cpu_count"}."""
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib_version(),
        "python": py_platform.python_version(),
        "host": py_platform.machine(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
    }
