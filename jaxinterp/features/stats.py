"""Per-feature statistics over a corpus, as one streaming reduction.

Axes: `N` rows of a batch (tokens), `F` d_sae, `K` contexts kept per feature, `S` random samples
kept per feature, `H` histogram bins, `E` a batch's firing entries (at most `N * max_active`).

`update_stats(stats, acts_nf, loc_n)` folds one batch of feature activations into the running state
for every feature at once:

- the K largest activations with their token locations (a global token index the caller defines,
  e.g. `context * T + position`); ties keep the earlier location, so locations must grow from batch
  to batch, as a corpus pass gives them;
- a uniform random sample of S firing tokens: the S entries with the smallest key `hash(loc, f)`.
  The sample depends only on which (token, feature) pairs fired, not on batching or order, so a
  resumed pass equals one pass; grouped by value it gives the per-quantile examples of a dashboard;
- firing count, sum and maximum, and a histogram of the firing values on fixed log10 bins.

A batch's statistics come from its firing entries, sorted by (feature, -value) and (feature,
key): a sort of E entries instead of two top-k's over the dense [F, N] matrix. A k-sparse
dictionary's code [N, K] is those entries already (`update_stats_sparse`; no [N, F] matrix at
all); from dense activations they are taken with `jnp.nonzero` at a static size of `max_active` a
row, and a batch with more takes the dense branch of a `lax.cond` (top-k's over [F, N]). Every
path gives the same state (sums up to float rounding).

The state is a pytree of arrays with F leading (save it like a checkpoint; `sharded_update` splits
it over features on a mesh, each device folding its own features' columns).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIST_EDGES = np.linspace(-4.0, 4.0, 51)
"""log10 edges of the activation histogram (50 bins); values outside land in the end bins."""

NO_KEY = np.int32(np.iinfo(np.int32).max)
"""The key of an empty sample slot (larger than every real key)."""


class FeatureStats(NamedTuple):
    top_vals: jax.Array
    """[F, K] largest activations, descending; -1 where the feature fired fewer than K times."""
    top_locs: jax.Array
    """[F, K] int32 token location of each; -1 where unused."""
    sample_keys: jax.Array
    """[F, S] int32 keys of the sampled firing tokens, ascending; `NO_KEY` where unused."""
    sample_locs: jax.Array
    """[F, S] int32 their locations; -1 where unused."""
    sample_vals: jax.Array
    """[F, S] their activations; 0 where unused."""
    count: jax.Array
    """[F] int32 rows where the feature fired (activation > 0)."""
    total: jax.Array
    """[F] float32 sum of the activations."""
    max: jax.Array
    """[F] float32 largest activation (0 if it never fired)."""
    hist: jax.Array
    """[F, H] int32 firing values per log10 bin of `HIST_EDGES`."""
    n_rows: jax.Array
    """() int32 rows seen."""


STAT_AXES = {name: ("d_sae",) + (None,) * extra for name, extra in
             dict(top_vals=1, top_locs=1, sample_keys=1, sample_locs=1, sample_vals=1, count=0, total=0, max=0,
                  hist=1, n_rows=-1).items()}
STAT_AXES["n_rows"] = ()
"""Logical axes of each field (F is `d_sae`, split like the dictionary's features)."""


def init_stats(d_sae: int, k: int, samples: int = 40) -> FeatureStats:
    """The empty state for `d_sae` features keeping `k` top locations and `samples` random ones each."""
    return FeatureStats(
        top_vals=jnp.full((d_sae, k), -1.0, jnp.float32),
        top_locs=jnp.full((d_sae, k), -1, jnp.int32),
        sample_keys=jnp.full((d_sae, samples), NO_KEY, jnp.int32),
        sample_locs=jnp.full((d_sae, samples), -1, jnp.int32),
        sample_vals=jnp.zeros((d_sae, samples), jnp.float32),
        count=jnp.zeros((d_sae,), jnp.int32),
        total=jnp.zeros((d_sae,), jnp.float32),
        max=jnp.zeros((d_sae,), jnp.float32),
        hist=jnp.zeros((d_sae, len(HIST_EDGES) - 1), jnp.int32),
        n_rows=jnp.zeros((), jnp.int32),
    )


def _fmix32(h):
    """murmur3's 32-bit finaliser: a bijection of uint32 that mixes every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def sample_key(loc, feature):
    """int32 key in [0, 2**31 - 1) of a (location, feature) pair: the sample keeps the smallest."""
    h = _fmix32(_fmix32(jnp.asarray(loc).astype(jnp.uint32)) ^ (jnp.asarray(feature).astype(jnp.uint32) * jnp.uint32(0x9E3779B9)))
    return jnp.minimum(h >> 1, jnp.uint32(NO_KEY - 1)).astype(jnp.int32)


def _bins(acts):
    lo, width = HIST_EDGES[0], HIST_EDGES[1] - HIST_EDGES[0]
    return jnp.clip(jnp.floor((jnp.log10(jnp.maximum(acts, 1e-30)) - lo) / width), 0, len(HIST_EDGES) - 2).astype(jnp.int32)


def _ranks(sorted_f):
    """Each entry's rank within its run of equal features (the array is sorted by feature)."""
    i = jnp.arange(sorted_f.shape[0])
    start = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones(1, bool), sorted_f[1:] != sorted_f[:-1]]), i, 0))
    return i - start


class _Batch(NamedTuple):
    """One batch's own statistics, merged into the running ones by `_merge`."""

    top_vals: jax.Array
    top_locs: jax.Array
    keys: jax.Array
    slocs: jax.Array
    svals: jax.Array
    hist: jax.Array
    count: jax.Array
    total: jax.Array
    max: jax.Array


def _from_entries(feat, val, loc, f, f0, k, s) -> _Batch:
    """A batch's statistics from its firing entries [E]: feature (`f` on padding entries, which
    sort last and scatter nowhere), value and location."""
    real = feat < f
    key = jnp.where(real, sample_key(loc, feat + f0), NO_KEY)

    sf, sv, sl = jax.lax.sort((feat, -val, loc), num_keys=3)
    r = _ranks(sf)
    r = jnp.where(r < k, r, k)  # out of range: dropped
    top_vals = jnp.full((f, k), -1.0, jnp.float32).at[sf, r].set(-sv, mode="drop")
    top_locs = jnp.full((f, k), -1, jnp.int32).at[sf, r].set(sl, mode="drop")

    kf, kk, kl, kv = jax.lax.sort((feat, key, loc, val), num_keys=3)
    r = _ranks(kf)
    r = jnp.where(r < s, r, s)
    keys = jnp.full((f, s), NO_KEY, jnp.int32).at[kf, r].set(kk, mode="drop")
    slocs = jnp.full((f, s), -1, jnp.int32).at[kf, r].set(kl, mode="drop")
    svals = jnp.zeros((f, s), jnp.float32).at[kf, r].set(kv, mode="drop")

    hist = jnp.zeros((f, len(HIST_EDGES) - 1), jnp.int32).at[feat, _bins(val)].add(1, mode="drop")
    count = jnp.zeros((f,), jnp.int32).at[feat].add(1, mode="drop")
    total = jnp.zeros((f,), jnp.float32).at[feat].add(val, mode="drop")
    mx = jnp.zeros((f,), jnp.float32).at[feat].max(val, mode="drop")
    return _Batch(top_vals, top_locs, keys, slocs, svals, hist, count, total, mx)


def _sparse_batch(acts, on, loc_n, f0, k, s, cap) -> _Batch:
    """The batch's statistics from its firing entries (at most `cap`), found with one `nonzero`."""
    n, f = acts.shape
    idx = jnp.nonzero(on.reshape(-1), size=cap, fill_value=n * f)[0]
    real = idx < n * f
    row, feat = idx // f, jnp.where(real, idx % f, f)
    val = jnp.where(real, acts.reshape(-1)[jnp.minimum(idx, n * f - 1)], -1.0)
    loc = jnp.where(real, loc_n[jnp.minimum(row, n - 1)], -1)
    return _from_entries(feat, val, loc, f, f0, k, s)


def _dense_batch(acts, on, loc_n, f0, k, s, cap) -> _Batch:
    """The same from the dense [F, N] matrix (for a batch with more firing entries than `cap`)."""
    del cap
    n, f = acts.shape
    vals, rows = jax.lax.top_k(jnp.where(on, acts, -1.0).T, min(k, n))
    top_locs = jnp.where(vals > 0, loc_n[rows], -1)
    top_vals = jnp.where(vals > 0, vals, -1.0)
    feat = jnp.broadcast_to(jnp.arange(f), acts.shape)
    key = jnp.where(on, sample_key(jnp.broadcast_to(loc_n[:, None], acts.shape), feat + f0), NO_KEY)
    neg, rows = jax.lax.top_k(-key.T, min(s, n))  # ties (equal keys) keep the earlier row
    keys = -neg
    used = keys < NO_KEY
    slocs = jnp.where(used, loc_n[rows], -1)
    svals = jnp.where(used, jnp.take_along_axis(acts.T, rows, 1), 0.0)
    pad = lambda a, w, fill: jnp.pad(a, ((0, 0), (0, w - a.shape[1])), constant_values=fill)
    hist = jnp.zeros((f, len(HIST_EDGES) - 1), jnp.int32).at[feat.reshape(-1), _bins(acts).reshape(-1)].add(
        on.reshape(-1).astype(jnp.int32))
    return _Batch(pad(top_vals, k, -1.0), pad(top_locs, k, -1), pad(keys, s, NO_KEY), pad(slocs, s, -1),
                  pad(svals, s, 0.0), hist, jnp.sum(on, axis=0, dtype=jnp.int32), jnp.sum(acts, axis=0),
                  jnp.max(acts, axis=0))


def _merge(stats: FeatureStats, b: _Batch, n_valid) -> FeatureStats:
    k, s = stats.top_vals.shape[1], stats.sample_keys.shape[1]
    # merged after the kept ones, so that ties keep the earlier location (key ties, the earlier too)
    top_vals, pos = jax.lax.top_k(jnp.concatenate([stats.top_vals, b.top_vals], 1), k)
    top_locs = jnp.take_along_axis(jnp.concatenate([stats.top_locs, b.top_locs], 1), pos, 1)
    neg, pos = jax.lax.top_k(-jnp.concatenate([stats.sample_keys, b.keys], 1), s)
    pick = lambda a, c: jnp.take_along_axis(jnp.concatenate([a, c], 1), pos, 1)
    return FeatureStats(
        top_vals=top_vals,
        top_locs=top_locs,
        sample_keys=-neg,
        sample_locs=pick(stats.sample_locs, b.slocs),
        sample_vals=pick(stats.sample_vals, b.svals),
        count=stats.count + b.count,
        total=stats.total + b.total,
        max=jnp.maximum(stats.max, b.max),
        hist=stats.hist + b.hist,
        n_rows=stats.n_rows + n_valid,
    )


def _update(stats: FeatureStats, acts_nf, loc_n, f0, max_active: int) -> FeatureStats:
    k, s = stats.top_vals.shape[1], stats.sample_keys.shape[1]
    n = acts_nf.shape[0]
    valid = loc_n >= 0
    acts = jnp.where(valid[:, None], acts_nf.astype(jnp.float32), 0.0)
    on = acts > 0
    cap = min(n * max_active, n * acts.shape[1])
    batch = jax.lax.cond(jnp.sum(on, dtype=jnp.int32) <= cap, partial(_sparse_batch, k=k, s=s, cap=cap),
                         partial(_dense_batch, k=k, s=s, cap=cap), acts, on, loc_n, f0)
    return _merge(stats, batch, jnp.sum(valid, dtype=jnp.int32))


@jax.jit
def update_stats_sparse(stats: FeatureStats, vals_nk: jax.Array, ids_nk: jax.Array, loc_n: jax.Array) -> FeatureStats:
    """`update_stats` from the batch's sparse code: values [N, K] of features ids [N, K] (entries
    with value 0 fire nowhere), as `Dictionary.encode_sparse` gives it; no [N, F] matrix is formed."""
    f, k, s = stats.count.shape[0], stats.top_vals.shape[1], stats.sample_keys.shape[1]
    valid = loc_n >= 0
    on = (vals_nk > 0) & valid[:, None]
    feat = jnp.where(on, ids_nk, f).reshape(-1)
    val = jnp.where(on, vals_nk.astype(jnp.float32), -1.0).reshape(-1)
    loc = jnp.broadcast_to(loc_n[:, None], vals_nk.shape).reshape(-1)
    return _merge(stats, _from_entries(feat, val, loc, f, 0, k, s), jnp.sum(valid, dtype=jnp.int32))


@partial(jax.jit, static_argnames=("max_active",))
def update_stats(stats: FeatureStats, acts_nf: jax.Array, loc_n: jax.Array, *, max_active: int = 64) -> FeatureStats:
    """`stats` with the batch's activations [N, F] at locations [N] folded in (rows with a
    negative location are padding and count nowhere). `max_active`: firing features per row the
    sparse branch makes room for, on average over the batch (more take the dense branch)."""
    return _update(stats, acts_nf, loc_n, 0, max_active)


def sharded_update(mesh, *, max_active: int = 64):
    """`update_stats` with the state and the activations' feature axis split over `mesh` as the
    rules table splits `d_sae` (rows and locations replicated): each device folds its own features.
    Returns the jitted update; place the state with `place_stats` first."""
    from jax.sharding import PartitionSpec as P

    from jaxinterp.sharding import declared_spec

    spec = {name: declared_spec(mesh, axes) for name, axes in STAT_AXES.items()}
    fax = spec["count"][0]

    def local(stats, acts, loc):
        f0 = jax.lax.axis_index(fax) * acts.shape[1] if fax is not None else 0
        out = _update(stats, acts, loc, f0, max_active)
        # every device counts the same rows
        return out._replace(n_rows=stats.n_rows + jnp.sum(loc >= 0, dtype=jnp.int32))

    stats_spec = FeatureStats(**spec)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(stats_spec, P(None, fax), P()), out_specs=stats_spec,
                       check_vma=False)

    @jax.jit
    def update(stats, acts_nf, loc_n):
        acts = jax.sharding.reshard(acts_nf, jax.sharding.NamedSharding(mesh, P(None, fax)))
        return fn(stats, acts, jax.sharding.reshard(loc_n, jax.sharding.NamedSharding(mesh, P())))

    return update


def place_stats(mesh, stats: FeatureStats) -> FeatureStats:
    """`stats` laid out on `mesh` as `STAT_AXES` declare."""
    from jaxinterp.sharding import named

    return FeatureStats(**{name: jax.device_put(v, named(mesh, STAT_AXES[name], v.shape, name=f"stats.{name}"))
                           for name, v in stats._asdict().items()})


def finalize_top(stats: FeatureStats, feature: int) -> list[tuple[int, float]]:
    """Feature `feature`'s kept (location, activation) pairs, largest first."""
    vals = np.asarray(stats.top_vals)[feature]  # to the host first: the state may be split over devices
    locs = np.asarray(stats.top_locs)[feature]
    return [(int(l), float(v)) for v, l in zip(vals, locs) if l >= 0]


def finalize_samples(stats: FeatureStats, feature: int) -> list[tuple[int, float]]:
    """Feature `feature`'s sampled (location, activation) pairs, in key order (a random order)."""
    locs = np.asarray(stats.sample_locs)[feature]
    vals = np.asarray(stats.sample_vals)[feature]
    return [(int(l), float(v)) for l, v in zip(locs, vals) if l >= 0]


def quantile_groups(samples: list[tuple[int, float]], n_groups: int) -> list[tuple[float, float, list[tuple[int, float]]]]:
    """A feature's samples split into `n_groups` bands of equal count by value, lowest first:
    (lowest value, highest value, the band's (location, value) pairs, largest first)."""
    ordered = sorted(samples, key=lambda lv: (lv[1], lv[0]))
    if not ordered:
        return []
    out = []
    for part in np.array_split(np.arange(len(ordered)), min(n_groups, len(ordered))):
        band = [ordered[i] for i in part]
        out.append((band[0][1], band[-1][1], band[::-1]))
    return out


def save_stats(path, stats: FeatureStats, **meta) -> None:
    """Write `stats` (and JSON-able `meta`, e.g. the next context to read) to the .npz file `path`,
    atomically: a pass killed mid-write leaves the previous file whole."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {name: np.asarray(value) for name, value in stats._asdict().items()}
    np.savez(tmp, **arrays, meta=np.asarray(json.dumps(meta)))
    os.replace(tmp, path)


def load_stats(path) -> tuple[FeatureStats, dict]:
    """(stats, meta) written by `save_stats`."""
    import json

    from jaxinterp.data import DataError

    with np.load(path) as z:
        missing = [name for name in FeatureStats._fields if name not in z.files]
        if missing:
            raise DataError(f"{path}: feature statistics without {missing}; it was written by another version: "
                            "delete it and run the pass again")
        stats = FeatureStats(**{name: jnp.asarray(z[name]) for name in FeatureStats._fields})
        return stats, json.loads(str(z["meta"]))
