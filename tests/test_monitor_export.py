"""Prometheus export of drift reports, and the sparse feature cache."""

import re
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxinterp.dictionaries import sae
from jaxinterp.monitor import drift
from jaxinterp.monitor import stats as st
from jaxinterp.monitor.feature_cache import FeatureCache, from_dense
from jaxinterp.monitor.metrics import MetricsExporter, fires_from_state

SITES = ("blocks.1.resid_post", "blocks.2.resid_post")


def site_report(kl, window_kl, dead_ratio, n_shifted, newly_dead, newly_active, tokens):
    return {"kl_divergence": kl, "window_kl": window_kl, "dead_ratio": dead_ratio, "n_shifted": n_shifted,
            "shifted_features": list(range(n_shifted)), "dead_features": [], "top_features": [0, 1],
            "newly_dead": newly_dead, "newly_active": newly_active, "tokens": tokens, "window_checks": 1}


def families(text):
    """{sample name: {site (or None): value}} and the family types."""
    values, types = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            assert set(s.labels) <= {"site", "le"}, s
            assert "le" not in s.labels or fam.type == "histogram", s
            if "le" not in s.labels:
                values.setdefault(s.name, {})[s.labels.get("site")] = s.value
    return values, types


def two_reports(exporter):
    exporter.observe_report({SITES[0]: site_report(0.5, 0.2, 0.25, 3, [4, 7], [1], tokens=100),
                             SITES[1]: site_report(0.1, 0.0, 0.0, 0, [], [], tokens=40)},
                            fires={SITES[0]: 900.0, SITES[1]: 300.0})
    # site 1 keeps counting; site 2's monitor restarted (totals smaller than before)
    exporter.observe_report({SITES[0]: site_report(0.75, 0.3, 0.5, 5, [4], [1, 2, 3], tokens=160),
                             SITES[1]: site_report(0.2, 0.1, 0.125, 1, [9], [], tokens=10)},
                            fires={SITES[0]: 1500.0, SITES[1]: 70.0})
    exporter.observe_generation(12)
    exporter.observe_generation(30)
    exporter.observe_steering_overhead(0.003)
    exporter.observe_steering_overhead(0.2)


def check_exposition(text):
    values, types = families(text)
    a, b = SITES
    assert values["jaxinterp_feature_fires_total"] == {a: 1500.0, b: 300.0 + 70.0}
    assert values["jaxinterp_tokens_total"] == {a: 160.0, b: 40.0 + 10.0}
    assert values["jaxinterp_generated_tokens_total"] == {None: 42.0}
    assert values["jaxinterp_drift_kl"] == {a: 0.75, b: 0.2}
    assert values["jaxinterp_window_drift_kl"] == {a: 0.3, b: 0.1}
    assert values["jaxinterp_dead_features_ratio"] == {a: 0.5, b: 0.125}
    assert values["jaxinterp_shifted_features"] == {a: 5.0, b: 1.0}
    assert values["jaxinterp_newly_dead_features"] == {a: 1.0, b: 1.0}
    assert values["jaxinterp_newly_active_features"] == {a: 3.0, b: 0.0}
    assert values["jaxinterp_steering_overhead_seconds_count"] == {None: 2.0}
    assert values["jaxinterp_steering_overhead_seconds_sum"] == {None: pytest.approx(0.203)}
    for name in ("jaxinterp_feature_fires", "jaxinterp_tokens", "jaxinterp_generated_tokens"):
        assert types[name] == "counter"
    for name in ("drift_kl", "window_drift_kl", "dead_features_ratio", "shifted_features", "newly_dead_features",
                 "newly_active_features"):
        assert types[f"jaxinterp_{name}"] == "gauge"
    assert types["jaxinterp_steering_overhead_seconds"] == "histogram"
    for name in values:
        assert re.fullmatch(r"jaxinterp_[a-z_]+", name), name
        assert not name.endswith("_total_total"), name
        # only counters end in _total; the timing histogram is in base units
        assert not name.endswith("_total") or types[name.removesuffix("_total")] == "counter", name


def test_metrics_text_counts_deltas_and_keeps_latest_gauges():
    exporter = MetricsExporter()
    two_reports(exporter)
    check_exposition(exporter.text())
    # a second exporter has its own registry
    assert "jaxinterp_tokens_total{" not in MetricsExporter().text()


def test_metrics_served_over_http():
    exporter = MetricsExporter()
    two_reports(exporter)
    server = exporter.serve(0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            check_exposition(resp.read().decode())
    finally:
        server.shutdown()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_metrics_rejects_a_report_that_is_not_drift_reports():
    exporter = MetricsExporter()
    with pytest.raises(ValueError, match=r"lacks \['window_kl'.*drift_report"):
        exporter.observe_report({"s": {"kl_divergence": 0.1}})
    with pytest.raises(ValueError, match="fires total"):
        exporter.observe_report({"s": site_report(0.1, 0.0, 0.0, 0, [], [], 5)}, fires={"s": -1.0})
    assert "jaxinterp_tokens_total{" not in exporter.text()


def test_observe_report_of_a_real_drift_report():
    f = 8
    state = drift.init(None, f)
    acts = jnp.abs(jax.random.normal(jax.random.key(1), (20, f))) * (jnp.arange(f) % 2)
    state = drift.observe(state, acts, window=10)
    exporter = MetricsExporter()
    exporter.observe_report(drift.drift_report({"s": state}), fires={"s": fires_from_state(state)})
    values, _ = families(exporter.text())
    assert fires_from_state(state) == fires_from_state(state.total) == 20.0 * 4
    assert values["jaxinterp_feature_fires_total"] == {"s": 80.0}
    assert values["jaxinterp_tokens_total"] == {"s": 20.0}
    with pytest.raises(TypeError, match="DriftState or Stats"):
        fires_from_state(st.empty(4).count)


# ---------------------------------------------------------------------------------------------
# feature cache


def test_cached_topk_code_reconstructs_the_dictionary_output():
    k = 4
    spec = sae.DictionarySpec("topk", d_in=16, d_sae=48, k=k)
    params = sae.init(jax.random.key(0), spec)
    params |= {"b_dec": jax.random.normal(jax.random.key(2), (16,)), "norm_scale": jnp.asarray(0.5, jnp.float32)}
    x = jax.random.normal(jax.random.key(1), (7, 16))
    cache = FeatureCache(max_bytes=10_000)
    cache.put("req", "blocks.0", *from_dense(sae.encode(spec, params, x), k))
    got = cache.reconstruct("req", "blocks.0", spec, params)
    np.testing.assert_allclose(got, sae.reconstruct(spec, params, x), atol=1e-5)
    ids, values = cache.get("req", "blocks.0")
    assert ids.shape == values.shape == (7, k) and ids.dtype == np.int32 and values.dtype == np.float32
    assert cache.nbytes == 2 * 7 * k * 4
    with pytest.raises(ValueError, match="out of range for d_sae=8"):
        cache.reconstruct("req", "blocks.0", sae.DictionarySpec("topk", d_in=16, d_sae=8, k=k), params)


def test_lru_evicts_the_least_recently_used_request_whole():
    entry = 2 * 3 * 2 * 4  # ids + values, T=3, K=2
    cache = FeatureCache(max_bytes=3 * entry + entry // 2)
    code = (np.zeros((3, 2), np.int64), np.ones((3, 2), np.float32))
    cache.put("a", "s0", *code)
    cache.put("b", "s0", *code)
    cache.put("b", "s1", *code)
    cache.get("a", "s0")  # a is now the most recently used; b goes first
    cache.put("c", "s0", *code)
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    assert cache.nbytes == 2 * entry <= cache.max_bytes
    cache.put("a", "s0", *code)  # replacing an entry does not double count
    assert cache.nbytes == 2 * entry
    cache.put("d", "s0", *code)
    cache.put("e", "s0", *code)  # c was used least recently
    assert sorted(r for r in "abcde" if r in cache) == ["a", "d", "e"]
    assert cache.nbytes == 3 * entry <= cache.max_bytes
    half = (np.zeros((3, 2), np.int32), np.ones((3, 2), np.float16))
    cache.put("f", "s0", *half)
    assert cache.get("f", "s0").values.dtype == np.float16
    assert "a" not in cache and cache.nbytes == 2 * entry + 3 * 2 * 6 <= cache.max_bytes


def test_entry_over_the_bound_and_missing_keys():
    cache = FeatureCache(max_bytes=100)
    with pytest.raises(ValueError, match=r"entry needs 160 bytes .*over max_bytes=100"):
        cache.put("r", "s", np.zeros((10, 2), np.int32), np.zeros((10, 2), np.float32))
    assert len(cache) == 0 and cache.nbytes == 0
    cache.put("r", "s", np.zeros((5, 1), np.int32), np.zeros((5, 1), np.float32))
    with pytest.raises(ValueError, match=r"request 'r' with this entry needs 104 bytes"):
        cache.put("r", "t", np.zeros((4, 2), np.int32), np.zeros((4, 2), np.float32))
    assert cache.sites("r") == ["s"] and cache.nbytes == 40
    with pytest.raises(KeyError, match="request 'nope' not cached"):
        cache.get("nope", "s")
    with pytest.raises(KeyError, match=r"site 'blocks.3' not cached for request 'r'; its sites are \['s'\]"):
        cache.get("r", "blocks.3")
    with pytest.raises(ValueError, match="both be \\[T, K\\]"):
        cache.put("r", "s", np.zeros((5, 1), np.int32), np.zeros((5, 2), np.float32))
