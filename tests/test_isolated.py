"""Test modules marked `isolated` (the serving engine and its HTTP server, whose threads run JAX
beside the tests' own compiles), each in a pytest process of its own, in the default run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import subprocess_env

from conftest import ISOLATION_ENV, REPO


@pytest.mark.parametrize("module", ["tests/test_engine.py", "tests/test_serve.py"])
def test_isolated_module_passes_in_its_own_process(module):
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module],
                         env=subprocess_env() | {ISOLATION_ENV: "1"}, capture_output=True, text=True, timeout=1200,
                         cwd=REPO)
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0 and " passed" in out.stdout and "failed" not in out.stdout, tail
