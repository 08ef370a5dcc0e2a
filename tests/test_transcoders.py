"""Transcoders and skip transcoders: formulas against NumPy, the sharded step, two-site data, the
target site's loss recovered, steering that reads one site and writes another, and artifacts.

The NumPy reference, from the definitions (float64): x_n = x * s_in, y_n = y * s_out,
x_c = x_n - b_in, pre = x_c @ W_enc + b_enc, acts per activation,
y_n_hat = acts @ W_dec + b_dec (+ x_n @ W_skip.T), recon = y_n_hat / s_out,
mse = mean_rows ||y_n - y_n_hat||^2.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import dictionaries as dl
from jaxinterp import evals
from jaxinterp.config import ConfigError, MeshConfig
from jaxinterp.data import make_source
from jaxinterp.train import make_mesh
from jaxinterp.train.step import build_step, init_state, make_spec, place_state
from helpers import batch_topk_reference, tiny_config
from jaxinterp.dictionaries.kinds import batchtopk_cap

B, D, O, F, K = 16, 8, 6, 32, 4
ARCHS = ("transcoder", "skip_transcoder")
TOL = dict(rtol=1e-4, atol=1e-5)


def random_params(activation: str, arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(F, O))
    w_dec *= rng.uniform(0.5, 1.5, size=(F, 1)) / np.linalg.norm(w_dec, axis=-1, keepdims=True)
    p = {"W_enc": rng.normal(size=(D, F)) / np.sqrt(D), "W_dec": w_dec, "b_dec": 0.3 * rng.normal(size=(O,)),
         "b_in": 0.4 * rng.normal(size=(D,)), "norm_scale": np.array(0.7), "norm_scale_out": np.array(1.3)}
    if arch == "skip_transcoder":
        p["W_skip"] = 0.2 * rng.normal(size=(O, D))
    if activation == "gated":
        p |= {n: 0.3 * rng.normal(size=(F,)) for n in ("b_gate", "b_mag", "r_mag")}
    else:
        p["b_enc"] = 0.3 * rng.normal(size=(F,))
    if activation in ("jumprelu", "batchtopk"):
        p["threshold"] = rng.uniform(0.1, 0.6, size=(F,))
    return {k: np.asarray(v, np.float32) for k, v in p.items()}


def random_batch(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([2.0 * rng.normal(size=(B, D)) + 0.5, rng.normal(size=(B, O)) - 0.3], -1).astype(np.float32)


def numpy_forward(activation: str, p: dict, batch: np.ndarray, *, training: bool, sparsity: float, aux: float):
    p = {n: v.astype(np.float64) for n, v in p.items()}
    x, y = batch[:, :D].astype(np.float64), batch[:, D:].astype(np.float64)
    xn, yn = x * p["norm_scale"], y * p["norm_scale_out"]
    xc = xn - p["b_in"]
    skip = xn @ p["W_skip"].T if "W_skip" in p else 0.0
    norms = np.linalg.norm(p["W_dec"], axis=-1)
    out = {"sparsity": 0.0, "aux": 0.0}
    if activation == "gated":
        pre = xc @ p["W_enc"] + p["b_gate"]
        mag = xc @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"]
        acts = np.where(pre > 0, np.maximum(mag, 0), 0.0)
        gate = np.maximum(pre, 0)
        out["sparsity"] = sparsity * np.mean(np.sum(gate * norms, -1))
        out["aux"] = aux * np.mean(np.sum((yn - (gate @ p["W_dec"] + p["b_dec"] + skip)) ** 2, -1))
    else:
        pre = xc @ p["W_enc"] + p["b_enc"]
        if activation == "relu":
            acts = np.maximum(pre, 0)
            out["sparsity"] = sparsity * np.mean(np.sum(acts * norms, -1))
        elif activation == "topk":
            idx = np.argsort(-pre, axis=-1)[:, :K]
            acts = np.zeros_like(pre)
            rows = np.arange(B)[:, None]
            acts[rows, idx] = np.maximum(pre[rows, idx], 0)
        elif activation == "jumprelu" or not training:
            acts = np.where(pre > p["threshold"], pre, 0.0)
            if activation == "jumprelu":
                out["sparsity"] = sparsity * np.mean(np.sum(pre > p["threshold"], -1))
        else:  # batchtopk, training, past its warm-up
            acts, _ = batch_topk_reference(np.maximum(pre, 0), K, batchtopk_cap(K, F))
    yn_hat = acts @ p["W_dec"] + p["b_dec"] + skip
    out |= {"pre": pre, "acts": acts, "recon": yn_hat / p["norm_scale_out"], "mse": np.mean(np.sum((yn - yn_hat) ** 2, -1))}
    return out


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_numpy(arch, activation, training):
    spec = dl.DictionarySpec(activation, D, F, k=K, architecture=arch, d_out=O)
    p, batch = random_params(activation, arch), random_batch()
    params = {k: jnp.asarray(v) for k, v in p.items()}
    out = dl.forward(spec, params, jnp.asarray(batch), dl.LossWeights(sparsity=0.3, aux=0.7), training=training)
    ref = numpy_forward(activation, p, batch, training=training, sparsity=0.3, aux=0.7)
    assert 0 < np.count_nonzero(ref["acts"]) < B * F
    np.testing.assert_allclose(out.pre_acts, ref["pre"], **TOL)
    np.testing.assert_allclose(out.feature_acts, ref["acts"], **TOL)
    np.testing.assert_allclose(out.recon, ref["recon"], **TOL)
    np.testing.assert_allclose(out.losses.mse, ref["mse"], **TOL)
    np.testing.assert_allclose(out.losses.sparsity, ref["sparsity"], **TOL)
    np.testing.assert_allclose(out.losses.aux, ref["aux"], **TOL)
    # inference: encode reads the input half only, reconstruct adds the skip path
    x = batch[:, :D]
    inf = numpy_forward(activation, p, batch, training=False, sparsity=0.0, aux=0.0)
    np.testing.assert_allclose(dl.encode(spec, params, jnp.asarray(x)), inf["acts"], **TOL)
    np.testing.assert_allclose(dl.reconstruct(spec, params, jnp.asarray(x)), inf["recon"], **TOL)


def test_fresh_transcoder_has_its_own_encoder_and_a_zero_skip_path():
    spec = dl.DictionarySpec("topk", D, F, k=K, architecture="skip_transcoder", d_out=O)
    p = dl.init(jax.random.key(0), spec)
    assert p["W_enc"].shape == (D, F) and p["W_dec"].shape == (F, O) and p["b_dec"].shape == (O,)
    assert p["b_in"].shape == (D,) and float(p["norm_scale_out"]) == 1.0
    np.testing.assert_array_equal(p["W_skip"], np.zeros((O, D)))
    np.testing.assert_allclose(np.linalg.norm(p["W_enc"], axis=0), 1.0, rtol=1e-5)
    assert spec.batch_width == D + O and spec.buffer_names == ("norm_scale", "norm_scale_out")
    with pytest.raises(ValueError, match="d_out=6 differs from d_in=8"):
        dl.DictionarySpec("topk", D, F, k=K, d_out=O)


def test_fit_to_data_scales_input_and_target_separately():
    spec = dl.DictionarySpec("topk", D, F, k=K, architecture="transcoder", d_out=O)
    batch = jnp.asarray(np.concatenate([3.0 * random_batch()[:, :D], 0.1 * random_batch(2)[:, D:]], -1))
    p = dl.fit_to_data(spec, dl.init(jax.random.key(0), spec), batch, centre=lambda a: a.mean(0))
    x, y = np.asarray(batch[:, :D]), np.asarray(batch[:, D:])
    np.testing.assert_allclose(np.mean(np.sum((x * float(p["norm_scale"])) ** 2, -1)), D, rtol=1e-4)
    np.testing.assert_allclose(np.mean(np.sum((y * float(p["norm_scale_out"])) ** 2, -1)), O, rtol=1e-4)
    np.testing.assert_allclose(p["b_in"], (x * float(p["norm_scale"])).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(p["b_dec"], (y * float(p["norm_scale_out"])).mean(0), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# training on pairs


def _pair_files(tmp_path, n=4096, seed=0):
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(64, 16))
    out_dirs = rng.normal(size=(64, 12))
    mags = rng.uniform(0, 2, (n, 64)) * (rng.random((n, 64)) < 0.05)
    x = (mags @ dirs).astype(np.float32)
    y = (mags @ out_dirs + 0.3 * x[:, :12]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return str(tmp_path / "x.npy"), str(tmp_path / "y.npy")


def _pair_config(tmp_path, arch, activation="topk", **sections):
    x, y = _pair_files(tmp_path)
    return tiny_config(tmp_path, data={"source": "npy", "path": x, "target_path": y},
                       dictionary={"architecture": arch, "activation": activation, "dead_tokens": 256}, **sections)


@pytest.mark.parametrize("activation", ["topk", "relu"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_step_matches_single_device(tmp_path, arch, activation):
    cfg = _pair_config(tmp_path, arch, activation)
    src = make_source(cfg)
    batches = [np.asarray(next(src)) for _ in range(4)]
    assert batches[0].shape == (256, 28)
    results = []
    for mesh in (MeshConfig(data=1, model=1), MeshConfig(data=4, model=2)):
        c = dataclasses.replace(cfg, mesh=mesh)
        spec = make_spec(c, src.d_in, src.d_out)
        state = init_state(c, spec, [batches[0]])
        chex.clear_trace_counter()
        fns = build_step(c, spec, make_mesh(c.mesh), state, max_traces=1)
        state = place_state(state, fns)
        step = fns.step_aux_k or fns.step
        for b in batches[1:]:
            state, metrics = step(state, jax.device_put(b, fns.batch_sharding))
        results.append((jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()}))
    (one, m_one), (many, m_many) = results
    assert set(one.params) >= {"b_in"} | ({"W_skip"} if arch == "skip_transcoder" else set())
    for name in one.params:
        a, b = np.asarray(one.params[name]), np.asarray(many.params[name])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(np.abs(a).max(), 1e-6), err_msg=name)
    for name in one.buffers:
        np.testing.assert_allclose(np.asarray(many.buffers[name]), np.asarray(one.buffers[name]), rtol=1e-5)
    for name in m_one:
        assert m_many[name] == pytest.approx(m_one[name], rel=1e-5, abs=1e-6), name
    if arch == "skip_transcoder":
        assert np.abs(np.asarray(one.params["W_skip"])).max() > 0  # the skip path learns


def test_transcoder_run_evaluates_its_target_and_writes_an_artifact(tmp_path):
    from jaxinterp.train import train

    cfg = _pair_config(tmp_path, "skip_transcoder", train={"tokens": 256 * 100, "lr": 1e-2})
    final = train(cfg, log=lambda s: None)
    d = dl.load_dictionary(tmp_path / "run")
    assert d.spec.architecture == "skip_transcoder" and (d.d_in, d.d_out) == (16, 12)
    src = make_source(cfg)
    batch = np.concatenate(list(src.eval_batches(1024, 256)))
    x, y = batch[:, :16], batch[:, 16:]
    y_hat = np.asarray(d.reconstruct(x))
    ev = 1 - np.sum((y - y_hat) ** 2) / np.sum((y - y.mean(0)) ** 2)
    assert final["explained_variance"] == pytest.approx(ev, abs=1e-4)
    assert final["explained_variance"] > 0.4  # ~0.55 after these 100 steps


def test_config_needs_a_target_for_a_transcoder_and_an_architecture_for_a_target(tmp_path):
    with pytest.raises(ConfigError, match="transcoder needs a target"):
        tiny_config(tmp_path, dictionary={"architecture": "transcoder"})
    with pytest.raises(ConfigError, match="set dictionary.architecture: transcoder"):
        tiny_config(tmp_path, data={"source": "npy", "path": "x.npy", "target_path": "y.npy"})
    with pytest.raises(ConfigError, match="data.target_site: read from data.source 'model' or 'cache'"):
        tiny_config(tmp_path, data={"target_site": "blocks.0.mlp_out"}, dictionary={"architecture": "transcoder"})


# ---------------------------------------------------------------------------------------------
# on a language model: two sites in one forward, the target's loss recovered, steering


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    pytest.importorskip("gguf")
    from helpers import write_corpus, write_tiny_gguf

    from jaxinterp.models import load_model

    d = tmp_path_factory.mktemp("tc_lm")
    write_tiny_gguf(d / "tiny.gguf")
    write_corpus(d / "corpus")
    model, tok = load_model(str(d / "tiny.gguf"))
    return d, model, tok


IN, OUT = "blocks.0.mlp_in", "blocks.0.mlp_out"


def _tokens(n=4, t=12, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(2, 200, size=(n, t))
    toks[:, 0] = 0  # BOS
    return toks


def test_two_site_rows_hold_both_sites_side_by_side(lm):
    from jaxinterp.data.activations import site_activations

    _, model, _ = lm
    toks = _tokens()
    both = site_activations(model, toks, (IN, OUT))
    np.testing.assert_array_equal(both, np.concatenate([site_activations(model, toks, IN),
                                                        site_activations(model, toks, OUT)], -1))
    assert both.shape == (4 * 11, 64)


def test_an_edit_reads_an_earlier_site_and_never_a_later_one(lm):
    from jaxinterp.models import Plan, SiteError, forward

    _, model, _ = lm
    toks = jnp.asarray(_tokens())
    res = forward(model, toks, plan=Plan(capture=(IN, OUT), edits=((OUT, lambda y, p, pos, x: 2 * x, IN),)))
    np.testing.assert_allclose(res.captured[OUT], 2 * res.captured[IN], rtol=1e-6)
    with pytest.raises(SiteError, match="reads 'blocks.0.mlp_out', which the forward reaches at or after it"):
        forward(model, toks, plan=Plan(edits=((IN, lambda y, p, pos, x: x, OUT),)))


def _random_transcoder(arch="skip_transcoder", seed=0):
    spec = dl.DictionarySpec("topk", 32, 64, k=4, architecture=arch, d_out=32)
    p = dict(dl.init(jax.random.key(seed), spec))
    rng = np.random.default_rng(seed)
    p |= {"b_enc": jnp.asarray(0.1 * rng.normal(size=64), jnp.float32), "norm_scale_out": jnp.float32(1.7),
          "norm_scale": jnp.float32(0.8)}
    if "W_skip" in p:
        p["W_skip"] = jnp.asarray(0.1 * rng.normal(size=(32, 32)), jnp.float32)
    return spec, p


def test_loss_recovered_splices_the_transcoders_output_into_the_target_site(lm):
    from jaxinterp.models import Plan, forward

    _, model, _ = lm
    spec, params = _random_transcoder()
    toks = jnp.asarray(_tokens())
    clean = forward(model, toks, plan=Plan(capture=(IN, OUT)))
    spliced = forward(model, toks, plan=Plan(capture=(IN, OUT), edits=((OUT, evals.splice_fn(spec), IN),)),
                      edit_params={OUT: params})
    x = np.asarray(clean.captured[IN])
    want = np.asarray(dl.reconstruct(spec, params, jnp.asarray(x.reshape(-1, 32)))).reshape(x.shape)
    np.testing.assert_allclose(spliced.captured[OUT][:, 1:], want[:, 1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(spliced.captured[OUT][:, 0], clean.captured[OUT][:, 0])  # BOS kept
    out = evals.loss_recovered(model, spec, params, IN, np.asarray(toks), target_site=OUT)
    assert out["ce_loss_with_sae"] == pytest.approx(float(np.asarray(
        _mean_ce(forward(model, toks, plan=Plan(edits=((OUT, evals.splice_fn(spec), IN),)),
                         edit_params={OUT: params}).logits, toks))), rel=1e-5)


def _mean_ce(logits, toks):
    lp = jax.nn.log_softmax(logits[:, 1:-1].astype(jnp.float32))
    return -jnp.take_along_axis(lp, toks[:, 2:, None], axis=-1).mean()


def test_feature_steering_through_a_transcoder_writes_its_decoder_row_at_the_target(lm):
    from jaxinterp.generation import generate
    from jaxinterp.steering import DictionaryRegistry, SteeringVector

    _, model, _ = lm
    spec, params = _random_transcoder()
    reg = DictionaryRegistry().add_dictionary(dl.Dictionary(spec, params, site=IN, target_site=OUT))
    prompts = [[0, 5, 9, 14, 3], [0, 7, 8]]
    kw = dict(max_new_tokens=6, stop=(), return_logits=True)
    through = generate(model, prompts, dictionaries=reg, steering=SteeringVector(IN, features={3: 6.0}), **kw)
    row = np.asarray(params["W_dec"][3]) / float(params["norm_scale_out"])
    direct = generate(model, prompts, steering=SteeringVector(OUT, vector=row, scale=6.0), **kw)
    plain = generate(model, prompts, **kw)
    np.testing.assert_allclose(through.logits, direct.logits, rtol=1e-4, atol=1e-4)
    assert np.abs(through.logits - plain.logits).max() > 1e-2  # the edit moved something
