"""Which features fire together: co-firing counts and correlations, from a pass's firing entries.

Axes: `E` entries, `F` d_sae, `M` the most entries one token has in a chunk of tokens.

For features a != b over the n tokens of a pass (zeros included where a feature does not fire):

    count[a, b]   = tokens where both fire
    pearson[a, b] = (S_ab / n - mean_a mean_b) / (std_a std_b),   S_ab = sum over tokens of a * b

Both come from pairs of entries on the same token, so the cost is sum over tokens of m^2 (m the
token's firing features: k for TopK) and never a pass over the dense activations; the [F, F]
accumulators bound it to dictionaries of up to `MAX_FEATURES` features.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxinterp.errors import UsageError
from jaxinterp.features.corpus import Entries

MAX_FEATURES = 8192
"""Largest d_sae whose [F, F] accumulators (count int64, products float64) this computes (1 GB)."""


class Correlated(NamedTuple):
    ids: np.ndarray
    """[F, top] the features most correlated with each (Pearson, over every token), -1 where fewer co-fire."""
    pearson: np.ndarray
    """[F, top] their correlation."""
    count: np.ndarray
    """[F, top] tokens where both fire."""


def _pairs(locs: np.ndarray, feats: np.ndarray, vals: np.ndarray, pairs_per_chunk: int):
    """(a, b, a's value times b's) for each ordered pair of distinct entries on one token, in chunks."""
    starts = np.flatnonzero(np.r_[True, locs[1:] != locs[:-1]])
    counts = np.diff(np.r_[starts, len(locs)])
    lo = 0
    while lo < len(starts):
        m = int(counts[lo])
        hi = lo + 1
        while hi < len(starts) and (hi - lo + 1) * max(m, counts[hi]) ** 2 <= pairs_per_chunk:
            m = max(m, int(counts[hi]))
            hi += 1
        rank = np.arange(starts[lo], starts[hi] if hi < len(starts) else len(locs)) - np.repeat(starts[lo:hi], counts[lo:hi])
        row = np.repeat(np.arange(hi - lo), counts[lo:hi])
        ids = np.full((hi - lo, m), -1, np.int64)
        val = np.zeros((hi - lo, m), np.float64)
        span = slice(starts[lo], starts[hi] if hi < len(starts) else len(locs))
        ids[row, rank], val[row, rank] = feats[span], vals[span]
        ok = (ids[:, :, None] >= 0) & (ids[:, None, :] >= 0) & ~np.eye(m, dtype=bool)[None]
        yield (np.broadcast_to(ids[:, :, None], ok.shape)[ok], np.broadcast_to(ids[:, None, :], ok.shape)[ok],
               (val[:, :, None] * val[:, None, :])[ok])
        lo = hi


def correlated_features(entries: Entries, d_sae: int, n_tokens: int, *, top: int = 10,
                        pairs_per_chunk: int = 4_000_000) -> Correlated:
    """Each feature's `top` most correlated features among those it fires with, over a pass of
    `n_tokens` tokens whose firing entries (in location order) are `entries`."""
    if d_sae > MAX_FEATURES:
        raise UsageError(f"co-firing needs [d_sae, d_sae] accumulators; d_sae {d_sae} is above {MAX_FEATURES}: "
                         "leave it out (--no-cofiring)")
    if n_tokens < 2:
        raise UsageError(f"co-firing over {n_tokens} tokens: read at least two")
    count = np.zeros(d_sae * d_sae, np.int64)
    prod = np.zeros(d_sae * d_sae, np.float64)
    for a, b, ab in _pairs(entries.locs, entries.feats.astype(np.int64), entries.vals.astype(np.float64),
                           pairs_per_chunk):
        key = a * d_sae + b
        count += np.bincount(key, minlength=d_sae * d_sae)
        prod += np.bincount(key, weights=ab, minlength=d_sae * d_sae)
    count, prod = count.reshape(d_sae, d_sae), prod.reshape(d_sae, d_sae)
    v = entries.vals.astype(np.float64)
    mean = np.bincount(entries.feats, weights=v, minlength=d_sae) / n_tokens
    var = np.maximum(np.bincount(entries.feats, weights=v * v, minlength=d_sae) / n_tokens - mean**2, 0.0)
    std = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        pearson = (prod / n_tokens - np.outer(mean, mean)) / np.outer(std, std)
    pearson = np.where((count > 0) & np.isfinite(pearson), pearson, -np.inf)
    top = min(top, d_sae - 1)
    ids = np.argsort(-pearson, axis=1, kind="stable")[:, :top]
    r = np.take_along_axis(pearson, ids, 1)
    used = np.isfinite(r)
    return Correlated(np.where(used, ids, -1), np.where(used, r, 0.0), np.where(used, np.take_along_axis(count, ids, 1), 0))
