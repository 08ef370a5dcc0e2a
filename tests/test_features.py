"""Feature statistics over a corpus against a brute-force NumPy computation."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import features


def _fmix32(h):
    h = np.uint32(h)
    h ^= h >> np.uint32(16)
    h = np.uint32((int(h) * 0x85EBCA6B) & 0xFFFFFFFF)
    h ^= h >> np.uint32(13)
    h = np.uint32((int(h) * 0xC2B2AE35) & 0xFFFFFFFF)
    return h ^ (h >> np.uint32(16))


def _key(loc, f):
    """murmur3's finaliser of the location, xor the feature times the golden ratio, halved."""
    h = int(_fmix32(int(_fmix32(loc)) ^ ((f * 0x9E3779B9) & 0xFFFFFFFF)))
    return min(h >> 1, 2**31 - 2)


def _brute(acts, locs, k, s=0):
    """Every feature's top k (value, location) by (-value, location), its s firing tokens of the
    smallest keys, counts, sums, maxima, histogram."""
    n_bins = len(features.HIST_EDGES) - 1
    lo, width = features.HIST_EDGES[0], features.HIST_EDGES[1] - features.HIST_EDGES[0]
    out = []
    for f in range(acts.shape[1]):
        col = acts[:, f]
        on = np.flatnonzero(col > 0)
        order = on[np.lexsort((locs[on], -col[on]))][:k]
        keys = np.asarray([_key(int(locs[i]), f) for i in on], np.int64)
        sampled = on[np.lexsort((locs[on], keys))][:s] if len(on) else on
        bins = np.clip(np.floor((np.log10(col[on]) - lo) / width), 0, n_bins - 1).astype(int)
        out.append({"top": [(int(locs[i]), float(col[i])) for i in order], "count": len(on), "total": col.sum(),
                    "max": col.max(initial=0.0), "hist": np.bincount(bins, minlength=n_bins),
                    "sample": [(int(locs[i]), float(col[i])) for i in sampled]})
    return out


def _check(stats, want, n):
    assert int(stats.n_rows) == n
    for i, w in enumerate(want):
        got = features.finalize_top(stats, i)
        assert [g[0] for g in got] == [t[0] for t in w["top"]], i
        np.testing.assert_allclose([g[1] for g in got], [t[1] for t in w["top"]], rtol=1e-6)
        got_sample = features.finalize_samples(stats, i)
        assert [g[0] for g in got_sample] == [t[0] for t in w["sample"]], i
        np.testing.assert_allclose([g[1] for g in got_sample], [t[1] for t in w["sample"]], rtol=1e-6)
        assert int(stats.count[i]) == w["count"]
        assert float(stats.total[i]) == pytest.approx(w["total"], rel=1e-5)
        assert float(stats.max[i]) == pytest.approx(w["max"], rel=1e-6)
        np.testing.assert_array_equal(np.asarray(stats.hist[i]), w["hist"])


def _stream(update, stats, acts, locs, batch):
    f = acts.shape[1]
    for s in range(0, len(acts), batch):
        a, l = acts[s : s + batch], locs[s : s + batch]
        pad = batch - len(a)  # the short last batch, padded with location -1
        a = np.concatenate([a, np.full((pad, f), 9.0, np.float32)])
        l = np.concatenate([l, np.full(pad, -1, np.int32)])
        stats = update(stats, jnp.asarray(a), jnp.asarray(l))
    return stats


def _tied_acts(n, f, seed=0):
    rng = np.random.default_rng(seed)
    # sparse activations on a few levels, so that many values tie; one feature never fires
    acts = rng.choice([0.5, 2.0, 3.0], size=(n, f)) * (rng.random((n, f)) < 0.15)
    acts[:, 3] = 0.0
    acts[:, 5] = np.where(rng.random(n) < 0.3, rng.lognormal(0.0, 2.0, n), 0.0)  # values across many bins
    return acts.astype(np.float32), np.arange(n, dtype=np.int32) * 3 + 11  # locations growing, not row indices


def test_sample_keys_are_the_documented_hash():
    locs, feats = np.asarray([0, 1, 11, 2**20 + 7, 2**31 - 1]), np.asarray([0, 3, 4095, 65535, 7])
    got = np.asarray(features.sample_key(jnp.asarray(locs, jnp.int32), jnp.asarray(feats, jnp.int32)))
    assert got.tolist() == [_key(int(l), int(f)) for l, f in zip(locs, feats)]


@pytest.mark.parametrize("batch,max_active", [(7, 64), (64, 64), (64, 1)])
def test_streaming_stats_equal_brute_force_with_ties(batch, max_active):
    """Top-k, the keyed sample, counts, sums, maxima and histograms against brute force, through the
    sparse branch and (max_active 1: more firing entries than room) the dense one."""
    from functools import partial

    n, f, k, s = 200, 12, 5, 6
    acts, locs = _tied_acts(n, f)
    stats = _stream(partial(features.update_stats, max_active=max_active), features.init_stats(f, k, s), acts,
                    locs, batch)
    _check(stats, _brute(acts, locs, k, s), n)
    assert features.finalize_top(stats, 3) == [] and int(stats.hist[5].astype(bool).sum()) > 5


def test_statistics_split_over_features_equal_one_device():
    """On a (data 2, model 4) mesh each device folds its own 4 of 16 features (keys hashed with the
    global feature id): the same state as one device, laid out as the rules table declares."""
    import jax

    n, f, k, s = 120, 16, 4, 5
    acts, locs = _tied_acts(n, f, seed=1)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    update = features.sharded_update(mesh)
    sharded = _stream(update, features.place_stats(mesh, features.init_stats(f, k, s)), acts, locs, 32)
    one = _stream(features.update_stats, features.init_stats(f, k, s), acts, locs, 32)
    assert sharded.top_vals.sharding.spec[0] == "model"
    for name, a, b in zip(features.FeatureStats._fields, one, sharded):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    _check(jax.device_get(sharded), _brute(acts, locs, k, s), n)


def test_quantile_groups_split_the_sample_by_value():
    samples = [(10 + i, v) for i, v in enumerate([5.0, 1.0, 3.0, 2.0, 4.0, 0.5, 6.0])]
    groups = features.quantile_groups(samples, 3)
    assert [(lo, hi) for lo, hi, _ in groups] == [(0.5, 2.0), (3.0, 4.0), (5.0, 6.0)]
    assert groups[0][2] == [(13, 2.0), (11, 1.0), (15, 0.5)]
    assert sum(len(g[2]) for g in groups) == len(samples) and features.quantile_groups([], 3) == []


def test_a_corpus_pass_equals_the_statistics_of_all_its_tokens():
    """`corpus_stats` over a model's site, in batches of contexts with a short last one, equals the
    brute force over every non-BOS token's features, and each location names its token back."""
    import jax

    from jaxinterp import dictionaries as dl
    from jaxinterp.data.activations import site_activations
    from helpers import TINY_DECODERS, tiny_model

    model = tiny_model(TINY_DECODERS["llama"])
    site, d, f, k = "blocks.1.resid_post", model.cfg.d_model, 48, 6
    spec = dl.DictionarySpec("topk", d, f, k=4)
    params = dl.init(jax.random.key(1), spec) | {"b_enc": 0.3 * jax.random.normal(jax.random.key(2), (f,))}
    dictionary = dl.Dictionary(spec, params, site=site)
    contexts = np.random.default_rng(0).integers(1, model.cfg.vocab_size, size=(11, 9)).astype(np.int32)
    stats = features.corpus_stats(model, dictionary, contexts, k=k, batch_contexts=4)

    acts = np.asarray(dictionary.encode(site_activations(model, contexts, site)))
    locs = (np.arange(11)[:, None] * 9 + np.arange(1, 9)[None, :]).reshape(-1)
    want = _brute(acts, locs, k)
    assert int(stats.n_rows) == 11 * 8 and sum(w["count"] for w in want) > 11 * 8  # features fire
    for i, w in enumerate(want):
        got = features.finalize_top(stats, i)
        assert [g[0] for g in got] == [t[0] for t in w["top"]], i
        np.testing.assert_allclose([g[1] for g in got], [t[1] for t in w["top"]], rtol=1e-5)
        assert int(stats.count[i]) == w["count"]
        np.testing.assert_array_equal(np.asarray(stats.hist[i]), w["hist"])
    ctx, pos = features.locate(want[0]["top"][0][0], 9)
    assert 1 <= pos < 9 and acts[ctx * 8 + pos - 1, 0] == pytest.approx(want[0]["top"][0][1])


def test_logit_effects_are_the_decoder_rows_through_the_final_norm_and_unembedding():
    """Against the product done densely in NumPy, with a normalised dictionary (its rows in raw
    units) and chunks that do not divide d_sae."""
    import jax

    from jaxinterp import dictionaries as dl
    from helpers import TINY_DECODERS, tiny_model

    model = tiny_model(TINY_DECODERS["llama"])
    d, f, k = model.cfg.d_model, 20, 3
    spec = dl.DictionarySpec("topk", d, f, k=4)
    params = dl.init(jax.random.key(1), spec) | {"norm_scale": jnp.float32(0.25)}
    eff = features.logit_effects(model, dl.Dictionary(spec, params, site="blocks.1.resid_post"), k=k, chunk=7)
    head = np.asarray(model.embed[...]).T if model.lm_head is None else np.asarray(model.lm_head[...])
    full = (np.asarray(params["W_dec"]) / 0.25 * np.asarray(model.final_norm.weight[...])) @ head
    want_pos = np.argsort(-full, axis=1, kind="stable")[:, :k]
    want_neg = np.argsort(full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(eff.pos_ids), want_pos)
    np.testing.assert_array_equal(np.asarray(eff.neg_ids), want_neg)
    np.testing.assert_allclose(np.asarray(eff.pos_vals), np.take_along_axis(full, want_pos, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(eff.neg_vals), np.take_along_axis(full, want_neg, 1), rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(eff.pos_vals)[:, 0] > 0) and np.all(np.asarray(eff.neg_vals)[:, 0] < 0)
    # the histogram of every vocabulary effect, 50 equal bins from the feature's min to its max (both ends in)
    for i in range(f):
        edges = np.asarray(eff.hist_edges(i))
        assert edges[0] == pytest.approx(full[i].min(), abs=1e-4) and edges[-1] == pytest.approx(full[i].max(), abs=1e-4)
        want = np.bincount(np.clip(np.floor((full[i] - edges[0]) / (edges[1] - edges[0])), 0, 49).astype(int), minlength=50)
        got = np.asarray(eff.hist[i])
        assert got.sum() == full.shape[1]
        # a value within float32 rounding of an inner edge may land on either side of it
        near = np.sum(np.min(np.abs(full[i][:, None] - edges[None, 1:-1]), 1) < 1e-4)
        assert np.abs(got - want).sum() <= 2 * near


def _tiny_dictionary(model, f=48, seed=1):
    import jax

    from jaxinterp import dictionaries as dl

    spec = dl.DictionarySpec("topk", model.cfg.d_model, f, k=4)
    params = dl.init(jax.random.key(seed), spec) | {"b_enc": 0.3 * jax.random.normal(jax.random.key(seed + 1), (f,))}
    return dl.Dictionary(spec, params, site="blocks.1.resid_post")


def test_what_fires_here_and_contrastive_search_equal_their_formulas():
    from jaxinterp.data.activations import site_activations
    from jaxinterp.errors import UsageError
    from helpers import TINY_DECODERS, tiny_model

    model = tiny_model(TINY_DECODERS["llama"])
    dictionary = _tiny_dictionary(model)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, model.cfg.vocab_size, size=10).tolist()
    here = features.fires_here(model, dictionary, prompt, k=3)
    acts = np.asarray(dictionary.encode(site_activations(model, np.asarray([prompt]), dictionary.site)))
    assert np.all(here.ids[0] == -1)
    for t in range(1, 10):
        order = np.argsort(-acts[t - 1], kind="stable")[:3]
        np.testing.assert_array_equal(here.ids[t], np.where(acts[t - 1][order] > 0, order, -1))
        np.testing.assert_allclose(here.values[t], acts[t - 1][order], rtol=1e-5, atol=1e-6)

    # texts of different lengths (padding masked), and batches that split the sets
    texts_a = [rng.integers(1, 8, size=n).tolist() for n in (6, 9, 4, 7, 5)]
    texts_b = [rng.integers(8, model.cfg.vocab_size, size=n).tolist() for n in (8, 5, 6)]
    got = features.contrast(model, dictionary, texts_a, texts_b, k=5, batch=2)

    def per_token(texts):
        return np.concatenate([np.asarray(dictionary.encode(site_activations(model, np.asarray([x]), dictionary.site)))
                               for x in texts]).astype(np.float64)

    a, b = per_token(texts_a), per_token(texts_b)
    pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
    d = np.where(pooled > 0, (a.mean(0) - b.mean(0)) / np.maximum(pooled, 1e-12), 0.0)
    np.testing.assert_array_equal(got.ids, np.argsort(-d, kind="stable")[:5])
    np.testing.assert_allclose(got.effect_size, d[got.ids], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.mean_a, a.mean(0)[got.ids], rtol=1e-4, atol=1e-6)
    assert got.effect_size[0] > 0.5  # token sets this different separate some feature clearly
    with pytest.raises(UsageError, match="at least two tokens past BOS"):
        features.contrast(model, dictionary, [[1, 2]], texts_b)


def test_a_pass_resumed_from_saved_stats_equals_one_pass(tmp_path):
    """Half the corpus, saved and loaded (as after a crash), then the rest from the saved context:
    the same state as one uninterrupted pass."""
    from helpers import TINY_DECODERS, tiny_model

    model = tiny_model(TINY_DECODERS["llama"])
    dictionary = _tiny_dictionary(model)
    contexts = np.random.default_rng(3).integers(1, model.cfg.vocab_size, size=(12, 9)).astype(np.int32)
    whole = features.corpus_stats(model, dictionary, contexts, k=4, batch_contexts=4)
    half = features.corpus_stats(model, dictionary, contexts[:8], k=4, batch_contexts=4)
    features.save_stats(tmp_path / "stats.npz", half, next_context=8)
    loaded, meta = features.load_stats(tmp_path / "stats.npz")
    resumed = features.corpus_stats(model, dictionary, contexts, k=4, batch_contexts=4, stats=loaded,
                                    start=meta["next_context"])
    assert meta == {"next_context": 8} and not (tmp_path / "stats.npz.tmp.npz").exists()
    for name, a, b in zip(features.FeatureStats._fields, whole, resumed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert int(whole.n_rows) == 12 * 8 and int(half.n_rows) == 8 * 8


def test_a_k_sparse_code_folds_to_the_statistics_of_the_dense_activations():
    """`encode_sparse` of a TopK dictionary is its dense encode's nonzeros, and statistics folded
    from the [N, K] code equal those folded from the dense [N, F] activations; kinds that select no
    k per row have no sparse code."""
    import jax

    from jaxinterp import dictionaries as dl

    d_in, f, k = 16, 40, 5
    spec = dl.DictionarySpec("topk", d_in, f, k=k)
    params = dl.init(jax.random.key(0), spec) | {"b_enc": -1.8 + 0.3 * jax.random.normal(jax.random.key(1), (f,))}
    dictionary = dl.Dictionary(spec, params, site="blocks.0.resid_post")
    x = np.asarray(jax.random.normal(jax.random.key(2), (96, d_in)))
    vals, ids = (np.asarray(a) for a in dictionary.encode_sparse(x))
    dense = np.asarray(dictionary.encode(x))
    assert vals.shape == ids.shape == (96, k)
    rebuilt = np.zeros_like(dense)
    np.put_along_axis(rebuilt, ids, vals, 1)
    np.testing.assert_allclose(rebuilt, dense, rtol=1e-6, atol=1e-7)
    assert (vals == 0).any() and (vals > 0).any()  # some rows keep fewer than k

    locs = (np.arange(96) * 2 + 5).astype(np.int32)
    locs[-7:] = -1  # padding rows count nowhere
    a = b = features.init_stats(f, 4, 6)
    for s in range(0, 96, 32):
        sl = slice(s, s + 32)
        a = features.update_stats(a, jnp.asarray(dense[sl]), jnp.asarray(locs[sl]))
        b = features.update_stats_sparse(b, jnp.asarray(vals[sl]), jnp.asarray(ids[sl]), jnp.asarray(locs[sl]))
    for name, u, v in zip(features.FeatureStats._fields, a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, err_msg=name)
    relu = dl.Dictionary(dl.DictionarySpec("relu", d_in, f), dl.init(jax.random.key(0), dl.DictionarySpec("relu", d_in, f)))
    assert relu.encode_sparse(x) is None


def test_non_activating_windows_hold_no_firing_token():
    """Windows drawn where the feature fires nowhere: every value 0 against the entries, each a
    real window of the corpus, and fewer than asked when the feature fires almost everywhere."""
    from jaxinterp.features.corpus import Entries
    from jaxinterp.features.examples import FeatureIndex, non_activating

    rng = np.random.default_rng(0)
    n, t, f = 30, 12, 3
    contexts = rng.integers(0, 50, size=(n, t)).astype(np.int32)
    strings = [f"<{i}>" for i in range(50)]
    locs = np.asarray([c * t + p for c in range(n) for p in range(1, t)], np.int32)
    fires = {0: rng.random(len(locs)) < 0.05, 1: np.ones(len(locs), bool), 2: np.zeros(len(locs), bool)}
    rows = [(l, g) for i, l in enumerate(locs) for g in range(f) if fires[g][i]]
    entries = Entries(np.asarray([l for l, _ in rows], np.int32), np.asarray([g for _, g in rows], np.int32),
                      np.ones(len(rows), np.float32))
    index = FeatureIndex(entries, f)
    got = non_activating(contexts, strings, index, 0, 10, left=3, right=2)
    on = set(locs[fires[0]].tolist())
    assert len(got) == 10 and len({e.location for e in got}) > 5
    for e in got:
        c, p = divmod(e.location, t)
        lo = max(1, p - 3)
        assert e.tokens == tuple(strings[i] for i in contexts[c, lo : min(t, p + 3)]) and e.focus == p - lo
        assert not any(c * t + q in on for q in range(lo, min(t, p + 3))) and not any(e.values)
    assert non_activating(contexts, strings, index, 1, 5) == []
    assert len(non_activating(contexts, strings, index, 2, 5)) == 5


@pytest.mark.parametrize("chunk", [50, 4_000_000])
def test_correlated_features_equal_numpy_on_the_dense_activations(chunk):
    """Co-firing counts and Pearson correlations (over every token, zeros included) from the firing
    entries equal numpy's on the dense matrix; chunks of pairs that split the tokens change nothing."""
    from jaxinterp.features.cofiring import correlated_features
    from jaxinterp.features.corpus import Entries

    rng = np.random.default_rng(5)
    n, f, top = 300, 9, 4
    acts = rng.lognormal(0, 0.5, (n, f)) * (rng.random((n, f)) < 0.3)
    acts[:, 2] = np.where(acts[:, 1] > 0, 2 * acts[:, 1], 0.0)  # fires exactly with feature 1
    acts[:, 7] = 0.0  # never fires
    locs = np.arange(n) * 5 + 3
    on = np.nonzero(acts > 0)  # row-major: location order
    entries = Entries(locs[on[0]].astype(np.int32), on[1].astype(np.int32), acts[on].astype(np.float32))
    got = correlated_features(entries, f, n, top=top, pairs_per_chunk=chunk)
    counts = (acts > 0).T.astype(int) @ (acts > 0).astype(int)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(acts.T)
    for a in range(f):
        ok = [b for b in range(f) if b != a and counts[a, b] > 0 and np.isfinite(corr[a, b])]
        want = sorted(ok, key=lambda b: (-corr[a, b], b))[:top]
        listed = [int(b) for b in got.ids[a] if b >= 0]
        assert listed == want, a
        np.testing.assert_allclose(got.pearson[a][: len(want)], corr[a, want], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.count[a][: len(want)], counts[a, want])
    assert got.ids[1][0] == 2 and got.pearson[1][0] == pytest.approx(1.0) and (got.ids[7] == -1).all()
