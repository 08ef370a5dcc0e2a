"""Multi-process runs on localhost: which run the flags and environment ask for, two processes of two
CPU devices each joined by `jax.distributed` (gloo collectives), and a lost process named in one line
by the others, which stop. Every child is killed at the end; ports are chosen free."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest
from helpers import drop_gloo, free_port, subprocess_env

from conftest import REPO
from jaxinterp import distributed
from jaxinterp.errors import UsageError

CHILD = r"""
import json, os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
from jaxinterp import distributed
s = distributed.Settings(coordinator=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]), heartbeat_s=5)
idx, n = distributed.initialize(s)
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
g = multihost_utils.process_allgather(jnp.asarray([idx * 10.0 + 1.0]))
print(json.dumps({"index": idx, "count": n, "devices": jax.device_count(), "local": jax.local_device_count(),
                  "primary": distributed.is_primary(), "gathered": np.asarray(g).ravel().tolist()}), flush=True)
if sys.argv[3] == "wait":
    while True:
        multihost_utils.sync_global_devices("step")
        time.sleep(0.2)
"""


def _spawn(port: int, pid: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, f"127.0.0.1:{port}", str(pid), mode], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_run_asked_for_by_flags_or_environment():
    ap = argparse.ArgumentParser()
    distributed.add_arguments(ap)
    assert distributed.requested(ap.parse_args([]), environ={}) is None
    s = distributed.requested(ap.parse_args(["--coordinator", "10.0.0.2:8476", "--num-processes", "4",
                                             "--process-id", "3"]), environ={})
    assert (s.coordinator, s.num_processes, s.process_id, s.auto) == ("10.0.0.2:8476", 4, 3, False)
    env = {"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.requested(ap.parse_args([]), environ=env).process_id == 1
    assert distributed.requested(ap.parse_args(["--process-id", "0"]), environ=env).process_id == 0  # flags win
    assert distributed.requested(ap.parse_args(["--distributed", "auto"]), environ={}).auto
    with pytest.raises(UsageError, match="needs --coordinator"):
        distributed.requested(ap.parse_args(["--num-processes", "2"]), environ={})
    with pytest.raises(UsageError, match="ids are 0 .. 1"):
        distributed.Settings(coordinator="h:1", num_processes=2, process_id=2)
    with pytest.raises(UsageError, match="HOST:PORT"):
        distributed.Settings(coordinator="h", num_processes=2, process_id=0)
    with pytest.raises(UsageError, match="whole numbers"):
        distributed.requested(None, environ={"JAX_NUM_PROCESSES": "two"})
    assert distributed.initialize(None) == (0, 1)


def test_two_processes_of_two_devices_join_and_gather(children):
    port = free_port()
    children += [_spawn(port, 0, "exit"), _spawn(port, 1, "exit")]
    outs = []
    for p in children:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(next(ln for ln in drop_gloo(out).splitlines() if ln.startswith("{"))))
    assert [o["index"] for o in outs] == [0, 1] and [o["primary"] for o in outs] == [True, False]
    for o in outs:
        assert (o["count"], o["devices"], o["local"]) == (2, 4, 2)
        assert o["gathered"] == [1.0, 11.0]


@pytest.mark.slow  # slow: tests/test_pod.py kills a training process in the default run
def test_a_lost_process_stops_the_others_with_a_line_naming_it(children):
    port = free_port()
    children += [_spawn(port, 0, "wait"), _spawn(port, 1, "wait")]
    for p in children:  # both joined and past their first collective (gloo logs its own lines first)
        line = ""
        while not line.startswith("{") and p.poll() is None:
            line = p.stdout.readline()
        assert line.startswith("{"), p.stderr.read()[-2000:]
    children[1].kill()
    t0 = time.monotonic()
    _, err = children[0].communicate(timeout=90)
    waited = time.monotonic() - t0
    assert children[0].returncode == distributed.LOST_EXIT and waited < 60
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line and "process 1 of 2" in line[0] and "--resume" in line[0]
