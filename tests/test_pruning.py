"""Graph pruning by influence: circuit-tracer's definitions, written out in NumPy with a sort,
against the bisection that never sorts the edge scores."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinterp.circuits.pruning import graph_scores, influence, mass_threshold, normalise, prune


def _np_normalise(a):
    a = np.abs(a)
    return a / np.maximum(a.sum(1, keepdims=True), 1e-10)


def _np_influence(a_hat, w):
    return w @ (np.linalg.inv(np.eye(len(w)) - a_hat) - np.eye(len(w)))


def _np_threshold(s, tau):
    s = np.sort(s.ravel())[::-1]
    c = np.cumsum(s) / s.sum()
    return s[min(np.searchsorted(c, tau), len(s) - 1)]


def _graph(seed, n_feat=12, n_err=4, n_tok=3, n_logit=2):
    """A random DAG in node order [features | errors | tokens | logits]: features read earlier
    features, errors and tokens; logits read features and errors."""
    rng = np.random.default_rng(seed)
    n = n_feat + n_err + n_tok + n_logit
    a = np.zeros((n, n), np.float32)
    f, e, t = slice(0, n_feat), slice(n_feat, n_feat + n_err), slice(n_feat + n_err, n_feat + n_err + n_tok)
    for i in range(n_feat):
        a[i, :i] = rng.normal(size=i) * (rng.random(i) < 0.5)
        a[i, e] = rng.normal(size=n_err) * 0.3
        a[i, t] = rng.normal(size=n_tok)
    a[n - n_logit :, f] = rng.normal(size=(n_logit, n_feat))
    a[n - n_logit :, e] = rng.normal(size=(n_logit, n_err)) * 0.5
    w = np.zeros(n, np.float32)
    w[n - n_logit :] = rng.dirichlet(np.ones(n_logit)) * 0.9
    kinds = np.array(["f"] * n_feat + ["e"] * n_err + ["t"] * n_tok + ["l"] * n_logit)
    return a, w, kinds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_threshold_and_scores_equal_the_sorted_definitions(seed):
    a, w, kinds = _graph(seed)
    a_hat = _np_normalise(a)
    np.testing.assert_allclose(np.asarray(normalise(a)), a_hat, rtol=1e-6)
    inf = _np_influence(a_hat, w)
    np.testing.assert_allclose(np.asarray(influence(a_hat, w)), inf, rtol=1e-4, atol=1e-7)
    for tau in (0.5, 0.8, 0.98):
        assert float(mass_threshold(inf, tau)) == pytest.approx(_np_threshold(inf, tau), rel=1e-6)
        scores = (a_hat * (inf + w)[:, None]).ravel()
        assert float(mass_threshold(scores, tau)) == pytest.approx(_np_threshold(scores, tau), rel=1e-6)
    tok, err = kinds == "t", kinds == "e"
    rep, comp = graph_scores(a, w, tok, err)
    assert float(rep) == pytest.approx(inf[tok].sum() / (inf[tok].sum() + inf[err].sum()), rel=1e-4)
    want = ((1 - a_hat[:, err].sum(1)) * (inf + w)).sum() / (inf + w).sum()
    assert float(comp) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 3])
def test_pruning_keeps_what_the_sorted_definitions_keep(seed):
    a, w, kinds = _graph(seed, n_feat=20)
    always, feat = np.isin(kinds, ["t", "l"]), kinds == "f"
    inf = _np_influence(_np_normalise(a), w)
    nodes = (inf >= _np_threshold(inf, 0.8)) | always
    p = np.where(nodes[:, None] & nodes[None, :], a, 0)
    p_hat = _np_normalise(p)
    score = p_hat * (_np_influence(p_hat, w) + w)[:, None]
    edges = (score >= _np_threshold(score, 0.98)) & (score > 0)
    while True:
        out_ok, in_ok = edges.any(0), edges.any(1)
        new = nodes & (always | (out_ok & (in_ok | ~feat)))
        edges &= new[:, None] & new[None, :]
        if (new == nodes).all():
            break
        nodes = new
    got = prune(a, w, always, feat)
    np.testing.assert_array_equal(np.asarray(got.node_mask), nodes)
    np.testing.assert_array_equal(np.asarray(got.edge_mask), edges)
    assert 0 < nodes[feat].sum() < feat.sum() and edges.sum() < (a != 0).sum()  # something pruned, something kept


@pytest.mark.parametrize("seed", [0, 3])
def test_pruning_on_the_rows_alone_equals_pruning_the_dense_matrix(seed):
    """A graph held as its non-empty rows (features and logits) prunes and scores as the dense
    matrix with zero rows for errors and tokens does."""
    a, w, kinds = _graph(seed)
    rows = np.nonzero(np.abs(a).sum(1) > 0)[0]
    assert len(rows) < len(a) and set(kinds[rows]) == {"f", "l"}
    always, prunable = kinds == "t", kinds == "f"
    always |= kinds == "l"
    dense = prune(a, w, always, prunable)
    part = prune(a[rows], w, always, prunable, row_nodes=rows)
    np.testing.assert_array_equal(np.asarray(part.node_mask), np.asarray(dense.node_mask))
    np.testing.assert_array_equal(np.asarray(part.edge_mask), np.asarray(dense.edge_mask)[rows])
    assert not np.asarray(dense.edge_mask)[np.setdiff1d(np.arange(len(a)), rows)].any()
    for x, y in zip(graph_scores(a[rows], w, kinds == "t", kinds == "e", row_nodes=rows),
                    graph_scores(a, w, kinds == "t", kinds == "e")):
        assert float(x) == pytest.approx(float(y), rel=1e-5)
