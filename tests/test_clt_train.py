"""Training cross-layer transcoders with the shared loop: the sharded step, the sparse decoder
backward, the memory refusal, and whole runs on a tiny model from live activations and a cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from helpers import write_corpus, write_tiny_gguf
from jaxinterp import dictionaries as dl
from jaxinterp.config import ConfigError, MeshConfig, config_from_dict, load_config
from jaxinterp.dictionaries import clt
from jaxinterp.errors import UsageError
from jaxinterp.train import clt_step, make_mesh, train
from jaxinterp.train.step import place_state

REPO = Path(__file__).resolve().parents[1]
L, D, F = 3, 8, 16


def _cfg(activation="jumprelu", **dictionary) -> object:
    return config_from_dict({
        "data": {"source": "cache", "path": "unused"},
        "dictionary": {"architecture": "clt", "activation": activation, "d_sae": F, "k": 3, "dead_tokens": 64,
                       "l0_coefficient": 0.01, "aux_k": 4, **dictionary},
        "train": {"tokens": 64 * 10, "batch_size": 64, "lr": 3e-3, "lr_warmup_steps": 0, "sparsity_warmup_steps": 2},
    })


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, L, D)).astype(np.float32) * np.array([1.0, 3.0, 0.5], np.float32)[None, :, None]
    y = np.tanh(x) @ rng.normal(0, 0.5, (D, D)).astype(np.float32) + 0.1 * np.roll(x, 1, axis=1)
    return np.concatenate([x.reshape(n, -1), y.reshape(n, -1)], 1).astype(np.float32)


@pytest.mark.parametrize("activation,span", [("jumprelu", None), ("topk", 2)])
def test_a_clt_step_on_a_4x2_mesh_equals_one_device(activation, span):
    cfg = _cfg(activation, clt={"span": span})
    spec = clt_step.make_spec(cfg, L, D)
    batches = [_rows(64, s) for s in range(5)]
    results = []
    for mesh_cfg in (MeshConfig(data=1, model=1), MeshConfig(data=4, model=2)):
        c = dataclasses.replace(cfg, mesh=mesh_cfg)
        state = clt_step.init_state(c, spec, [batches[0]])
        # half of each layer's features count as dead from the start, so the aux-k loss has work
        state = state._replace(tokens_since_fired=state.tokens_since_fired.at[:, ::2].set(10_000))
        chex.clear_trace_counter()
        fns = clt_step.build_step(c, spec, make_mesh(c.mesh), state, max_traces=1)
        state = place_state(state, fns)
        if mesh_cfg.model == 2:  # d_sae is split over the model axis, the batch over data
            assert state.params["W_enc"].sharding.spec[2] == "model"
            assert state.params["W_dec_0"].sharding.spec[0] == "model"
            assert state.tokens_since_fired.sharding.spec[1] == "model"
        auxes = []
        for i, b in enumerate(batches[1:]):  # with aux-k where the kind has it, then plain
            step = fns.step_aux_k if (fns.step_aux_k is not None and i < 2) else fns.step
            state, metrics = step(state, jax.device_put(b, fns.batch_sharding))
            auxes.append(float(metrics["aux_loss"]))
        results.append((jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()}, auxes))
    (one, m_one, aux_one), (many, m_many, aux_many) = results
    for name in one.params:
        a, b = np.asarray(one.params[name]), np.asarray(many.params[name])
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5 * max(np.abs(a).max(), 1e-6), err_msg=name)
    np.testing.assert_array_equal(np.asarray(many.tokens_since_fired), np.asarray(one.tokens_since_fired))
    for name in m_one:
        assert m_many[name] == pytest.approx(m_one[name], rel=1e-4, abs=1e-6), name
    assert m_one["loss"] > 0 and np.isfinite(m_one["grad_norm"])
    if activation == "topk":
        assert aux_one[0] > 0 and aux_many == pytest.approx(aux_one, rel=1e-4)  # the aux-k step ran on the dead half
        # each feature's decoder vectors, concatenated over its targets, stay at norm one
        np.testing.assert_allclose(np.asarray(clt.decoder_norms(spec, one.params)), 1.0, rtol=1e-5)


def test_the_topk_decoder_backward_reaches_only_the_selected_rows_and_equals_the_dense_one():
    spec = clt.CLTSpec("topk", L, D, F, k=2, span=2)
    dense = dataclasses.replace(spec, topk_path="dense")
    p = dict(clt.init(jax.random.key(0), spec))
    rows = _rows(5, 1)
    x, y = clt.split_rows(spec, jnp.asarray(rows))

    def loss(params, s):
        return clt.forward(s, params, x, y, clt.LossWeights()).loss

    g_sparse = jax.grad(loss)(p, spec)
    g_dense = jax.grad(loss)(p, dense)
    for name in p:
        if name.startswith(("W_", "b_")):
            np.testing.assert_allclose(np.asarray(g_sparse[name]), np.asarray(g_dense[name]), rtol=1e-4, atol=1e-6,
                                       err_msg=name)
    out = clt.forward(spec, p, x, y, clt.LossWeights())
    _, idx = out.codes
    for l in range(L):
        chosen = np.zeros(F, bool)
        chosen[np.asarray(idx[:, l]).ravel()] = True
        touched = np.abs(np.asarray(g_sparse[f"W_dec_{l}"])).sum((1, 2)) > 0
        assert not chosen.all() and (touched <= chosen).all() and touched.any()


def test_an_over_large_clt_is_refused_before_anything_is_allocated(tmp_path, lm_files):
    cfg = load_config(REPO / "configs" / "clt_tiny.yaml", [
        f"data.model={lm_files / 'tiny.gguf'}", f"data.corpus={lm_files / 'corpus'}", f"output.dir={tmp_path / 'run'}",
        "dictionary.d_sae=4096", "train.memory_budget_gib=0.01"])
    lines = []
    with pytest.raises(UsageError, match=r"needs 0\.\d+ GiB per device \(weights .* over the budget of 0\.01 GiB"):
        train(cfg, log=lines.append)
    n = 4096 * 32 * (3 + 6) + 3 * 4096 * 2 + 3 * 32  # F D (L + L(L+1)/2) weights, b_enc and thresholds, b_dec
    assert any(f"CLT: {n:,} parameters" in s and "per device" in s for s in lines), lines
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="a CLT trains jumprelu or topk"):
        config_from_dict({"data": {"source": "cache", "path": "x"},
                          "dictionary": {"architecture": "clt", "activation": "relu"}})
    with pytest.raises(ConfigError, match="drop data.site"):
        config_from_dict({"data": {"source": "model", "site": "blocks.0.mlp_in"}, "dictionary": {"architecture": "clt"}})


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    d = tmp_path_factory.mktemp("clt_lm")
    write_tiny_gguf(d / "tiny.gguf", n_layers=3)
    write_corpus(d / "corpus")
    return d


def _tiny(lm_files, tmp_path, *extra):
    return load_config(REPO / "configs" / "clt_tiny.yaml", [
        f"data.model={lm_files / 'tiny.gguf'}", f"data.corpus={lm_files / 'corpus'}", f"output.dir={tmp_path / 'run'}",
        *extra])


def test_a_clt_run_reports_fidelity_and_writes_artifacts_that_read_back(tmp_path, lm_files):
    cfg = _tiny(lm_files, tmp_path)
    final = train(cfg, log=lambda s: None)
    for key in ("agreement", "kl", "ce_loss_score", "fvu", "l0", "dead_fraction"):
        assert np.isfinite(final[key]), key
    assert len(final["fvu_per_layer"]) == len(final["l0_per_layer"]) == len(final["dead_fraction_per_layer"]) == 3
    assert final["tokens"] == cfg.train.steps * cfg.train.batch_size
    assert final["ce_loss_score"] > 0.3 and final["fvu"] < 0.6  # ~0.73 and ~0.29 after these 120 steps
    d = dl.load_dictionary(tmp_path / "run")
    assert isinstance(d, dl.CLTDictionary) and d.spec.n_layers == 3 and d.sites[1][-1] == "blocks.2.mlp_out"
    x = np.random.default_rng(0).normal(0, 1, (5, 3, 32)).astype(np.float32)
    want = np.asarray(clt.reconstruct(d.spec, d.params, x))
    np.testing.assert_allclose(np.asarray(d.reconstruct(x)), want, rtol=1e-5, atol=1e-6)
    from jaxinterp.steering import DictionaryRegistry

    with pytest.raises(dl.DictionaryError, match="is a cross-layer transcoder .*steering specs takes one site's"):
        DictionaryRegistry().add_run(tmp_path / "run")
    ct = dl.load_dictionary(tmp_path / "run" / "export" / "circuit_tracer")  # circuit-tracer's files, detected
    np.testing.assert_allclose(np.asarray(ct.reconstruct(x)), want, rtol=1e-4, atol=1e-4)
    from jaxinterp.train import checkpoint_dictionary

    spec, params = checkpoint_dictionary(tmp_path / "run")
    np.testing.assert_allclose(np.asarray(clt.reconstruct(spec, params, x)), want, rtol=1e-6, atol=1e-6)
    # launch/eval.py evaluates the run as the final evaluation did (same held-out contexts), and a checkpoint
    import json
    import subprocess
    import sys

    from helpers import subprocess_env

    def evaluate(*extra):
        out = subprocess.run([sys.executable, "launch/eval.py", "--checkpoint", str(tmp_path / "run"), "--contexts", "8",
                              "--json", *extra], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    got = evaluate()
    for key in ("agreement", "kl", "ce_loss_score", "fvu"):
        assert got[key] == pytest.approx(final[key], rel=1e-5, abs=1e-7), key
    early = evaluate("--step", "80")
    assert early["step"] == 80 and early["fvu"] > final["fvu"]  # the step-80 checkpoint is the less trained one


def test_a_clt_trains_from_a_multi_site_cache_that_names_its_sites(tmp_path, lm_files):
    from jaxinterp.data import make_source
    from jaxinterp.data.cache import harvest, read_manifest

    cfg = _tiny(lm_files, tmp_path, "dictionary.clt.first_layer=1", "dictionary.clt.input_point=mlp_in")
    manifest = harvest(cfg, tmp_path / "cache", contexts=40, progress=False)
    assert manifest["sites"] == ["blocks.1.mlp_in", "blocks.2.mlp_in", "blocks.1.mlp_out", "blocks.2.mlp_out"]
    assert np.load(tmp_path / "cache" / "chunk_000000.npy").shape == (8 * 15, 4 * 32)
    live = make_source(cfg)
    first = live._chunk_rows(0)[0]  # one group: the whole chunk
    np.testing.assert_array_equal(np.load(tmp_path / "cache" / "chunk_000000.npy"), first)
    cached = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="cache", path=str(tmp_path / "cache")),
                                 train=dataclasses.replace(cfg.train, tokens=64 * 20))
    final = train(cached, log=lambda s: None)
    assert len(final["fvu_per_layer"]) == 2 and np.isfinite(final["agreement"])
    assert read_manifest(tmp_path / "cache")["site"] is None
    other = dataclasses.replace(cached, dictionary=dataclasses.replace(
        cached.dictionary, clt=dataclasses.replace(cached.dictionary.clt, first_layer=0)))
    with pytest.raises(Exception, match="holds blocks.1.mlp_in ... blocks.2.mlp_out"):
        make_source(other)
    sae = yaml.safe_load((REPO / "configs" / "clt_tiny.yaml").read_text())
    sae["data"] |= {"source": "cache", "path": str(tmp_path / "cache"), "site": "blocks.1.mlp_in"}
    sae["dictionary"] = {"activation": "topk", "d_sae": 16, "k": 2}
    with pytest.raises(Exception, match="holds a CLT's sites"):
        make_source(config_from_dict(sae))


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_bfloat16_compute_stays_close_to_float32(activation):
    spec = clt.CLTSpec(activation, L, D, F, k=3, span=2, skip=True)
    p = dict(clt.init(jax.random.key(0), spec))
    p["W_skip"] = 0.1 * jax.random.normal(jax.random.key(1), p["W_skip"].shape)
    x, y = clt.split_rows(spec, jnp.asarray(_rows(32, 2)))
    w = clt.LossWeights(sparsity=0.01, pre_act=0.001)
    lo = dataclasses.replace(spec, compute_dtype="bfloat16")
    f32, bf16 = clt.forward(spec, p, x, y, w), clt.forward(lo, p, x, y, w)
    assert float(bf16.loss) == pytest.approx(float(f32.loss), rel=2e-2)
    g32 = jax.grad(lambda q: clt.forward(spec, q, x, y, w).loss)(p)
    g16 = jax.grad(lambda q: clt.forward(lo, q, x, y, w).loss)(p)
    assert all(g16[k].dtype == jnp.float32 for k in g16)  # parameters and their gradients stay float32
    for k in ("W_enc", "W_dec_0", "W_skip"):
        cos = float(jnp.vdot(g32[k], g16[k]) / (jnp.linalg.norm(g32[k]) * jnp.linalg.norm(g16[k])))
        assert cos > 0.99, k


def test_estimate_prints_the_memory_of_a_mesh_this_machine_does_not_have(tmp_path, lm_files):
    import subprocess
    import sys

    from helpers import subprocess_env

    out = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/clt_tiny.yaml", "--estimate",
                          "--set", f"data.model={lm_files / 'tiny.gguf'}", "--set", "mesh.data=4", "--set", "mesh.model=16"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n = 48 * 32 * (3 + 6) + 3 * 48 * 2 + 3 * 32
    assert f"CLT: {n:,} parameters (3 layers x 48 features, span 3); per device on data=4 x model=16" in out.stdout
