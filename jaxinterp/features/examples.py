"""FeatureReports from a corpus pass: example windows with every token's activation, quantile bands,
logit tables.

Axes: `N` contexts, `T` tokens per context, `E` firing entries, `V` vocab.

An example is the window of `left` tokens before and `right` after a location where the feature
fired (never BOS), each token with the feature's activation there, read from the pass's firing
entries (a token where the feature did not fire reads 0). Everything returned is plain Python, so
the writers (static site, Neuronpedia batches, explainer prompts) need neither JAX nor the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxinterp.errors import UsageError
from jaxinterp.features.corpus import Entries
from jaxinterp.features.logits import LogitEffects
from jaxinterp.features.report import Example, FeatureReport, QuantileBin
from jaxinterp.features.stats import HIST_EDGES, FeatureStats, quantile_groups


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Each token id's text as it reads in a context (byte-level pieces decoded one by one)."""
    return [tokenizer.decode([i]) for i in range(vocab_size)]


class FeatureIndex:
    """The firing entries grouped by feature, each feature's in location order."""

    def __init__(self, entries: Entries, d_sae: int):
        order = np.argsort(entries.feats, kind="stable")  # entries come location-ordered
        self.locs = entries.locs[order]
        self.vals = entries.vals[order]
        self.starts = np.searchsorted(entries.feats[order], np.arange(d_sae + 1))

    def values(self, feature: int, locs: np.ndarray) -> np.ndarray:
        """The feature's activation at each of `locs` (0 where it did not fire)."""
        a, b = self.starts[feature], self.starts[feature + 1]
        if a == b:
            return np.zeros(len(locs), np.float32)
        mine, vals = self.locs[a:b], self.vals[a:b]
        at = np.minimum(np.searchsorted(mine, locs), b - a - 1)
        return np.where(mine[at] == locs, vals[at], np.float32(0.0))


def _significant(v: np.ndarray, digits: int = 4) -> np.ndarray:
    """`v` rounded to `digits` significant digits (short in JSON; zeros stay zeros)."""
    v = np.asarray(v, np.float64)
    mag = 10.0 ** (digits - 1 - np.floor(np.log10(np.where(v == 0, 1.0, np.abs(v)))))
    return np.round(v * mag) / mag


def examples(contexts_nt: np.ndarray, strings: Sequence[str], index: FeatureIndex, feature: int,
             locs: Sequence[int], left: int, right: int) -> list[Example]:
    """The windows around locations `locs` with `feature`'s activation on each token (one lookup
    for all of them)."""
    t = contexts_nt.shape[1]
    if len(locs) == 0:
        return []
    c, p = np.divmod(np.asarray(locs, np.int64), t)
    pos = p[:, None] + np.arange(-left, right + 1)[None, :]
    inside = (pos >= 1) & (pos < t)
    values = _significant(index.values(feature, (c[:, None] * t + np.clip(pos, 0, t - 1)).ravel())).reshape(pos.shape)
    ids = contexts_nt[c[:, None], np.clip(pos, 0, t - 1)]
    out = []
    for i in range(len(c)):
        keep = inside[i]
        out.append(Example(tokens=tuple(strings[j] for j in ids[i][keep]), values=tuple(values[i][keep].tolist()),
                           focus=int(p[i] - max(1, p[i] - left)), location=int(c[i] * t + p[i])))
    return out


def build_reports(stats: FeatureStats, entries: Entries, contexts_nt: np.ndarray, strings: Sequence[str],
                  features: Sequence[int], *, logits: LogitEffects | None = None, left: int = 12, right: int = 4,
                  n_top: int | None = None, n_quantiles: int = 4, correlated=None) -> list[FeatureReport]:
    """A `FeatureReport` per feature of `features` (statistics pulled to the host once;
    `correlated`: a `cofiring.Correlated` of the same pass)."""
    host = FeatureStats(*(np.asarray(a) for a in stats))
    lg = None if logits is None else LogitEffects(*(np.asarray(a) for a in logits))
    d_sae = host.count.shape[0]
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise UsageError(f"features {bad[:5]} are outside the dictionary's {d_sae}; choose ids in [0, {d_sae})")
    index = FeatureIndex(entries, d_sae)
    n_rows = int(host.n_rows)
    reports = []
    for f in features:
        top_locs = [int(l) for l in host.top_locs[f][: n_top] if l >= 0]
        samples = [(int(l), float(v)) for l, v in zip(host.sample_locs[f], host.sample_vals[f]) if l >= 0]
        bands = quantile_groups(samples, n_quantiles)
        shown = examples(contexts_nt, strings, index, f, top_locs + [l for _, _, band in bands for l, _ in band],
                         left, right)
        top, rest = tuple(shown[: len(top_locs)]), iter(shown[len(top_locs):])
        bands = tuple(QuantileBin(lo, hi, tuple(next(rest) for _ in band)) for lo, hi, band in bands)
        count = int(host.count[f])
        report = FeatureReport(index=int(f), count=count, n_tokens=n_rows,
                               mean=float(host.total[f]) / count if count else 0.0, max=float(host.max[f]),
                               hist=tuple(int(h) for h in host.hist[f]), hist_edges=tuple(float(e) for e in HIST_EDGES),
                               top=top, quantiles=bands)
        if lg is not None:
            report.pos_logits = tuple((strings[i], float(v)) for i, v in zip(lg.pos_ids[f], lg.pos_vals[f]))
            report.neg_logits = tuple((strings[i], float(v)) for i, v in zip(lg.neg_ids[f], lg.neg_vals[f]))
            report.logit_hist = (tuple(int(h) for h in lg.hist[f]), tuple(lg.hist_edges(f)))
        if correlated is not None:
            report.correlated = tuple((int(g), float(r), int(c)) for g, r, c in
                                      zip(correlated.ids[f], correlated.pearson[f], correlated.count[f]) if g >= 0)
        reports.append(report)
    return reports


def non_activating(contexts_nt: np.ndarray, strings: Sequence[str], index: FeatureIndex, feature: int, n: int, *,
                   left: int = 12, right: int = 4, seed: int = 0) -> list[Example]:
    """Up to `n` windows of the corpus where `feature` fires on no token (the non-activating
    examples an explanation is scored against), drawn from `seed`; fewer when such windows are rare."""
    rng = np.random.default_rng([seed, feature])
    t = contexts_nt.shape[1]
    out: list[Example] = []
    for _ in range(8):  # a few rounds of draws; a feature firing almost everywhere gives up
        c = rng.integers(0, contexts_nt.shape[0], size=4 * n)
        p = rng.integers(1, t, size=4 * n)
        for ex in examples(contexts_nt, strings, index, feature, (c * t + p).tolist(), left, right):
            if not any(ex.values) and len(out) < n:
                out.append(ex)
        if len(out) == n:
            break
    return out
