"""Feature statistics over a corpus against a brute-force NumPy computation."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import features


def _brute(acts, locs, k):
    """Every feature's top k (value, location) by (-value, location), counts, sums, maxima, histogram."""
    n_bins = len(features.HIST_EDGES) - 1
    lo, width = features.HIST_EDGES[0], features.HIST_EDGES[1] - features.HIST_EDGES[0]
    out = []
    for f in range(acts.shape[1]):
        col = acts[:, f]
        on = np.flatnonzero(col > 0)
        order = on[np.lexsort((locs[on], -col[on]))][:k]
        bins = np.clip(np.floor((np.log10(col[on]) - lo) / width), 0, n_bins - 1).astype(int)
        out.append({"top": [(int(locs[i]), float(col[i])) for i in order], "count": len(on), "total": col.sum(),
                    "max": col.max(initial=0.0), "hist": np.bincount(bins, minlength=n_bins)})
    return out


@pytest.mark.parametrize("batch", [7, 64])
def test_streaming_stats_equal_brute_force_with_ties(batch):
    rng = np.random.default_rng(0)
    n, f, k = 200, 12, 5
    # sparse activations on a few levels, so that many values tie; one feature never fires
    acts = rng.choice([0.5, 2.0, 3.0], size=(n, f)) * (rng.random((n, f)) < 0.15)
    acts[:, 3] = 0.0
    acts[:, 5] = np.where(rng.random(n) < 0.3, rng.lognormal(0.0, 2.0, n), 0.0)  # values across many bins
    acts = acts.astype(np.float32)
    locs = np.arange(n, dtype=np.int32) * 3 + 11  # growing, not the row index
    stats = features.init_stats(f, k)
    for s in range(0, n, batch):
        a, l = acts[s : s + batch], locs[s : s + batch]
        pad = batch - len(a)  # the short last batch, padded with location -1
        a = np.concatenate([a, np.full((pad, f), 9.0, np.float32)])
        l = np.concatenate([l, np.full(pad, -1, np.int32)])
        stats = features.update_stats(stats, jnp.asarray(a), jnp.asarray(l))
    want = _brute(acts, locs, k)
    assert int(stats.n_rows) == n
    for i, w in enumerate(want):
        got = features.finalize_top(stats, i)
        assert [g[0] for g in got] == [t[0] for t in w["top"]], i
        np.testing.assert_allclose([g[1] for g in got], [t[1] for t in w["top"]], rtol=1e-6)
        assert int(stats.count[i]) == w["count"]
        assert float(stats.total[i]) == pytest.approx(w["total"], rel=1e-5)
        assert float(stats.max[i]) == pytest.approx(w["max"], rel=1e-6)
        np.testing.assert_array_equal(np.asarray(stats.hist[i]), w["hist"])
    assert features.finalize_top(stats, 3) == [] and int(stats.hist[5].astype(bool).sum()) > 5
