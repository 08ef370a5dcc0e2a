"""Timing helpers shared by the benchmarks: medians after a warm-up, variants in interleaved rounds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn()` (its result waited for) over `repeats` calls after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def interleaved_medians(variants: dict[str, Any], call: Callable[[Any], Any], repeats: int) -> dict[str, float]:
    """Median seconds of `call(v)` per variant, timed in `repeats` rounds that visit every variant
    once, so a slow spell of a shared machine hits all of them alike; each is warmed up first."""
    for v in variants.values():
        jax.block_until_ready(call(v))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, v in variants.items():
            t = time.perf_counter()
            jax.block_until_ready(call(v))
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}
