"""Prometheus metrics of the server, beside the drift monitor's (`monitor.metrics.MetricsExporter`,
whose registry they share):

    histograms jaxinterp_serve_time_to_first_token_seconds
               jaxinterp_serve_time_per_output_token_seconds   (after the first, per request)
               jaxinterp_serve_request_latency_seconds
               jaxinterp_serve_step_seconds{steered}           one decode step of every slot, by whether
                                                                any slot in it was steered
    counters   jaxinterp_serve_requests_total{finish_reason}
               jaxinterp_serve_output_tokens_total
    gauges     jaxinterp_serve_slots_in_use, jaxinterp_serve_queue_length,
               jaxinterp_serve_tokens_per_second               (output tokens over the last 10 s)
               jaxinterp_serve_steering_overhead_ratio         mean steered step / mean unsteered step - 1
    + the monitor's per-site drift KL, dead-feature ratio, shifted features (`observe_report`)
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import Counter, Gauge, Histogram

from jaxinterp.monitor.metrics import PREFIX, MetricsExporter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServingMetrics(MetricsExporter):
    def __init__(self, scheduler_state=None):
        super().__init__()
        r, p = self.registry, f"{PREFIX}_serve"
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Seconds from arrival to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds", "Mean seconds per token after the first.",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.latency = Histogram(f"{p}_request_latency_seconds", "Seconds from arrival to the last token.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram(f"{p}_step_seconds", "Seconds of one decode step of every slot.", ["steered"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.requests = Counter(f"{p}_requests", "Finished requests.", ["finish_reason"], registry=r)
        self.output_tokens = Counter(f"{p}_output_tokens", "Tokens generated.", registry=r)
        self.slots = Gauge(f"{p}_slots_in_use", "Decode slots holding a request.", registry=r)
        self.queue = Gauge(f"{p}_queue_length", "Requests waiting for a slot.", registry=r)
        self.tps = Gauge(f"{p}_tokens_per_second", "Output tokens per second over the last 10 seconds.", registry=r)
        self.overhead = Gauge(f"{p}_steering_overhead_ratio",
                              "Mean decode step with steering over mean step without, minus one.", registry=r)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._sums = {True: [0.0, 0], False: [0.0, 0]}
        self._mu = threading.Lock()
        if scheduler_state is not None:
            self.slots.set_function(lambda: scheduler_state().slots_in_use)
            self.queue.set_function(lambda: scheduler_state().queue_length)
        self.tps.set_function(self._tokens_per_second)

    def observe_step(self, seconds: float, *, n_active: int, steered: bool) -> None:
        self.step_seconds.labels(steered=str(steered).lower()).observe(seconds)
        self.output_tokens.inc(n_active)
        self.observe_generation(n_active)
        with self._mu:
            s = self._sums[steered]
            s[0] += seconds
            s[1] += 1
            self._recent.append((time.monotonic(), n_active))
            on, off = self._sums[True], self._sums[False]
            if on[1] and off[1]:
                self.overhead.set((on[0] / on[1]) / (off[0] / off[1]) - 1.0)

    def observe_request(self, job) -> None:
        self.requests.labels(finish_reason=job.finish_reason).inc()
        if job.first_token is not None:
            self.ttft.observe(job.first_token - job.submitted)
            if len(job.tokens) > 1:
                self.tpot.observe((job.finished - job.first_token) / (len(job.tokens) - 1))
        self.latency.observe(job.finished - job.submitted)

    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._mu:
            while self._recent and now - self._recent[0][0] > 10.0:
                self._recent.popleft()
            if not self._recent:
                return 0.0
            span = max(now - self._recent[0][0], 1e-3)
            return sum(n for _, n in self._recent) / max(span, 1.0)
