"""Prometheus export of drift reports, generation counts and steering overhead.

Axes: `F` d_sae (only ever reduced over; feature ids are never labels, which would give one time
series per feature).

`MetricsExporter` owns its own `CollectorRegistry`, so several exporters (and tests) never collide
in the process-wide default registry. Every per-site series carries the single label `site`:

    counters  jaxinterp_feature_fires_total{site}     firings summed over all features
              jaxinterp_tokens_total{site}            tokens monitored
              jaxinterp_generated_tokens_total        tokens generated
    gauges    jaxinterp_drift_kl{site}                frequency KL of the total against the baseline
              jaxinterp_window_drift_kl{site}         frequency KL of the last checked window
              jaxinterp_dead_features_ratio{site}     fraction of features below the dead rate
              jaxinterp_shifted_features{site}        features whose mean shifted past the threshold
              jaxinterp_newly_dead_features{site}     dead now, alive in the baseline
              jaxinterp_newly_active_features{site}   alive now, dead in the baseline
    histogram jaxinterp_steering_overhead_seconds     extra seconds steering added to a request

A monitor's reports carry cumulative totals (`tokens`, and the firings from `fires_from_state`), so
`observe_report` adds to the counters the increase since the site's previous observation; a total
smaller than the previous one means the monitor restarted, and the new total is the increase.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

import jax
import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jaxinterp.errors import UsageError
from jaxinterp.monitor import stats as st
from jaxinterp.monitor.drift import DriftState

PREFIX = "jaxinterp"

OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the steering-overhead histogram's buckets."""

REPORT_KEYS = ("kl_divergence", "window_kl", "dead_ratio", "n_shifted", "newly_dead", "newly_active", "tokens")
"""The keys of one site's `drift_report` entry that the exporter reads."""


def fires_from_state(state: DriftState | st.Stats) -> float:
    """Total firings (summed over the F features) since the monitor started: the `total` statistics
    of a `DriftState`, or a `Stats` itself."""
    stats = state.total if isinstance(state, DriftState) else state
    if not isinstance(stats, st.Stats):
        raise TypeError(f"expected a DriftState or Stats, got {type(state).__name__}")
    return float(np.sum(jax.device_get(stats.count), dtype=np.float64))


def counter_increase(previous: float, total: float) -> float:
    """The increase of a cumulative total since `previous`; a smaller total is a restart."""
    return total - previous if total >= previous else total


def _check_total(name: str, site: str, total: float) -> None:
    if not math.isfinite(float(total)) or float(total) < 0:
        raise UsageError(f"{name} total {total!r} for site {site!r} must be finite and >= 0; pass the cumulative "
                         f"count since the monitor started")


@dataclasses.dataclass
class MetricsServer:
    """A running `/metrics` HTTP server of one exporter."""

    server: WSGIServer
    """The WSGI server (serving on a daemon thread)."""
    thread: threading.Thread
    """The thread running `server.serve_forever`."""
    addr: str
    """The address it listens on."""
    port: int
    """The port it listens on (the one picked when 0 was asked for)."""

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def shutdown(self) -> None:
        """Stop serving, close the socket and wait for the thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class MetricsExporter:
    """Prometheus metrics of one process's monitors, in a registry of their own."""

    def __init__(self, buckets: tuple[float, ...] = OVERHEAD_BUCKETS) -> None:
        r = self.registry = CollectorRegistry()
        site = ["site"]
        self.feature_fires = Counter(f"{PREFIX}_feature_fires", "Feature firings summed over all features.",
                                     site, registry=r)
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens monitored.", site, registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated.", registry=r)
        self.drift_kl = Gauge(f"{PREFIX}_drift_kl", "Frequency KL of all monitored tokens against the baseline.",
                              site, registry=r)
        self.window_drift_kl = Gauge(f"{PREFIX}_window_drift_kl",
                                     "Frequency KL of the last checked window against the baseline.", site, registry=r)
        self.dead_features_ratio = Gauge(f"{PREFIX}_dead_features_ratio",
                                         "Fraction of features firing below the dead rate.", site, registry=r)
        self.shifted_features = Gauge(f"{PREFIX}_shifted_features",
                                      "Features whose mean activation shifted past the threshold.", site, registry=r)
        self.newly_dead_features = Gauge(f"{PREFIX}_newly_dead_features",
                                         "Features dead now and alive in the baseline.", site, registry=r)
        self.newly_active_features = Gauge(f"{PREFIX}_newly_active_features",
                                           "Features alive now and dead in the baseline.", site, registry=r)
        self.steering_overhead = Histogram(f"{PREFIX}_steering_overhead_seconds",
                                           "Extra seconds steering added to a request.", buckets=buckets, registry=r)
        self._lock = threading.Lock()
        self._last_tokens: dict[str, float] = {}
        self._last_fires: dict[str, float] = {}

    def observe_report(self, report: Mapping[str, Mapping], fires: Mapping[str, float] | None = None) -> None:
        """Set the gauges from a `drift_report` and add the increases of its cumulative totals.

        `fires` maps a site to its total firings so far (`fires_from_state`); the tokens come from
        the report. A site's lists of newly dead / active features are counted (or their
        `n_newly_dead` / `n_newly_active` when a report carries them, as lists may be truncated)."""
        for site, entry in report.items():
            missing = [k for k in REPORT_KEYS if k not in entry]
            if missing:
                raise UsageError(f"report for site {site!r} lacks {missing}; pass the dict drift_report returns")
            _check_total("tokens", site, entry["tokens"])
        for site, total in (fires or {}).items():
            _check_total("fires", site, total)
        with self._lock:
            for site, entry in report.items():
                self.drift_kl.labels(site=site).set(float(entry["kl_divergence"]))
                self.window_drift_kl.labels(site=site).set(float(entry["window_kl"]))
                self.dead_features_ratio.labels(site=site).set(float(entry["dead_ratio"]))
                self.shifted_features.labels(site=site).set(int(entry["n_shifted"]))
                self.newly_dead_features.labels(site=site).set(int(entry.get("n_newly_dead", len(entry["newly_dead"]))))
                self.newly_active_features.labels(site=site).set(
                    int(entry.get("n_newly_active", len(entry["newly_active"]))))
                self._add_total(self.tokens, self._last_tokens, site, float(entry["tokens"]))
            for site, total in (fires or {}).items():
                self._add_total(self.feature_fires, self._last_fires, site, float(total))

    @staticmethod
    def _add_total(counter: Counter, last: dict[str, float], site: str, total: float) -> None:
        counter.labels(site=site).inc(counter_increase(last.get(site, 0.0), total))
        last[site] = total

    def observe_generation(self, n_tokens: int) -> None:
        """Count `n_tokens` newly generated tokens."""
        if n_tokens < 0:
            raise UsageError(f"n_tokens={n_tokens} must be >= 0")
        self.generated_tokens.inc(n_tokens)

    def observe_steering_overhead(self, seconds: float) -> None:
        """Record the extra seconds steering added to one request; a negative difference (timing
        noise) is recorded as 0 so that the histogram's sum never decreases."""
        if math.isnan(seconds):
            raise UsageError("steering overhead is NaN; pass the steered minus the unsteered seconds")
        self.steering_overhead.observe(max(0.0, float(seconds)))

    def text(self) -> str:
        """The registry in the Prometheus text exposition format (what `/metrics` serves)."""
        return prometheus_client.generate_latest(self.registry).decode("utf-8")

    def serve(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve `/metrics` for this registry on a daemon thread; port 0 picks a free port, read back
        from the returned server's `port`. Call its `shutdown()` to stop."""
        try:
            server, thread = prometheus_client.start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve metrics on {addr}:{port} ({e.strerror}); "
                                   f"pick another port, or 0 for a free one") from e
        return MetricsServer(server=server, thread=thread, addr=addr, port=int(server.server_port))
