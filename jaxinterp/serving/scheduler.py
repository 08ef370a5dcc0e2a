"""The scheduler: one thread owns the engine; requests arrive on a bounded queue, are prefilled one
at a time between decode steps, stream their tokens out as they are produced, and leave their slot
when they stop, run out of budget, hit a stop string or are cancelled.

Every engine call (prefill, insert, step, release, reading the monitors, rebuilding the engine for
a dictionary load) runs on the scheduler's thread: the decode state is donated to each step, so no
other thread may touch it. Other threads talk to it through `submit` (a `Job` whose events they
read), `cancel`, `call` (run a function between steps and get its result) and `shutdown` (stop
taking requests, finish the ones in flight).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from jaxinterp.errors import JaxinterpError
from jaxinterp.serving.engine import Engine, Request


class QueueFull(JaxinterpError):
    """The request queue is at its bound; the client should retry later (HTTP 429)."""


class ShuttingDown(JaxinterpError):
    """The server is draining and takes no new requests (HTTP 503)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's life. Its `events` queue receives ("token", dict) for every token, then one
    ("done", finish_reason) or ("error", message)."""

    request: Request
    stop_strings: tuple[str, ...] = ()
    tokenizer: object = None
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    tokens: list = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    slot: int | None = None
    steered: bool = False
    monitor: dict | None = None
    """The request's own statistics at the monitored sites (`Request.monitor`), at its end."""
    on_event: Callable | None = None
    """Called (from the scheduler's thread) after each event is queued: wakes an asyncio consumer."""

    def put(self, event: str, value) -> None:
        self.events.put((event, value))
        if self.on_event is not None:
            self.on_event()


class Scheduler:
    """Runs `engine` on a thread of its own (`start`)."""

    def __init__(self, engine: Engine, *, max_queue: int = 64, metrics=None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}
        self._calls: collections.deque[tuple[Callable, Future, bool]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ---------------------------------------------------------------- other threads

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="jaxinterp-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down; no new requests")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            job.steered = bool(job.request.steering)
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away): dropped from the queue, or its slot freed at the next step."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def call(self, fn: Callable, *, when_idle: bool = False) -> Future:
        """Run `fn()` on the scheduler's thread between steps (`when_idle`: once no request is in a
        slot, new ones waiting meanwhile); returns a future of its result."""
        fut: Future = Future()
        with self._cond:
            self._calls.append((fn, fut, when_idle))
            self._cond.notify()
        return fut

    def shutdown(self, timeout: float | None = None) -> None:
        """Take no more requests, finish the queued and running ones, stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def slots_in_use(self) -> int:
        return len(self._active)

    # ---------------------------------------------------------------- the scheduler's thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._active or self._calls or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._pending or self._active or self._calls):
                    return
                calls = [c for c in self._calls if not c[2] or not self._active]
                for c in calls:
                    self._calls.remove(c)
                idle_wanted = any(c[2] for c in self._calls)
                dropped = [j for j in self._pending if j.cancelled]
                for j in dropped:
                    self._pending.remove(j)
                job = None
                if self._pending and self.engine.free and not idle_wanted:
                    job = self._pending.popleft()
            for fn, fut, _ in calls:
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            for j in dropped:
                self._finish(j, "cancelled")
            for slot, j in list(self._active.items()):
                if j.cancelled:
                    self._release(slot, j, "cancelled")
            if job is not None:
                self._admit(job)
            if self._active:
                self._step()

    def _admit(self, job: Job) -> None:
        try:
            pre = self.engine.prefill(job.request)
            slot = self.engine.insert(pre)
        except JaxinterpError as e:
            job.finished = time.perf_counter()
            job.put("error", str(e))
            return
        job.slot = slot
        self._active[slot] = job
        top_i, top_v = np.asarray(pre.logprobs[1][1])[0], np.asarray(pre.logprobs[1][0])[0]
        reads = {s: (np.asarray(ids)[0].tolist(), np.asarray(v)[0].tolist()) for s, (v, ids) in pre.reads.items()}
        self._emit(slot, job, int(np.asarray(pre.first)[0]), float(np.asarray(pre.logprobs[0])[0]),
                   (top_i.tolist(), top_v.tolist()), reads, engine_finished=None,
                   aborted=bool(np.asarray(pre.aborted)[0]))

    def _step(self) -> None:
        t0 = time.perf_counter()
        out = self.engine.step()
        dt = time.perf_counter() - t0
        self.steps += 1
        if self.metrics is not None:
            self.metrics.observe_step(dt, n_active=len(self._active),
                                      steered=any(j.steered for j in self._active.values()))
        for slot, job in list(self._active.items()):
            if not out.emitted[slot]:
                continue
            reads = {s: (ids[slot].tolist(), vals[slot].tolist()) for s, (ids, vals) in out.reads.items()}
            self._emit(slot, job, int(out.tokens[slot]), float(out.logprob[slot]),
                       (out.top_logprobs[0][slot].tolist(), out.top_logprobs[1][slot].tolist()), reads,
                       engine_finished=bool(out.finished[slot]), aborted=bool(out.aborted[slot]))

    def _emit(self, slot: int, job: Job, token: int, logprob: float, top, reads, *, engine_finished,
              aborted: bool = False) -> None:
        """Hand one token to its job; end the job on a stop id, its budget, a stop string or a full cache."""
        now = time.perf_counter()
        if job.first_token is None:
            job.first_token = now
        r = job.request
        stop_ids = r.stop if r.stop is not None else self.engine._default_stop()
        is_stop = token in stop_ids or aborted  # an aborted row's token is the pad id, not text
        job.tokens.append(token)
        delta, hit = "", False
        if job.tokenizer is not None and not is_stop:
            text = job.tokenizer.decode([t for t in job.tokens if t not in stop_ids])
            if job.stop_strings:
                cut = min((text.find(s) for s in job.stop_strings if s and s in text), default=-1)
                if cut >= 0:
                    text, hit = text[:cut], True
            if not text.endswith("\ufffd") or hit:  # hold back a partial multi-byte character
                delta, job.text = text[len(job.text):], text
        job.put("token", {"id": token, "text": delta, "logprob": logprob, "top": top, "features": reads,
                          "stop": is_stop})
        if aborted:
            reason = "abort"
        elif is_stop or hit:
            reason = "stop"
        elif engine_finished is None:  # the prefill's token
            reason = "length" if r.max_new_tokens <= 1 else None
        elif engine_finished:
            reason = "length"
        else:
            reason = None
        if reason is not None:
            self._release(slot, job, reason)

    def _release(self, slot: int, job: Job, reason: str) -> None:
        if job.request.monitor and self.engine.config.monitor_sites:
            job.monitor = self.engine.request_monitor(slot)
        self.engine.release(slot)
        self._active.pop(slot, None)
        self._finish(job, reason)

    def _finish(self, job: Job, reason: str) -> None:
        job.finished = time.perf_counter()
        job.finish_reason = reason
        if self.metrics is not None and reason != "cancelled":
            self.metrics.observe_request(job)
        job.put("done", reason)
