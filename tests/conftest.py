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


@pytest.fixture(autouse=True, scope="module")
def _bounded_compilation_caches():
    """Drops JAX's compiled executables after each test module: a worker runs over a thousand tests, and their
    caches only grow otherwise (a worker of the 2-core CI rehearsal aborted inside XLA late in the run)."""
    yield
    jax.clear_caches()


def _platform() -> str:
    return jax.devices()[0].platform


_SLOW_LIST = os.path.join(os.path.dirname(__file__), "slow_in_default_run.txt")


def _measured_slow() -> frozenset[str]:
    """Node ids listed in tests/slow_in_default_run.txt (measured long tests that run with the slow ones); a line
    that is a test file's path stands for every test of that file."""
    with open(_SLOW_LIST, encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip() and not line.startswith("#"))


def _uses_own_module_fixture(item) -> bool:
    """Whether `item` uses a module-scoped fixture defined in its own test module (typically a trained model). Such
    tests form one xdist group (pyproject's `--dist loadgroup`), so one worker builds the fixture instead of each."""
    module = item.nodeid.split("::")[0]
    definitions = getattr(item, "_fixtureinfo", None)
    if definitions is None:
        return False
    for name in item.fixturenames:
        for fixturedef in definitions.name2fixturedefs.get(name, ()):
            if fixturedef.scope == "module" and fixturedef.baseid == module:
                return True
    return False


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects by marker
def pytest_collection_modifyitems(config, items):
    measured_slow = _measured_slow()
    for item in items:
        if item.nodeid in measured_slow or item.nodeid.split("::")[0] in measured_slow:
            item.add_marker(pytest.mark.slow)
    for item in items:
        if _uses_own_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    platform = _platform()
    skip_gpu = pytest.mark.skip(reason="needs a GPU (run with ATTN_TEST_ACCELERATOR=1 on a GPU machine)")
    skip_tpu = pytest.mark.skip(reason="needs a TPU (run with ATTN_TEST_ACCELERATOR=1 on a TPU machine)")
    for item in items:
        if "gpu" in item.keywords and platform != "gpu":
            item.add_marker(skip_gpu)
        if "tpu" in item.keywords and platform != "tpu":
            item.add_marker(skip_tpu)
