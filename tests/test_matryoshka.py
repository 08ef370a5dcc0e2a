"""Matryoshka dictionaries: prefix losses from one encode, prefix decodes and adaptive sparsity as
data, the sharded step, per-prefix evaluation.

NumPy reference: the code f of the full dictionary (TopK per row, or BatchTopK over the batch),
prefix g's reconstruction f[:, :w_g] @ W_dec[:w_g] + b_dec, the loss the mean over prefixes of
mean_rows ||x_n - x_n_hat_g||^2.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import dictionaries as dl
from jaxinterp.config import ConfigError, MeshConfig
from jaxinterp.data import make_source
from jaxinterp.train import make_mesh
from jaxinterp.train.step import build_step, init_state, make_spec, place_state
from helpers import batch_topk_reference, tiny_config
from jaxinterp.dictionaries.kinds import batchtopk_cap

B, D, F, K = 16, 8, 32, 4
WIDTHS = (4, 12, 32)
TOL = dict(rtol=1e-4, atol=1e-5)


def _params(activation, seed=0):
    spec = dl.DictionarySpec(activation, D, F, k=K, matryoshka_widths=WIDTHS)
    rng = np.random.default_rng(seed)
    p = dict(dl.init(jax.random.key(seed), spec))
    p |= {"b_enc": jnp.asarray(0.3 * rng.normal(size=F), jnp.float32), "b_dec": jnp.asarray(0.2 * rng.normal(size=D), jnp.float32),
          "norm_scale": jnp.float32(0.8), "W_enc": p["W_enc"] + 0.3 * jnp.asarray(rng.normal(size=(D, F)), jnp.float32)}
    x = (2.0 * rng.normal(size=(B, D)) + 0.3).astype(np.float32)
    return spec, p, x


def _numpy_code(activation, p, x):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    xn = x.astype(np.float64) * p["norm_scale"]
    pre = (xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if activation == "topk":
        idx = np.argsort(-pre, -1)[:, :K]
        f = np.zeros_like(pre)
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    else:
        f, _ = batch_topk_reference(np.maximum(pre, 0), K, batchtopk_cap(K, F))
    return p, xn, f


@pytest.mark.parametrize("activation,path", [("topk", "sparse"), ("topk", "dense"), ("batchtopk", "auto")])
def test_prefix_losses_match_numpy(activation, path):
    spec, p, x = _params(activation)
    spec = dataclasses.replace(spec, topk_path=path)
    out = dl.forward(spec, p, jnp.asarray(x), dl.LossWeights(aux=0.0), training=True)
    q, xn, f = _numpy_code(activation, p, x)
    mses = [np.mean(np.sum((xn - (f[:, :w] @ q["W_dec"][:w] + q["b_dec"])) ** 2, -1)) for w in WIDTHS]
    np.testing.assert_allclose(out.losses.prefix_mse, mses, **TOL)
    np.testing.assert_allclose(out.losses.mse, mses[-1], **TOL)
    np.testing.assert_allclose(out.losses.total, np.mean(mses), **TOL)
    assert len({round(float(m), 6) for m in mses}) == 3  # not vacuous: every prefix reconstructs differently


def test_sparse_prefix_gradients_equal_the_dense_formula():
    spec, p, x = _params("topk", seed=3)

    def loss(params, path):
        s = dataclasses.replace(spec, topk_path=path)
        return dl.forward(s, params, jnp.asarray(x), training=True).losses.total

    g_sparse = jax.grad(loss)(p, "sparse")
    g_dense = jax.grad(loss)(p, "dense")
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_allclose(g_sparse[k], g_dense[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_prefix_decode_and_reconstruct_take_the_width_as_data():
    spec, p, x = _params("topk", seed=1)
    q, xn, f = _numpy_code("topk", p, x)
    traces = []

    @jax.jit
    def recon(params, x, width):
        traces.append(1)
        return dl.reconstruct(spec, params, x, width=width)

    for w in WIDTHS:
        want = (f[:, :w] @ q["W_dec"][:w] + q["b_dec"]) / q["norm_scale"]
        np.testing.assert_allclose(recon(p, jnp.asarray(x), jnp.int32(w)), want, **TOL)
        np.testing.assert_allclose(dl.decode(spec, p, jnp.asarray(f, jnp.float32), width=w), want, **TOL)
    assert len(traces) == 1
    # the artifact takes the width too, on leading axes of any shape, and refuses one out of range
    d = dl.Dictionary(spec, p, site="blocks.0.resid_post")
    for w in WIDTHS:
        want = (f[:, :w] @ q["W_dec"][:w] + q["b_dec"]) / q["norm_scale"]
        np.testing.assert_allclose(d.reconstruct(x.reshape(2, B // 2, D), width=w), want.reshape(2, B // 2, D), **TOL)
        np.testing.assert_allclose(d.decode(f, width=w), want, **TOL)
    np.testing.assert_allclose(d.reconstruct(x), d.reconstruct(x, width=F), **TOL)
    with pytest.raises(dl.DictionaryError, match=r"width=33: choose a prefix width from 1 to d_sae=32 \(trained prefixes"):
        d.reconstruct(x, width=33)


def test_adaptive_rule_is_data_and_picks_the_smallest_prefix_within_budget():
    spec, p, x = _params("topk", seed=2)
    q, xn, f = _numpy_code("topk", p, x)
    traces = []

    @jax.jit
    def run(params, x, rule):
        traces.append(1)
        return dl.adaptive_reconstruct(spec, params, x, rule)

    for threshold, budget in [(0.0, 0.0), (0.0, 0.6), (0.5, 0.3), (0.2, 10.0)]:
        out = run(p, jnp.asarray(x), dl.AdaptiveRule(jnp.float32(threshold), jnp.float32(budget)))
        ft = np.where(f > threshold, f, 0.0)
        recons = [(ft[:, :w] @ q["W_dec"][:w] + q["b_dec"]) / q["norm_scale"] for w in WIDTHS]
        errs = np.stack([np.sum((x - r) ** 2, -1) / np.sum(x.astype(np.float64) ** 2, -1) for r in recons])
        fits = errs <= budget
        fits[-1] = True
        g = fits.argmax(0)
        np.testing.assert_array_equal(out.width, np.asarray(WIDTHS)[g])
        np.testing.assert_allclose(out.recon, np.stack(recons)[g, np.arange(B)], **TOL)
        np.testing.assert_array_equal(out.l0, [(ft[b, : WIDTHS[g[b]]] > 0).sum() for b in range(B)])
        if budget == 0.6:
            assert len(set(np.asarray(out.width))) > 1  # rows chose different prefixes
    assert len(traces) == 1


def _cfg(tmp_path, activation="topk", **extra):
    return tiny_config(tmp_path, dictionary={"activation": activation, "matryoshka_widths": [8, 24, 64],
                                             "dead_tokens": 256, **extra})


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sharded_step_matches_single_device(tmp_path, activation):
    cfg = _cfg(tmp_path, activation, batchtopk_row_warmup=0.0)
    src = make_source(cfg)
    batches = [np.asarray(next(src)) for _ in range(4)]
    results = []
    for mesh in (MeshConfig(data=1, model=1), MeshConfig(data=4, model=2)):
        c = dataclasses.replace(cfg, mesh=mesh)
        spec = make_spec(c, batches[0].shape[1])
        assert spec.matryoshka_widths == (8, 24, 64)
        state = init_state(c, spec, [batches[0]])
        chex.clear_trace_counter()
        fns = build_step(c, spec, make_mesh(c.mesh), state, max_traces=1)
        state = place_state(state, fns)
        for b in batches[1:]:
            state, metrics = (fns.step_aux_k or fns.step)(state, jax.device_put(b, fns.batch_sharding))
        results.append((jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()}))
    (one, m_one), (many, m_many) = results
    for name in one.params:
        a, b = np.asarray(one.params[name]), np.asarray(many.params[name])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(np.abs(a).max(), 1e-6), err_msg=name)
    for name in m_one:
        assert m_many[name] == pytest.approx(m_one[name], rel=1e-5, abs=1e-6), name


def test_a_trained_matryoshka_reports_every_prefix_and_saves_its_widths(tmp_path):
    from jaxinterp.train import train

    cfg = tiny_config(tmp_path, dictionary={"activation": "topk", "matryoshka_widths": [8, 24, 64], "dead_tokens": 256},
                      train={"tokens": 256 * 60, "lr": 3e-3})
    final = train(cfg, log=lambda s: None)
    pre = final["prefixes"]
    assert [r["width"] for r in pre] == [8, 24, 64]
    fvu = [r["fvu"] for r in pre]
    assert fvu[0] > fvu[1] > fvu[2] and pre[-1]["explained_variance"] == pytest.approx(final["explained_variance"])
    assert pre[-1]["l0"] == pytest.approx(final["l0"]) and pre[0]["l0"] < pre[-1]["l0"]
    d = dl.load_dictionary(tmp_path / "run")
    assert d.spec.matryoshka_widths == (8, 24, 64)


def test_widths_must_nest_up_to_d_sae(tmp_path):
    with pytest.raises(ConfigError, match=r"matryoshka_widths: \[8, 8, 64\] must increase strictly"):
        tiny_config(tmp_path, dictionary={"matryoshka_widths": [8, 8, 64]})
    with pytest.raises(ConfigError, match=r"the last width \(32\) must equal d_sae \(64\)"):
        tiny_config(tmp_path, dictionary={"matryoshka_widths": [8, 32]})
    with pytest.raises(ValueError, match="must increase strictly"):
        dl.DictionarySpec("topk", D, F, k=K, matryoshka_widths=(4, 3, 32))
