"""Per-feature statistics over a corpus, as one streaming reduction.

Axes: `N` rows of a batch (tokens), `F` d_sae, `K` contexts kept per feature, `H` histogram bins.

`update_stats(stats, acts_nf, loc_n)` folds one batch of feature activations into the running state
for every feature at once: the K largest activations with their token locations (a global token
index the caller defines, e.g. `context * T + position`), firing count, sum and maximum, and a
histogram of the firing values on fixed log10 bins. The state is a pytree of arrays (save it like a
checkpoint; split it over features like the dictionary). Ties keep the earlier location: locations
must grow from batch to batch, as a corpus pass gives them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIST_EDGES = np.linspace(-4.0, 4.0, 51)
"""log10 edges of the activation histogram (50 bins); values outside land in the end bins."""


class FeatureStats(NamedTuple):
    top_vals: jax.Array
    """[F, K] largest activations, descending; -1 where the feature fired fewer than K times."""
    top_locs: jax.Array
    """[F, K] int32 token location of each; -1 where unused."""
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


def init_stats(d_sae: int, k: int) -> FeatureStats:
    """The empty state for `d_sae` features keeping `k` top locations each."""
    return FeatureStats(
        top_vals=jnp.full((d_sae, k), -1.0, jnp.float32),
        top_locs=jnp.full((d_sae, k), -1, jnp.int32),
        count=jnp.zeros((d_sae,), jnp.int32),
        total=jnp.zeros((d_sae,), jnp.float32),
        max=jnp.zeros((d_sae,), jnp.float32),
        hist=jnp.zeros((d_sae, len(HIST_EDGES) - 1), jnp.int32),
        n_rows=jnp.zeros((), jnp.int32),
    )


@jax.jit
def update_stats(stats: FeatureStats, acts_nf: jax.Array, loc_n: jax.Array) -> FeatureStats:
    """`stats` with the batch's activations [N, F] at locations [N] folded in (rows with a
    negative location are padding and count nowhere)."""
    k = stats.top_vals.shape[1]
    valid = loc_n >= 0
    acts = jnp.where(valid[:, None], acts_nf.astype(jnp.float32), 0.0)
    on = acts > 0
    # the batch's own top k per feature (non-firing rows as -1), merged after the kept ones so
    # that ties keep the earlier location
    cand_fn = jnp.where(on, acts, -1.0).T
    batch_vals, batch_rows = jax.lax.top_k(cand_fn, min(k, cand_fn.shape[1]))
    batch_locs = jnp.where(batch_vals > 0, loc_n[batch_rows], -1)
    vals = jnp.concatenate([stats.top_vals, jnp.where(batch_vals > 0, batch_vals, -1.0)], axis=1)
    locs = jnp.concatenate([stats.top_locs, batch_locs], axis=1)
    top_vals, pos = jax.lax.top_k(vals, k)
    top_locs = jnp.take_along_axis(locs, pos, axis=1)

    n_bins = stats.hist.shape[1]
    lo, width = HIST_EDGES[0], HIST_EDGES[1] - HIST_EDGES[0]
    bins = jnp.clip(jnp.floor((jnp.log10(jnp.maximum(acts, 1e-30)) - lo) / width), 0, n_bins - 1).astype(jnp.int32)
    feat = jnp.broadcast_to(jnp.arange(acts.shape[1]), acts.shape)
    hist = stats.hist.at[feat.reshape(-1), bins.reshape(-1)].add(on.reshape(-1).astype(jnp.int32))
    return FeatureStats(
        top_vals=top_vals,
        top_locs=top_locs,
        count=stats.count + jnp.sum(on, axis=0, dtype=jnp.int32),
        total=stats.total + jnp.sum(acts, axis=0),
        max=jnp.maximum(stats.max, jnp.max(acts, axis=0)),
        hist=hist,
        n_rows=stats.n_rows + jnp.sum(valid, dtype=jnp.int32),
    )


def finalize_top(stats: FeatureStats, feature: int) -> list[tuple[int, float]]:
    """Feature `feature`'s kept (location, activation) pairs, largest first."""
    vals = np.asarray(stats.top_vals[feature])
    locs = np.asarray(stats.top_locs[feature])
    return [(int(l), float(v)) for v, l in zip(vals, locs) if l >= 0]


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

    with np.load(path) as z:
        stats = FeatureStats(**{name: jnp.asarray(z[name]) for name in FeatureStats._fields})
        return stats, json.loads(str(z["meta"]))
