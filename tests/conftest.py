"""Test setup: 8 fake CPU devices, float32 matmul precision, and device-kind markers."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu") if not os.environ.get("ATTN_TEST_ACCELERATOR") else None

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _platform() -> str:
    return jax.devices()[0].platform


def pytest_collection_modifyitems(config, items):
    platform = _platform()
    skip_gpu = pytest.mark.skip(reason="needs a GPU (run with ATTN_TEST_ACCELERATOR=1 on a GPU machine)")
    skip_tpu = pytest.mark.skip(reason="needs a TPU (run with ATTN_TEST_ACCELERATOR=1 on a TPU machine)")
    for item in items:
        if "gpu" in item.keywords and platform != "gpu":
            item.add_marker(skip_gpu)
        if "tpu" in item.keywords and platform != "tpu":
            item.add_marker(skip_tpu)
