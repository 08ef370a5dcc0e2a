"""Drift monitoring of one site: a window of recent statistics, the running total, and a baseline.

Axes: `N` tokens, `F` d_sae.

`DriftState` is a pytree, so it lives in a jitted loop's carry. `observe` folds a batch into the
window and the total; once the window holds `window` tokens (checked per batch, so a window may
overrun by up to one batch) it is compared with the baseline (its frequency KL and the number of
features shifted by more than `shift_threshold` baseline standard deviations are kept as the latest
check) and emptied. `drift_report` reads states on the
host into the report the seeds sketch:

    {"blocks.15.resid_post": {"kl_divergence": 0.03, "shifted_features": [...], "dead_features": [...], ...}}
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.monitor import stats as st


class DriftState(NamedTuple):
    window: st.Stats
    """Statistics since the last windowed check."""
    total: st.Stats
    """Statistics since the monitor started."""
    baseline: st.Stats
    """The reference (from a corpus), or an empty one."""
    checks: jax.Array
    """[] int32 windowed checks done."""
    window_kl: jax.Array
    """[] float32 frequency KL of the last checked window against the baseline."""
    window_shifted: jax.Array
    """[] int32 features shifted beyond the threshold in the last checked window."""


def init(baseline: st.Stats | None, d_sae: int) -> DriftState:
    base = baseline if baseline is not None else st.empty(d_sae)
    z = st.empty(d_sae)
    return DriftState(window=z, total=z, baseline=jax.tree.map(jnp.asarray, base),
                      checks=jnp.zeros((), jnp.int32), window_kl=jnp.zeros((), jnp.float32),
                      window_shifted=jnp.zeros((), jnp.int32))


def observe(state: DriftState, feats, valid=None, *, window: int, shift_threshold: float = 3.0,
            chunk: int = 256) -> DriftState:
    """Fold a batch (dense [N, F] or top-k (ids, values)) in; check and empty a full window."""
    w = st.update(state.window, feats, valid=valid, chunk=chunk)
    total = st.update(state.total, feats, valid=valid, chunk=chunk)
    full = w.tokens >= window
    m = st.drift_metrics(w, state.baseline)
    shifted = jnp.sum(jnp.abs(m.mean_shift) > shift_threshold).astype(jnp.int32)
    empty = st.empty(w.count.shape[0])
    return DriftState(
        window=jax.tree.map(lambda e, x: jnp.where(full, e, x), empty, w),
        total=total,
        baseline=state.baseline,
        checks=state.checks + full.astype(jnp.int32),
        window_kl=jnp.where(full, m.kl, state.window_kl),
        window_shifted=jnp.where(full, shifted, state.window_shifted),
    )


def drift_report(states: dict[str, DriftState], *, shift_threshold: float = 3.0, top: int = 10,
                 max_listed: int = 100, **metric_kw) -> dict[str, dict]:
    """Per site, the total since the start against the baseline: `kl_divergence`, `shifted_features`
    (ids by |shift|, largest first), `dead_features`, `newly_dead`, `newly_active`, `top_features`
    (most frequent now), plus `tokens`, `dead_ratio` and the last window's check."""
    out = {}
    for site, s in states.items():
        s = jax.device_get(s)
        m = jax.device_get(st.drift_metrics(s.total, s.baseline, **metric_kw))
        shift = np.asarray(m.mean_shift)
        order = np.argsort(-np.abs(shift))
        shifted = [int(i) for i in order if abs(shift[i]) > shift_threshold][:max_listed]
        rate = np.asarray(m.rate)
        out[site] = {
            "kl_divergence": float(m.kl),
            "shifted_features": shifted,
            "dead_features": np.flatnonzero(m.dead)[:max_listed].tolist(),
            "newly_dead": np.flatnonzero(m.newly_dead)[:max_listed].tolist(),
            "newly_active": np.flatnonzero(m.newly_active)[:max_listed].tolist(),
            "top_features": np.argsort(-rate)[:top].tolist(),
            "tokens": int(s.total.tokens),
            "dead_ratio": float(np.mean(m.dead)),
            "n_shifted": int(np.sum(np.abs(shift) > shift_threshold)),
            "n_dead": int(np.sum(m.dead)),
            "n_newly_dead": int(np.sum(m.newly_dead)),
            "n_newly_active": int(np.sum(m.newly_active)),
            "window_checks": int(s.checks),
            "window_kl": float(s.window_kl),
        }
    return out
