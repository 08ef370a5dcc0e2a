"""Attribution graphs: the same graphs as circuit-tracer 0.5.0 (its own output on a tiny Llama with a
per-layer skip-transcoder set and a CLT, in tests/data/circuit_tracer_graphs), every edge the exact
change of its target in the frozen model, the frozen model linear, the CLI's files and the viewer."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_DECODERS, chromium_or_skip, subprocess_env, tiny_model

from conftest import REPO
from jaxinterp.circuits import attribution as at
from jaxinterp.circuits import graph_files as gf
from jaxinterp.dictionaries import clt
from jaxinterp.dictionaries.artifact import load_dictionary
from jaxinterp.errors import UsageError
from jaxinterp.models.hf import load_hf

REF = Path(REPO) / "tests" / "data" / "circuit_tracer_graphs"
IDS = [1, 5, 9, 4, 12, 7]


@pytest.fixture(scope="module")
def ref_model():
    return load_hf(REF / "model")


@pytest.mark.parametrize("kind", ["set", "clt"])
@pytest.mark.parametrize("max_nodes", [None, 20])
def test_graphs_equal_circuit_tracers_node_by_node_and_edge_by_edge(ref_model, kind, max_nodes):
    ref = np.load(REF / f"{kind}_graph{'_m20' if max_nodes else ''}.npz")
    d = load_dictionary(REF / kind)
    assert (d.spec.span, d.spec.skip) == ((1, True) if kind == "set" else (None, False))
    g = at.attribute(ref_model, IDS, d.spec, d.params, at.AttributionConfig(max_feature_nodes=max_nodes))
    np.testing.assert_array_equal(g.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(g.active_features, ref["active_features"])
    np.testing.assert_allclose(g.activation_values, ref["activation_values"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(g.selected_features, ref["selected_features"])
    np.testing.assert_array_equal(g.logit_token_ids, ref["logit_token_ids"])
    np.testing.assert_allclose(g.logit_probabilities, ref["logit_probabilities"], rtol=1e-5)
    adj = g.adjacency()
    assert adj.shape == ref["adjacency"].shape
    np.testing.assert_array_equal(adj != 0, ref["adjacency"] != 0)  # the same structure: no edge added or missed
    np.testing.assert_allclose(adj, ref["adjacency"], atol=1e-5 * np.abs(ref["adjacency"]).max())
    pr = gf.prune_graph(g)
    np.testing.assert_array_equal(pr.node_mask, ref["node_mask"])
    edge_mask = np.zeros_like(adj, bool)
    edge_mask[g.row_nodes] = pr.edge_mask
    np.testing.assert_array_equal(edge_mask, ref["edge_mask"])
    np.testing.assert_allclose(pr.cumulative, ref["cumulative_scores"], atol=1e-5)
    assert pr.replacement_score == pytest.approx(float(ref["replacement_score"]), abs=1e-5)
    assert pr.completeness_score == pytest.approx(float(ref["completeness_score"]), abs=1e-5)


def test_the_loaded_model_computes_circuit_tracers_logits(ref_model):
    from jaxinterp.models import forward

    ref = np.load(REF / "set_graph.npz")
    logits = np.asarray(forward(ref_model, jnp.asarray([IDS])).logits[0])
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)


def _transcoders(model, kind: str, seed: int = 0):
    """Random transcoders for a tiny model: a per-layer skip-transcoder set (span 1) or a top-k CLT
    of span 2 (or a JumpReLU CLT with skips), with about a third of the features firing."""
    cfg = model.cfg
    if kind == "skip-set":
        spec = clt.CLTSpec("jumprelu", n_layers=cfg.n_layers, d_model=cfg.d_model, d_sae=16, span=1, skip=True)
    elif kind == "topk":
        spec = clt.CLTSpec("topk", n_layers=cfg.n_layers, d_model=cfg.d_model, d_sae=16, k=4, span=2)
    else:
        spec = clt.CLTSpec("jumprelu", n_layers=cfg.n_layers - 1, d_model=cfg.d_model, d_sae=16, skip=True,
                           first_layer=1, input_point="mlp_in")
    rng = np.random.default_rng(seed)
    p = dict(clt.init(jax.random.key(seed), spec))
    p["W_enc"] = jnp.asarray(rng.normal(0, 0.3, p["W_enc"].shape), jnp.float32)
    p["norm_in"] = jnp.asarray(rng.uniform(0.5, 1.5, spec.n_layers), jnp.float32)
    p["norm_out"] = jnp.asarray(rng.uniform(0.5, 1.5, spec.n_layers), jnp.float32)
    for l in range(spec.n_layers):
        p[f"W_dec_{l}"] = jnp.asarray(rng.normal(0, 0.2, p[f"W_dec_{l}"].shape), jnp.float32)
    if "threshold" in p:
        p["threshold"] = jnp.full(p["threshold"].shape, 0.8, jnp.float32)
    if spec.skip:
        p["W_skip"] = jnp.asarray(rng.normal(0, 0.1, p["W_skip"].shape), jnp.float32)
    return spec, p


CASES = [("llama", "skip-set"), ("llama", "topk"), ("gemma-like", "partial"), ("gpt2-like", "topk")]


@pytest.mark.parametrize("family,kind", CASES)
def test_every_edge_is_the_frozen_models_exact_change(family, kind):
    """Each checked edge against the frozen model (patterns, norm scales and MLP outputs held at the
    prompt's): the source's vector added where it writes, the target's read change, float32."""
    model = tiny_model(TINY_DECODERS[family])
    spec, p = _transcoders(model, kind)
    g = at.attribute(model, [3, 11, 7, 20, 9, 14, 5], spec, p, at.AttributionConfig(max_feature_nodes=30))
    kinds = g.node_kinds()
    assert g.n_features == 30 and (g.rows != 0).any()
    ch = at.check_edges(model, spec, p, g, 400)
    assert set(kinds[ch.source]) == {0, 1, 2} and set(kinds[ch.target]) == {0, 3}  # every kind of edge checked
    s = ch.summary(floor=1e-3)
    assert s["edges_above_floor"] > 100 and s["max_relative_error"] < 1e-4
    assert s["max_error_vs_largest"] < 1e-6


def test_no_edge_runs_backwards_in_layers_or_positions():
    model = tiny_model(TINY_DECODERS["llama"])
    spec, p = _transcoders(model, "topk")
    g = at.attribute(model, [3, 11, 7, 20, 9, 14], spec, p)
    feats = g.active_features[g.selected_features]
    m = g.n_features
    f_rows = g.rows[:m, :m]
    later_layer = feats[:, 0][None, :] >= feats[:, 0][:, None]  # source layer >= target layer
    later_pos = feats[:, 1][None, :] > feats[:, 1][:, None]
    assert not f_rows[later_layer | later_pos].any()
    assert f_rows.any() and (g.rows[:, m:m + g.n_layers * g.n_pos].reshape(-1, g.n_layers, g.n_pos)[..., 0] == 0).all()


def test_the_frozen_map_is_linear_and_the_model_is_not():
    """Second-order check: f(x + u + v) - f(x + u) - f(x + v) + f(x) vanishes in the frozen model
    (patterns and norm scales held) and not when they are recomputed."""
    model = tiny_model(TINY_DECODERS["llama"])
    spec, p = _transcoders(model, "skip-set")
    prompt = at.prepare(model, [3, 11, 7, 20, 9, 14], spec, p)
    rng = np.random.default_rng(1)
    t, d, n = len(prompt.tokens), spec.d_model, model.cfg.n_layers
    u = {"embed": rng.normal(0, 1, (t, d)), "mlp": rng.normal(0, 1, (n, t, d))}
    v = {"embed": rng.normal(0, 1, (t, d)), "mlp": rng.normal(0, 1, (n, t, d))}
    zero = jax.tree.map(np.zeros_like, u)
    batch = {k: np.stack([zero[k], u[k], v[k], u[k] + v[k]]).astype(np.float32) for k in u}

    def second_order(held):
        ins, fin = at.frozen_reads(model, spec, p, prompt, batch, held=held)
        out = []
        for a in (ins, fin):
            a = np.asarray(a, np.float64)
            out.append(np.abs(a[3] - a[1] - a[2] + a[0]).max() / np.abs(a[1] - a[0]).max())
        return max(out)

    assert second_order(prompt.held) < 1e-5
    assert second_order({}) > 1e-2


def test_a_small_memory_budget_computes_the_same_graph_in_smaller_chunks():
    model = tiny_model(TINY_DECODERS["llama"])
    spec, p = _transcoders(model, "topk")
    big = at.attribute(model, [3, 11, 7, 20, 9], spec, p)
    small = at.attribute(model, [3, 11, 7, 20, 9], spec, p, at.AttributionConfig(memory_gib=2e-4))
    assert small.timings["chunk_rows"] < big.timings["chunk_rows"]
    np.testing.assert_allclose(small.rows, big.rows, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="memory_gib"):
        at.attribute(model, [3, 11, 7, 20, 9], spec, p, at.AttributionConfig(memory_gib=1e-7))
    with pytest.raises(UsageError, match="at least 2 ids"):
        at.attribute(model, [3], spec, p)
    with pytest.raises(UsageError, match="cover layers"):
        at.attribute(tiny_model(dataclasses.replace(TINY_DECODERS["llama"], n_layers=2)), [3, 4, 5], spec, p)


def test_bos_is_prepended_as_circuit_tracer_does():
    class Tok:
        bos_id, pad_id, eos_id, special_ids = 0, 3, 2, (0, 2, 3)

    assert at.with_bos([5, 6], Tok()) == [3, 5, 6]  # id 0 is skipped, as circuit-tracer's filter(None, ...) does
    assert at.with_bos([2, 5], Tok()) == [2, 5]

    class Declared(Tok):  # an HF tokenizer's own files: BOS 0 skipped, no PAD, so EOS
        declared_special = {"bos": 0, "pad": None, "eos": 2}

    assert at.with_bos([5, 6], Declared()) == [2, 5, 6]


def test_the_cli_writes_circuit_tracers_graph_a_frontend_json_and_a_viewer(tmp_path):
    out = tmp_path / "graph.json"
    cmd = [sys.executable, "launch/attribute.py", "--model", str(REF / "model"), "--dictionary", str(REF / "clt"),
           "--prompt", "w5 w9 w4 w12 w7", "--out", str(out), "--html", str(tmp_path / "graph.html"), "--check", "20",
           "--ablate", "3"]
    res = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["check"]["edges"] == 20 and summary["check"]["max_relative_error"] < 1e-4
    assert summary["ablation"]["features"] == 3 and len(summary["top_logits"]) == 10
    z, ref = np.load(tmp_path / "graph.npz"), np.load(REF / "clt_graph.npz")
    for k in ("input_ids", "active_features", "selected_features", "logit_token_ids"):
        np.testing.assert_array_equal(z[k], ref[k])
    np.testing.assert_allclose(z["adjacency"], ref["adjacency"], atol=1e-5 * np.abs(ref["adjacency"]).max())
    doc = json.loads(out.read_text())
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    assert doc["metadata"]["prompt_tokens"] == ["<bos>", "w5", "w9", "w4", "w12", "w7"]
    ids = {n["node_id"] for n in doc["nodes"]}
    assert all(lk["source"] in ids and lk["target"] in ids for lk in doc["links"])
    types = {n["feature_type"] for n in doc["nodes"]}
    assert {"cross layer transcoder", "embedding", "logit"} <= types
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == 10 and sum(n["is_target_logit"] for n in logits) == 1
    assert all(n["node_id"] == f"4_{n['feature']}_5" for n in logits)  # {n_layers + 1}_{token}_{last position}
    tokens = sorted((n for n in doc["nodes"] if n["feature_type"] == "embedding"), key=lambda n: n["ctx_idx"])
    assert [n["node_id"] for n in tokens] == [f"E_{t}_{i}" for i, t in enumerate(IDS)]
    assert len(doc["nodes"]) <= int(z["node_mask"].sum()) and len(doc["links"]) == len(z["edge_weights"]) > 0
    _viewer_in_chromium(tmp_path / "graph.html", doc)


def _viewer_in_chromium(page_path: Path, doc: dict):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    browser_path = chromium_or_skip()
    artifacts = Path(os.environ.get("JAXINTERP_TEST_ARTIFACTS", Path(REPO) / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "attribution-graph.png"
    shot.unlink(missing_ok=True)
    feature = max((n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"),
                  key=lambda n: sum(lk["target"] == n["node_id"] for lk in doc["links"]))
    n_in = sum(lk["target"] == feature["node_id"] for lk in doc["links"])
    n_out = sum(lk["source"] == feature["node_id"] for lk in doc["links"])
    errors = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 700})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.as_uri())
        assert page.locator(".node").count() == len(doc["nodes"])
        assert page.locator("path.edge").count() == len(doc["links"])
        page.locator(f'.node[data-id="{feature["node_id"]}"]').click()
        assert page.locator("#sel-title").inner_text().startswith(f"feature L{feature['layer']} #")
        assert page.locator("#inputs tr").count() == min(10, n_in)
        assert page.locator("#outputs tr").count() == min(10, n_out)
        assert page.locator(".node.sel").count() == 1
        page.screenshot(path=str(shot))
        browser.close()
    assert not errors, errors
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1200


def test_graph_node_ids_steer_generation_at_their_position(ref_model, tmp_path):
    """`{layer}_{feature}_{pos}:ablate` takes the feature out at that position only: the forward
    equals the model with the feature's decoder writes removed there, as the ablation check does."""
    from jaxinterp.models import forward
    from jaxinterp.steering.clt import parse_node_steer, steer_nodes

    d = load_dictionary(REF / "clt")
    g = at.attribute(ref_model, IDS, d.spec, d.params)
    feats = g.active_features[(g.active_features[:, 0] == 1) & (g.active_features[:, 1] == 3)][:2]
    assert len(feats) == 2
    nodes = [parse_node_steer(f"{l}_{f}_{p}:ablate") for l, p, f in feats]
    assert nodes[0] == ((int(feats[0][0]), int(feats[0][2]), 3), "ablate", 0.0)
    plan, ep = steer_nodes(d.spec, d.params, nodes)
    steered = np.asarray(forward(ref_model, jnp.asarray([IDS]), plan=plan, edit_params=ep).logits[0, -1])
    idx = [int(np.nonzero((g.active_features == f).all(1))[0][0]) for f in feats]
    deltas = at._feature_writes(d.spec, d.params, g.n_layers, g.n_pos, g.active_features[idx], g.activation_values[idx])
    assert np.abs(deltas[:, 3]).max() > 0 and not np.abs(np.delete(deltas, 3, axis=1)).any()
    np.testing.assert_allclose(steered, at._with_mlp_deltas(ref_model, IDS, deltas), atol=1e-4)
    assert parse_node_steer("blocks.3.mlp_out:feature=2:add=1") is None
    with pytest.raises(UsageError, match="ablate"):
        parse_node_steer("1_2_3:ablate=4")
    with pytest.raises(UsageError, match="one mode"):
        steer_nodes(d.spec, d.params, [nodes[0], ((1, 0, 2), "scale", 2.0)])
    l, p, f = feats[0]
    cmd = [sys.executable, "launch/generate.py", "--model", str(REF / "model"), "--dictionary", str(REF / "clt"),
           "--prompt", "w5 w9 w4 w12 w7", "--max-new-tokens", "4", "--json", "--steer", f"{l}_{f}_{p}:scale=40"]
    res = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["steered"] != out["unsteered"]


def test_the_viewer_links_each_features_dashboard_page(tmp_path):
    from jaxinterp.circuits.viewer import write_viewer

    doc = {"metadata": {"prompt": "a <b>", "prompt_tokens": ["a", " <b>"]}, "qParams": {}, "links": [],
           "nodes": [{"node_id": "1_3_1", "layer": "1", "feature_type": "cross layer transcoder", "ctx_idx": 1},
                     {"node_id": "2_5_1", "layer": "2", "feature_type": "cross layer transcoder", "ctx_idx": 1}]}
    dash = tmp_path / "dash"
    (dash / "layer_1" / "f").mkdir(parents=True)
    (dash / "layer_1" / "f" / "3.html").write_text("<p>contexts</p>")
    page = write_viewer(tmp_path / "view" / "g.html", doc, dashboard=dash).read_text()
    data = json.loads(page.split('id="dash-data">')[1].split("</script>")[0])
    assert data == {"1_3": "../dash/layer_1/f/3.html"}
    assert "<title>a &lt;b></title>" in page
