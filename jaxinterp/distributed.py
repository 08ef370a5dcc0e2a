"""Multi-process runs on `jax.distributed`: which run is asked for, and starting it.

A run is multi-process when the command line (`--coordinator HOST:PORT --num-processes N
--process-id I`, or `--distributed auto` where JAX detects the cluster: Cloud TPU, GKE, Slurm, Open
MPI, Kubernetes) or the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`) says so; otherwise nothing is started and the run is the single-process one it
always was. `initialize` must come before any other JAX call of the process.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import sys
import threading
import time

from jaxinterp.errors import UsageError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Settings:
    """A multi-process run: `auto` (JAX finds the cluster) or the three explicit fields."""

    auto: bool = False
    coordinator: str | None = None
    """HOST:PORT of process 0's coordination service."""
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_s: int = 100
    """A process silent this long counts as lost (the others then exit)."""
    initialization_timeout_s: int = 300

    def __post_init__(self):
        if self.auto:
            return
        if self.coordinator is None or self.num_processes is None or self.process_id is None:
            raise UsageError("a multi-process run needs --coordinator HOST:PORT, --num-processes N and --process-id I "
                             "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed auto "
                             "on a cluster JAX detects")
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", self.coordinator):
            raise UsageError(f"--coordinator {self.coordinator!r}: give HOST:PORT, e.g. 10.0.0.2:8476 (process 0's host)")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise UsageError(f"--process-id {self.process_id} with --num-processes {self.num_processes}: ids are "
                             f"0 .. {self.num_processes - 1}, one per process, 0 on the coordinator's host")
        if self.heartbeat_s < 1 or self.initialization_timeout_s < 1:
            raise UsageError("heartbeat and initialization timeouts are whole seconds >= 1")


def add_arguments(ap) -> None:
    """The multi-process flags of the launch scripts."""
    g = ap.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--distributed", choices=("auto",), help="auto: let JAX detect the cluster (TPU VM, GKE, Slurm, ...)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0 (explicit multi-process run)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument("--heartbeat-seconds", type=int, default=100, help="a silent process counts as lost after this")


def requested(args=None, environ=None) -> Settings | None:
    """The multi-process run the parsed `args` (see `add_arguments`) or the environment ask for, or
    None for a single-process run. Flags win over the environment."""
    env = os.environ if environ is None else environ
    get = lambda name: getattr(args, name, None) if args is not None else None  # noqa: E731
    heartbeat = get("heartbeat_seconds") or 100
    if get("distributed") == "auto":
        return Settings(auto=True, heartbeat_s=heartbeat)
    coordinator = get("coordinator") or env.get("JAX_COORDINATOR_ADDRESS")
    n, pid = get("num_processes"), get("process_id")
    try:
        n = n if n is not None else (int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None)
        pid = pid if pid is not None else (int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None)
    except ValueError:
        raise UsageError(f"JAX_NUM_PROCESSES={env.get('JAX_NUM_PROCESSES')!r}, JAX_PROCESS_ID="
                         f"{env.get('JAX_PROCESS_ID')!r}: give whole numbers") from None
    if coordinator is None and n is None and pid is None:
        return None
    return Settings(coordinator=coordinator, num_processes=n, process_id=pid, heartbeat_s=heartbeat)


def initialize(settings: Settings | None) -> tuple[int, int]:
    """Start `jax.distributed` for `settings` (nothing for None); returns (process index, count)."""
    import jax

    if settings is None:
        return 0, 1
    # JAX's own heartbeat aborts the process (a C++ abort with a stack dump); the watchdog below
    # notices a lost process first and says so in one line, so JAX's is set well after it. When
    # process 0 itself is lost, the coordination service goes with it and JAX ends the others at
    # once with its own line ("... the JAX distributed service detected fatal errors. This most
    # likely indicates that another task died"), status 134.
    kw = dict(heartbeat_timeout_seconds=3 * settings.heartbeat_s, initialization_timeout=settings.initialization_timeout_s)
    if settings.auto:
        jax.distributed.initialize(**kw)
    else:
        jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id, **kw)
    if jax.process_count() > 1:
        start_watchdog(lost_after_s=settings.heartbeat_s)
    return jax.process_index(), jax.process_count()


LOST_EXIT = 3
"""Exit status of a process that stops because another was lost."""
FAILED = "failed: "


@dataclasses.dataclass(frozen=True)
class _Watch:
    lost_after_s: float
    every_s: float
    failed: object


_watch: _Watch | None = None
"""The running watchdog of this process, if any."""


def watching() -> bool:
    """Whether this process runs the watchdog of a multi-process run."""
    return _watch is not None


def exit_after_failure(message: str, status: int, *, settle: bool = False, before=None) -> None:
    """In a multi-process run, end this process with `status` after telling the others that it
    stops with an error (`message`, one line), so that they stop too instead of waiting for it in a
    collective; it does not wait for them at JAX's shutdown barrier. With `settle`, first give the
    watchdog time to name a lost process: an error raised by a collective whose peer died is that
    peer's loss, not this process's failure; `before` (say, printing the traceback) runs after
    that. Returns at once in a single-process run."""
    if _watch is None:
        return
    if settle:
        time.sleep(_watch.lost_after_s + 2 * _watch.every_s)  # the watchdog exits the process meanwhile
    if before is not None:
        before()
    _watch.failed(message)
    import jax

    if jax.process_index() == 0:  # its exit takes the coordination service down: let the others read it first
        time.sleep(2 * _watch.every_s + 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def start_watchdog(*, lost_after_s: float, every_s: float | None = None) -> threading.Thread:
    """A daemon thread that beats for this process in the coordination service's key-value store and
    watches every other process's beat: when one has not changed for `lost_after_s` seconds (by this
    host's clock), or the coordinator cannot be reached, it prints one line naming the lost process
    and ends this process with status `LOST_EXIT` (a collective waiting on the lost process would
    otherwise hang or abort)."""
    import jax
    from jax._src import distributed as jd

    client, me, n = jd.global_state.client, jax.process_index(), jax.process_count()
    every = every_s if every_s is not None else max(0.5, lost_after_s / 5)

    def stop(line: str) -> None:
        print(f"error: {line}; this process (id {me}) stops too. Restart every process, with --resume to "
              "continue from the last checkpoint", file=sys.stderr, flush=True)
        os._exit(LOST_EXIT)

    stopping = threading.Event()

    def finished() -> None:  # this process is exiting: tell the others it is done, not lost
        if stopping.is_set():  # it said it failed (`exit_after_failure`)
            return
        stopping.set()
        try:
            client.key_value_set(f"jaxinterp/alive/{me}", "done", allow_overwrite=True)
        except Exception:
            pass

    def failed(message: str) -> None:
        stopping.set()
        try:
            client.key_value_set(f"jaxinterp/alive/{me}", FAILED + message, allow_overwrite=True)
        except Exception:
            pass

    global _watch
    _watch = _Watch(lost_after_s=lost_after_s, every_s=every, failed=failed)
    atexit.register(finished)  # runs before jax.distributed's own shutdown (registered earlier)

    def run() -> None:
        beat, seen = 0, {p: (None, time.monotonic()) for p in range(n) if p != me}
        while True:  # also while exiting: a process killed meanwhile still has to be named
            now = time.monotonic()
            try:
                if not stopping.is_set():  # a process on its way out has said so ("done" or its error)
                    beat += 1
                    client.key_value_set(f"jaxinterp/alive/{me}", str(beat), allow_overwrite=True)
                for p, (last, at) in list(seen.items()):
                    try:
                        v = client.key_value_try_get(f"jaxinterp/alive/{p}")
                    except Exception:  # not written yet
                        v = None
                    if v == "done":
                        del seen[p]
                    elif v is not None and v.startswith(FAILED):
                        stop(f"process {p} of {n} stopped with an error: {v[len(FAILED):]}")
                    elif v is not None and v != last:
                        seen[p] = (v, now)
                    elif now - at > lost_after_s:
                        stop(f"process {p} of {n} sent no heartbeat for {now - at:.0f} s (lost: crashed, killed or "
                             "preempted)")
            except Exception as e:  # the coordination service itself is gone
                if stopping.is_set():  # shut down as this process exits
                    return
                if me != 0:
                    stop(f"lost the coordinator, process 0 of {n} ({type(e).__name__})")
                raise
            time.sleep(every)

    t = threading.Thread(target=run, name="jaxinterp-watchdog", daemon=True)
    t.start()
    return t


def is_primary() -> bool:
    """Process 0: the one that writes the run's files and shows progress."""
    import jax

    return jax.process_index() == 0


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def local_rows(batch_sharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """The rows [lo, hi) of a global batch of `global_shape` that this process's devices hold under
    `batch_sharding` (the whole batch when the data axis lies within one process)."""
    n = global_shape[0]
    spans = {(s[0].start or 0, n if s[0].stop is None else s[0].stop)
             for s in batch_sharding.addressable_devices_indices_map(global_shape).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = sorted(spans)
    if any(b < a2 for (_, b), (a2, _) in zip(covered, covered[1:])):
        raise UsageError(f"this process's devices hold rows {covered} of the batch, not one contiguous block; "
                         "order the devices process by process along mesh.data")
    return lo, hi


def global_batch(local, batch_sharding, global_shape: tuple[int, ...]):
    """The global batch array from this process's rows (`local_rows`); a single-process run puts the
    whole batch on its devices."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(local, batch_sharding)
    return jax.make_array_from_process_local_data(batch_sharding, local, global_shape)


def host_array(x):
    """A NumPy copy of the whole of `x` on every process: an array spread over other processes'
    devices is gathered (a collective: every process must call this)."""
    import jax
    import numpy as np

    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_tree(tree):
    """`host_array` over every leaf of a pytree."""
    import jax

    return jax.tree.map(host_array, tree)


_gathers = 0


def allgather_json(value, *, timeout_s: int = 86400) -> list:
    """Every process's `value` (JSON-able), in process order; a single-process run gets [value].
    Every process must call this the same number of times."""
    import json

    import jax

    global _gathers
    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed as jd

    client, _gathers = jd.global_state.client, _gathers + 1
    key = f"jaxinterp/gather/{_gathers}"
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    return [json.loads(client.blocking_key_value_get(f"{key}/{p}", timeout_s * 1000))
            for p in range(jax.process_count())]


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (nothing in a single-process run)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
