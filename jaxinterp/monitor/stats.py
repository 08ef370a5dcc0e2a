"""Per-feature firing statistics as pure functions: a parallel Welford update, and drift checks.

Axes: `N` tokens in a batch, `C` tokens per scan chunk, `F` d_sae, `K` top-k, `H` histogram buckets.

`Stats` holds, per feature, how often it fired and the running mean and M2 (sum of squared
deviations) of its activation over the tokens where it fired, plus the tokens seen and optional
histogram counts of active values. `update` folds a batch in: a `lax.scan` over chunks of C tokens,
each chunk reduced at once (vectorised) and merged with the running state by Chan et al.'s parallel
form of Welford's update:

    n = n_a + n_b;  d = mean_b - mean_a;  mean = mean_a + d * n_b / n;  M2 = M2_a + M2_b + d^2 n_a n_b / n

Everything is elementwise over F or a reduction over tokens, so a `Stats` sharded over d_sae needs no
communication. Batches come dense ([N, F], zero = not firing) or as top-k (ids, values [N, K]).

Drift of `current` against a `baseline` (`drift_metrics`):
- frequency KL: KL(p || q) between the distributions of firings over features, p_i = (c_i + a) /
  sum_j (c_j + a), with add-a smoothing, a = 0.5 (Jeffreys), applied to both windows;
- mean shift: (mean_current - mean_baseline) / std_baseline per feature, for features with at
  least `min_count` firings in both (std floored at `std_floor`);
- dead: firing rate below `dead_rate`; newly dead / newly active against the baseline.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SMOOTHING = 0.5
"""Additive (Jeffreys) smoothing of firing counts in the frequency KL."""


class Stats(NamedTuple):
    count: jax.Array
    """[F] float32 firings (tokens where the feature was active)."""
    mean: jax.Array
    """[F] float32 mean activation over its firings."""
    m2: jax.Array
    """[F] float32 sum of squared deviations from the mean over its firings."""
    tokens: jax.Array
    """[] float32 tokens seen."""
    hist: jax.Array | None = None
    """[F, H] float32 counts of active values per bucket (edges in `HistSpec`), or None."""


def empty(d_sae: int, buckets: int = 0) -> Stats:
    z = jnp.zeros((d_sae,), jnp.float32)
    return Stats(count=z, mean=z, m2=z, tokens=jnp.zeros((), jnp.float32),
                 hist=jnp.zeros((d_sae, buckets), jnp.float32) if buckets else None)


def merge(a: Stats, b: Stats) -> Stats:
    """The statistics of the union of two disjoint streams (Chan et al.)."""
    n = a.count + b.count
    safe = jnp.maximum(n, 1.0)
    d = b.mean - a.mean
    mean = jnp.where(n > 0, a.mean + d * b.count / safe, 0.0)
    m2 = a.m2 + b.m2 + d * d * a.count * b.count / safe
    hist = None if a.hist is None else a.hist + b.hist
    return Stats(count=n, mean=mean, m2=m2, tokens=a.tokens + b.tokens, hist=hist)


def _bucket_ids(v, edges):
    return jnp.clip(jnp.searchsorted(edges, v, side="right") - 1, 0, edges.shape[0] - 2)


def chunk_stats_dense(acts_cf: jax.Array, valid_c: jax.Array, edges: jax.Array | None) -> Stats:
    """Stats of one chunk of dense activations [C, F]; rows with valid False are skipped."""
    x = acts_cf.astype(jnp.float32)
    on = (x > 0) & valid_c[:, None]
    w = on.astype(jnp.float32)
    n = w.sum(0)
    mean = jnp.where(n > 0, (x * w).sum(0) / jnp.maximum(n, 1.0), 0.0)
    m2 = (w * jnp.square(x - mean)).sum(0)
    hist = None
    if edges is not None:
        h = edges.shape[0] - 1
        onehot = jax.nn.one_hot(_bucket_ids(x, edges), h, dtype=jnp.float32) * w[..., None]
        hist = onehot.sum(0)
    return Stats(count=n, mean=mean, m2=m2, tokens=valid_c.astype(jnp.float32).sum(), hist=hist)


def chunk_stats_topk(ids_ck: jax.Array, vals_ck: jax.Array, valid_c: jax.Array, d_sae: int,
                     edges: jax.Array | None) -> Stats:
    """Stats of one chunk of top-k activations (ids, values [C, K]); values <= 0 do not fire."""
    v = vals_ck.astype(jnp.float32)
    w = ((v > 0) & valid_c[:, None]).astype(jnp.float32)
    flat_ids = ids_ck.reshape(-1)
    n = jnp.zeros((d_sae,), jnp.float32).at[flat_ids].add(w.reshape(-1))
    s = jnp.zeros((d_sae,), jnp.float32).at[flat_ids].add((v * w).reshape(-1))
    mean = jnp.where(n > 0, s / jnp.maximum(n, 1.0), 0.0)
    dev = jnp.square(v - mean[ids_ck]) * w
    m2 = jnp.zeros((d_sae,), jnp.float32).at[flat_ids].add(dev.reshape(-1))
    hist = None
    if edges is not None:
        h = edges.shape[0] - 1
        hist = jnp.zeros((d_sae, h), jnp.float32).at[flat_ids, _bucket_ids(v, edges).reshape(-1)].add(w.reshape(-1))
    return Stats(count=n, mean=mean, m2=m2, tokens=valid_c.astype(jnp.float32).sum(), hist=hist)


def _chunks(x, c):
    n = x.shape[0]
    pad = (-n) % c
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, c, *x.shape[1:])


def update(state: Stats, feats, *, valid: jax.Array | None = None, chunk: int = 256,
           edges: jax.Array | None = None) -> Stats:
    """Fold a batch into `state`: `feats` is dense [N, F] or a (ids, values) pair of [N, K];
    `valid` [N] marks the tokens that count (default all). A `lax.scan` over chunks of `chunk`
    tokens; jittable. `edges` [H + 1] are the histogram bucket edges when `state.hist` is kept."""
    topk = isinstance(feats, tuple)
    n = feats[0].shape[0] if topk else feats.shape[0]
    c = max(1, min(chunk, n))
    valid = jnp.ones((n,), jnp.bool_) if valid is None else valid.astype(jnp.bool_)
    edges = edges if state.hist is not None else None
    d_sae = state.count.shape[0]
    xs = (_chunks(feats[0], c), _chunks(feats[1], c)) if topk else _chunks(feats, c)
    vs = _chunks(valid, c)  # padded rows are invalid

    def body(acc, chunk_xs):
        x, v = chunk_xs
        part = chunk_stats_topk(x[0], x[1], v, d_sae, edges) if topk else chunk_stats_dense(x, v, edges)
        return merge(acc, part), None

    out, _ = jax.lax.scan(body, state, (xs, vs))
    return out


def variance(s: Stats) -> jax.Array:
    """[F] population variance of each feature's active values (0 with fewer than 2 firings)."""
    return jnp.where(s.count > 1, s.m2 / jnp.maximum(s.count, 1.0), 0.0)


class DriftMetrics(NamedTuple):
    kl: jax.Array
    """[] KL(current || baseline) of firing frequencies (smoothed)."""
    mean_shift: jax.Array
    """[F] (mean_current - mean_baseline) / std_baseline; 0 where either has < min_count firings."""
    rate: jax.Array
    """[F] current firing rate per token."""
    dead: jax.Array
    """[F] bool: current firing rate below dead_rate."""
    newly_dead: jax.Array
    """[F] bool: dead now, alive in the baseline."""
    newly_active: jax.Array
    """[F] bool: alive now, dead in the baseline."""


def frequency_kl(current: Stats, baseline: Stats, smoothing: float = SMOOTHING) -> jax.Array:
    p = current.count + smoothing
    q = baseline.count + smoothing
    p, q = p / p.sum(), q / q.sum()
    return jnp.sum(p * (jnp.log(p) - jnp.log(q)))


def drift_metrics(current: Stats, baseline: Stats, *, dead_rate: float = 1e-5, min_count: float = 20.0,
                  std_floor: float = 1e-3) -> DriftMetrics:
    rate = current.count / jnp.maximum(current.tokens, 1.0)
    base_rate = baseline.count / jnp.maximum(baseline.tokens, 1.0)
    enough = (current.count >= min_count) & (baseline.count >= min_count)
    std = jnp.maximum(jnp.sqrt(variance(baseline)), std_floor)
    shift = jnp.where(enough, (current.mean - baseline.mean) / std, 0.0)
    dead, base_dead = rate < dead_rate, base_rate < dead_rate
    return DriftMetrics(kl=frequency_kl(current, baseline), mean_shift=shift, rate=rate, dead=dead,
                        newly_dead=dead & ~base_dead, newly_active=~dead & base_dead)
