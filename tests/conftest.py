"""Test setup: 8 fake CPU devices, so sharding is tested on a laptop.

Strict dtype promotion is switched on per test (`strict_promotion` fixture) for the library's own
numerics, not globally: optax's Adam raises a float to an int32 step count, which strict mode rejects.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo_root() -> str:
    return REPO


@pytest.fixture
def strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture
def children():
    """Subprocesses a test starts (append them): any still running at the end are killed."""
    procs: list = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


ISOLATION_ENV = "JAXINTERP_IN_ISOLATION"


def pytest_collection_modifyitems(config, items):
    """Modules marked `isolated` (the serving engine and server: threads running JAX beside the
    test's own compiles) run in a pytest process of their own, started by tests/test_isolated.py:
    in the long default run, a later unrelated compile crashed inside XLA after them."""
    if os.environ.get(ISOLATION_ENV) == "1":
        return
    skip = pytest.mark.skip(reason="runs in its own process (tests/test_isolated.py)")
    for item in items:
        if item.get_closest_marker("isolated") is not None:
            item.add_marker(skip)
