"""Sparse dictionaries (`jaxinterp.dictionaries`) against NumPy re-implementations of their formulas.

The references below are written from the definitions, in float64:
  x_n = x * norm_scale, x_c = x_n - b_dec, pre = x_c @ W_enc + b_enc (gated: + b_gate),
  acts per activation, x_n_hat = acts @ W_dec + b_dec, recon = x_n_hat / norm_scale,
  mse = mean_rows ||x_n - x_n_hat||^2.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import dictionaries as dl
from jaxinterp.data import make_source
from jaxinterp.train import sharding
from jaxinterp.train.step import build_step, init_state, make_spec, place_state

from helpers import batch_topk_reference, tiny_config

KINDS = ("relu", "topk", "batchtopk", "jumprelu", "gated")
B, D, F, K = 16, 8, 32, 4
TOL = dict(rtol=1e-4, atol=1e-5)


def random_params(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 params with every term non-trivial: biases, norm_scale != 1, non-unit decoder rows."""
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(F, D))
    w_dec *= rng.uniform(0.5, 1.5, size=(F, 1)) / np.linalg.norm(w_dec, axis=-1, keepdims=True)
    p = {
        "W_enc": rng.normal(size=(D, F)) / np.sqrt(D),
        "W_dec": w_dec,
        "b_dec": 0.3 * rng.normal(size=(D,)),
        "norm_scale": np.array(0.7),
    }
    if kind == "gated":
        p |= {"b_gate": 0.3 * rng.normal(size=(F,)), "b_mag": 0.3 * rng.normal(size=(F,)),
              "r_mag": 0.3 * rng.normal(size=(F,))}
    else:
        p["b_enc"] = 0.3 * rng.normal(size=(F,))
    if kind in ("jumprelu", "batchtopk"):
        p["threshold"] = rng.uniform(0.1, 0.6, size=(F,))
    return {k: np.asarray(v, np.float32) for k, v in p.items()}


def random_x(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (2.0 * rng.normal(size=(B, D)) + 0.5).astype(np.float32)


def numpy_forward(kind: str, p: dict, x: np.ndarray, *, k: int, sparsity: float, aux: float,
                  training: bool, cap: int | None = None) -> dict[str, np.ndarray]:
    """`cap`: BatchTopK's per-row candidate limit (the sparse path's `ROW_CAP * k`; None: dense)."""
    p = {n: v.astype(np.float64) for n, v in p.items()}
    xn = x.astype(np.float64) * p["norm_scale"]
    xc = xn - p["b_dec"]
    norms = np.linalg.norm(p["W_dec"], axis=-1)
    out = {"sparsity": 0.0, "aux": 0.0}
    if kind == "gated":
        pre = xc @ p["W_enc"] + p["b_gate"]
        mag = xc @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"]
        acts = np.where(pre > 0, np.maximum(mag, 0), 0.0)
        gate = np.maximum(pre, 0)
        out["sparsity"] = sparsity * np.mean(np.sum(gate * norms, -1))
        gate_hat = gate @ p["W_dec"] + p["b_dec"]
        out["aux"] = aux * np.mean(np.sum((xn - gate_hat) ** 2, -1))
    else:
        pre = xc @ p["W_enc"] + p["b_enc"]
        if kind == "relu":
            acts = np.maximum(pre, 0)
            out["sparsity"] = sparsity * np.mean(np.sum(acts * norms, -1))
        elif kind == "topk":
            idx = np.argsort(-pre, axis=-1)[:, :k]
            acts = np.zeros_like(pre)
            rows = np.arange(pre.shape[0])[:, None]
            acts[rows, idx] = np.maximum(pre[rows, idx], 0)
        elif kind == "jumprelu" or (kind == "batchtopk" and not training):
            acts = np.where(pre > p["threshold"], pre, 0.0)
            if kind == "jumprelu":
                out["sparsity"] = sparsity * np.mean(np.sum(pre > p["threshold"], -1))
        else:  # batchtopk, training
            acts, out["kth"] = batch_topk_reference(np.maximum(pre, 0), k, cap)
    xn_hat = acts @ p["W_dec"] + p["b_dec"]
    out |= {"pre": pre, "acts": acts, "recon": xn_hat / p["norm_scale"],
            "mse": np.mean(np.sum((xn - xn_hat) ** 2, -1))}
    out["total"] = out["mse"] + out["sparsity"] + out["aux"]
    return out


def as_jax(p: dict) -> dl.Params:
    return {k: jnp.asarray(v) for k, v in p.items()}


# ---------------------------------------------------------------------------------------------
# forward / encode / decode


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", KINDS + ("batchtopk-dense",))
def test_forward_matches_numpy(kind, training, strict_promotion, monkeypatch):
    from jaxinterp.dictionaries import kinds

    monkeypatch.setattr(kinds, "BATCHTOPK_ROW_EXTRA", 0)  # a cap of 2k = 8 candidates, which binds here
    kind, _, path = kind.partition("-")
    spec = dl.DictionarySpec(kind, D, F, k=K, topk_path=path or "auto")
    p, x = random_params(kind), random_x()
    w = dl.LossWeights(sparsity=0.3, aux=0.7)
    out = dl.forward(spec, as_jax(p), jnp.asarray(x), w, training=training)
    cap = None if path == "dense" else kinds.batchtopk_cap(K, F)
    ref = numpy_forward(kind, p, x, k=K, sparsity=0.3, aux=0.7, training=training, cap=cap)
    if kind == "batchtopk" and training:  # the cap binds on some rows of these random inputs, or not at all
        uncapped = numpy_forward(kind, p, x, k=K, sparsity=0.3, aux=0.7, training=True)["acts"]
        assert (path == "dense") == np.array_equal(ref["acts"], uncapped)

    n_active = np.count_nonzero(ref["acts"])
    assert 0 < n_active < B * F, "the reference activation must be sparse but not empty"
    np.testing.assert_allclose(out.pre_acts, ref["pre"], **TOL)
    np.testing.assert_allclose(out.feature_acts, ref["acts"], **TOL)
    np.testing.assert_allclose(out.recon, ref["recon"], **TOL)
    np.testing.assert_allclose(out.losses.mse, ref["mse"], **TOL)
    np.testing.assert_allclose(out.losses.sparsity, ref["sparsity"], **TOL)
    np.testing.assert_allclose(out.losses.aux, ref["aux"], **TOL)
    np.testing.assert_allclose(out.losses.total, ref["total"], **TOL)
    if kind == "topk":
        dense = np.zeros((B, F))
        dense[np.arange(B)[:, None], np.asarray(out.top_idx)] = np.asarray(out.top_vals)
        np.testing.assert_allclose(dense, ref["acts"], **TOL)
    if kind == "batchtopk" and training:
        np.testing.assert_allclose(out.batch_threshold, ref["kth"], **TOL)
        assert np.count_nonzero(out.feature_acts) == K * B  # the cap lowers the threshold, the count stays


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_match_numpy(kind, strict_promotion):
    spec = dl.DictionarySpec(kind, D, F, k=K)
    p, x = random_params(kind), random_x()
    params = as_jax(p)
    ref = numpy_forward(kind, p, x, k=K, sparsity=0.0, aux=0.0, training=False)

    acts = dl.encode(spec, params, jnp.asarray(x))
    np.testing.assert_allclose(acts, ref["acts"], **TOL)
    recon = dl.decode(spec, params, jnp.asarray(ref["acts"], jnp.float32))
    np.testing.assert_allclose(recon, ref["recon"], **TOL)
    np.testing.assert_allclose(dl.reconstruct(spec, params, jnp.asarray(x)), ref["recon"], **TOL)


def test_batchtopk_inference_uses_threshold_not_batch(strict_promotion):
    """At inference a row's activations do not depend on the rest of the batch."""
    spec = dl.DictionarySpec("batchtopk", D, F, k=K)
    params, x = as_jax(random_params("batchtopk")), jnp.asarray(random_x())
    whole = dl.forward(spec, params, x, training=False).feature_acts
    first = dl.forward(spec, params, x[:1], training=False).feature_acts
    np.testing.assert_allclose(first, whole[:1], **TOL)
    trained = dl.forward(spec, params, x, training=True).feature_acts
    assert not np.allclose(trained, whole), "training (batch top-k) and inference (threshold) must differ here"


def test_batchtopk_warm_up_keeps_each_rows_top_k_and_the_batch_threshold():
    spec = dl.DictionarySpec("batchtopk", D, F, k=K)
    pn = random_params("batchtopk")
    params, x = as_jax(pn), jnp.asarray(random_x())
    warm = dl.forward(spec, params, x, dl.LossWeights(row_topk=True), training=True)
    batch = dl.forward(spec, params, x, dl.LossWeights(row_topk=False), training=True)
    pre = numpy_forward("batchtopk", pn, random_x(), k=K, sparsity=0, aux=0, training=False)["pre"]
    top = np.argsort(-pre, axis=-1)[:, :K]
    want = np.zeros_like(pre)
    np.put_along_axis(want, top, np.maximum(np.take_along_axis(pre, top, -1), 0.0), -1)
    np.testing.assert_allclose(warm.feature_acts, want, **TOL)
    from jaxinterp.dictionaries.kinds import batchtopk_cap

    _, kth = batch_topk_reference(np.maximum(pre, 0), K, batchtopk_cap(K, F))
    assert kth == pytest.approx(float(batch.batch_threshold), rel=1e-5)
    assert not np.allclose(warm.feature_acts, batch.feature_acts)
    # the warm-up (TopK's work only) leaves the inference threshold alone; the batch phase starts
    # its EMA at the batch's k x B-th activation, then follows it
    assert np.isnan(float(warm.batch_threshold))
    buffers = {"threshold": jnp.zeros((F,), jnp.float32)}
    update = partial(dl.update_buffers, spec, ema_decay=0.9, first=jnp.asarray(False))
    assert np.all(np.asarray(update(buffers, warm)["threshold"]) == 0)
    started = update(buffers, batch)["threshold"]
    np.testing.assert_allclose(started, np.full(F, kth), rtol=1e-5)
    np.testing.assert_allclose(update({"threshold": started}, warm)["threshold"], started)
    np.testing.assert_allclose(update({"threshold": started * 2}, batch)["threshold"], 1.9 * started, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# JumpReLU straight-through gradients

EPS = 0.1
THRESH = np.array([0.2, 0.5, 1.0, 0.3], np.float32)
# z - t per row: inside the window (|u| < eps/2) on rows 0, 1, outside on rows 2, 3
OFFSETS = np.array([-0.3, 0.3, -0.8, 0.8], np.float32)[:, None] * EPS


def _rect(u):
    return (np.abs(u) < 0.5).astype(np.float64)


def _z_and_cotangent(lead_shape):
    rng = np.random.default_rng(0)
    z = (THRESH + OFFSETS).astype(np.float32)  # [4, F]
    z = np.broadcast_to(z, (*lead_shape[:-1], *z.shape)).copy() if len(lead_shape) > 1 else z
    g = rng.uniform(0.5, 2.0, size=z.shape).astype(np.float32)
    return z, g


@pytest.mark.parametrize("lead", [(4,), (3, 4)])
def test_jumprelu_ste_gradients(lead):
    z, g = _z_and_cotangent(lead)
    f = lambda z_, t_: jnp.sum(dl.jumprelu_ste(z_, t_, EPS) * g)
    dz, dt = jax.grad(f, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(THRESH))

    u = (z.astype(np.float64) - THRESH) / EPS
    assert _rect(u).sum() > 0 and (1 - _rect(u)).sum() > 0
    np.testing.assert_allclose(dl.jumprelu_ste(jnp.asarray(z), jnp.asarray(THRESH), EPS), np.where(z > THRESH, z, 0))
    np.testing.assert_allclose(dz, (z > THRESH) * g, rtol=1e-6)
    want_dt = (-(THRESH / EPS) * _rect(u) * g).reshape(-1, THRESH.size).sum(0)
    assert dt.shape == THRESH.shape
    np.testing.assert_allclose(dt, want_dt, rtol=1e-5)


@pytest.mark.parametrize("lead", [(4,), (3, 4)])
def test_heaviside_ste_gradients(lead):
    z, g = _z_and_cotangent(lead)
    f = lambda z_, t_: jnp.sum(dl.heaviside_ste(z_, t_, EPS) * g)
    dz, dt = jax.grad(f, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(THRESH))

    u = (z.astype(np.float64) - THRESH) / EPS
    np.testing.assert_array_equal(dl.heaviside_ste(jnp.asarray(z), jnp.asarray(THRESH), EPS), (z > THRESH))
    np.testing.assert_array_equal(dz, np.zeros_like(z))
    want_dt = (-(1 / EPS) * _rect(u) * g).reshape(-1, THRESH.size).sum(0)
    assert dt.shape == THRESH.shape
    np.testing.assert_allclose(dt, want_dt, rtol=1e-5)


def test_jumprelu_threshold_gets_l0_gradient(strict_promotion):
    """Thresholds parameterised directly get the L0 pseudo-gradient when pre-activations sit near them."""
    bw, coef = 0.05, 0.7
    spec = dl.DictionarySpec("jumprelu", D, F, jumprelu_bandwidth=bw)
    p, x = random_params("jumprelu"), random_x()
    pre = numpy_forward("jumprelu", p, x, k=K, sparsity=0, aux=0, training=False)["pre"]
    # put every feature's threshold within bw/2 of its pre-activation on row 0
    p["threshold"] = (pre[0] + 0.01).astype(np.float32)
    pre64 = pre  # thresholds do not change pre-activations

    def l0_term(params):
        return dl.forward(spec, params, jnp.asarray(x), dl.LossWeights(sparsity=coef)).losses.sparsity

    grads = jax.grad(l0_term)(as_jax(p))
    window = _rect((pre64 - p["threshold"].astype(np.float64)) / bw)
    want = coef * np.sum(-(1 / bw) * window, axis=0) / B
    assert np.all(window[0] == 1)
    np.testing.assert_allclose(grads["threshold"], want, rtol=1e-5)
    assert np.all(np.asarray(grads["threshold"]) < 0), "raising a threshold must lower the L0 term"


# ---------------------------------------------------------------------------------------------
# Gated gradients


def _gated_grads(weights, term="total"):
    spec = dl.DictionarySpec("gated", D, F)
    params, x = as_jax(random_params("gated")), jnp.asarray(random_x())
    return jax.grad(lambda q: getattr(dl.forward(spec, q, x, weights).losses, term))(params)


def test_gated_gate_gets_no_reconstruction_gradient(strict_promotion):
    g = _gated_grads(dl.LossWeights(sparsity=0.0, aux=0.0))
    np.testing.assert_array_equal(g["b_gate"], np.zeros(F))
    for name in ("r_mag", "b_mag", "W_enc", "W_dec", "b_dec"):
        assert np.abs(np.asarray(g[name])).max() > 1e-4, f"{name} must learn from the reconstruction"


def test_gated_gate_learns_from_sparsity_and_aux(strict_promotion):
    l1 = 0.5
    g_sp = _gated_grads(dl.LossWeights(sparsity=l1, aux=0.0), "sparsity")
    p, x = random_params("gated"), random_x()
    pre = numpy_forward("gated", p, x, k=K, sparsity=0, aux=0, training=False)["pre"]
    norms = np.linalg.norm(p["W_dec"].astype(np.float64), axis=-1)
    # d/d b_gate of l1 * mean_rows sum_f relu(pre) * ||W_dec_f||
    np.testing.assert_allclose(g_sp["b_gate"], l1 * np.mean(pre > 0, axis=0) * norms, **TOL)

    g_aux = _gated_grads(dl.LossWeights(sparsity=0.0, aux=1.0), "aux")
    assert np.abs(np.asarray(g_aux["b_gate"])).max() > 1e-4
    # the auxiliary loss trains the gate through a frozen decoder (b_dec still centres the encoder input)
    np.testing.assert_array_equal(g_aux["W_dec"], np.zeros((F, D)))


# ---------------------------------------------------------------------------------------------
# decoder-norm constraint


def test_project_decoder_grad_removes_parallel_component():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(F, D))
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    g = rng.normal(size=(F, D))
    params = {"W_dec": jnp.asarray(w, jnp.float32)}
    grads = {"W_dec": jnp.asarray(g, jnp.float32), "b_dec": jnp.ones(D)}
    out = dl.project_decoder_grad(grads, params)
    got = np.asarray(out["W_dec"], np.float64)
    np.testing.assert_allclose(np.sum(got * w, -1), 0.0, atol=1e-5)
    np.testing.assert_allclose(got, g - np.sum(g * w, -1, keepdims=True) * w, atol=1e-5)
    np.testing.assert_array_equal(out["b_dec"], np.ones(D))


def test_normalise_decoder_gives_unit_rows():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(F, D)) * rng.uniform(0.1, 5.0, size=(F, 1))
    out = np.asarray(dl.normalise_decoder({"W_dec": jnp.asarray(w, jnp.float32)})["W_dec"], np.float64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, w / np.linalg.norm(w, axis=-1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_rows_stay_unit_norm_through_train_steps(tmp_path, kind):
    cfg = tiny_config(tmp_path, dictionary={"activation": kind}, train={"lr": 1e-2})
    source = make_source(cfg)
    spec = make_spec(cfg, source.d_in)
    mesh = sharding.make_mesh(cfg.mesh)
    state = init_state(cfg, spec, [next(source)])
    w0 = np.asarray(state.params["W_dec"])
    fns = build_step(cfg, spec, mesh, state)
    state = place_state(state, fns)
    for _ in range(3):
        state, metrics = fns.step(state, jax.device_put(np.asarray(next(source)), fns.batch_sharding))
    w = np.asarray(state.params["W_dec"])
    assert int(state.step) == 3
    assert np.isfinite(float(metrics["loss"]))
    assert np.abs(w - w0).max() > 1e-3, "the steps must move the decoder"
    np.testing.assert_allclose(np.linalg.norm(w, axis=-1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# init / split_params

EXPECTED = {
    "relu": ({"W_enc", "W_dec", "b_enc", "b_dec"}, {"norm_scale"}),
    "topk": ({"W_enc", "W_dec", "b_enc", "b_dec"}, {"norm_scale"}),
    "batchtopk": ({"W_enc", "W_dec", "b_enc", "b_dec"}, {"norm_scale", "threshold"}),
    "jumprelu": ({"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}, {"norm_scale"}),
    "gated": ({"W_enc", "W_dec", "b_gate", "b_mag", "r_mag", "b_dec"}, {"norm_scale"}),
}
SHAPES = {"W_enc": (D, F), "W_dec": (F, D), "b_dec": (D,), "norm_scale": ()}


@pytest.mark.parametrize("kind", KINDS)
def test_init_shapes_and_split(kind):
    spec = dl.DictionarySpec(kind, D, F, k=K)
    params = dl.init(jax.random.key(0), spec, threshold=0.25)
    trainable, buffers = dl.split_params(spec, params)
    want_train, want_buf = EXPECTED[kind]
    assert set(trainable) == want_train
    assert set(buffers) == want_buf
    for name, v in params.items():
        assert v.shape == SHAPES.get(name, (F,)), name
        assert v.dtype == jnp.float32, name
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(params["W_enc"], np.asarray(params["W_dec"]).T)
    assert float(params["norm_scale"]) == 1.0
    if kind == "jumprelu":
        np.testing.assert_array_equal(params["threshold"], np.full(F, 0.25, np.float32))


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="activation 'sparse' unknown"):
        dl.DictionarySpec("sparse", D, F)
    with pytest.raises(ValueError, match=r"k=33 must be in \[1, d_sae=32\]"):
        dl.DictionarySpec("topk", D, F, k=33)


def _aux_k_case(n_dead):
    spec = dl.DictionarySpec(activation="topk", d_in=8, d_sae=64, k=4, aux_k=4)
    keys = jax.random.split(jax.random.key(3), 6)
    params = dl.init(keys[0], spec) | {
        "b_enc": 0.3 * jax.random.normal(keys[1], (64,)),
        "b_dec": 0.2 * jax.random.normal(keys[2], (8,)),
        "norm_scale": jnp.float32(1.3),
    }
    x = jax.random.normal(keys[3], (32, 8))
    recon = 0.5 * jax.random.normal(keys[4], (32, 8))
    dead = jnp.zeros(64, jnp.bool_).at[jax.random.permutation(keys[5], 64)[:n_dead]].set(True)
    trainable = {k: v for k, v in params.items() if k != "norm_scale"}
    return spec, params, trainable, x, recon, dead


def test_aux_k_loss_and_its_gradient_equal_the_dense_formula():
    # 12 dead features fit in the pool (4 * aux_k = 16): the loss is the full formula, on every
    # AUX_K_ROW_STRIDE-th row of the batch
    spec, params, trainable, x, recon, dead = _aux_k_case(12)
    assert dl.aux_k_pool(spec) == 16
    rows = slice(None, None, dl.AUX_K_ROW_STRIDE)

    def dense(p):
        xn = x[rows] * p["norm_scale"]
        e = xn - recon[rows] * p["norm_scale"]
        pre = (xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        vals, idx = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), spec.aux_k)
        vals = jnp.where(jnp.isfinite(vals), jax.nn.relu(vals), 0.0)
        e_hat = jnp.einsum("bk,bkd->bd", vals, p["W_dec"][idx])
        scale = jnp.minimum(jnp.sum(dead) / spec.aux_k, 1.0)
        return scale * jnp.sum((e_hat - e) ** 2) / jnp.sum((e - e.mean(0)) ** 2)

    norm = {"norm_scale": params["norm_scale"]}
    key = jax.random.key(9)
    ours, g_ours = jax.value_and_grad(lambda t: dl.aux_k_loss(spec, t | norm, x, recon, dead, key))(trainable)
    ref, g_ref = jax.value_and_grad(lambda t: dense(t | norm))(trainable)
    assert float(ref) > 0
    np.testing.assert_allclose(ours, ref, **TOL)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
    live = np.asarray(~dead)
    assert np.all(np.asarray(g_ours["W_dec"])[live] == 0), "live features get no aux-k gradient"


def test_aux_k_with_more_dead_features_than_its_pool_trains_a_random_pool_of_dead_ones():
    spec, params, trainable, x, recon, dead = _aux_k_case(40)
    norm = {"norm_scale": params["norm_scale"]}

    def touched(seed):
        g = jax.grad(lambda t: dl.aux_k_loss(spec, t | norm, x, recon, dead, jax.random.key(seed)))(trainable)
        return set(np.flatnonzero(np.abs(np.asarray(g["W_enc"])).sum(0) > 0))

    a, b = touched(0), touched(1)
    assert a and b
    assert a <= set(np.flatnonzero(np.asarray(dead))) and b <= set(np.flatnonzero(np.asarray(dead)))
    assert len(a) <= dl.aux_k_pool(spec) and len(b) <= dl.aux_k_pool(spec)
    assert a != b, "another key draws another pool"


# ---------------------------------------------------------------------------------------------
# activations as values


@pytest.mark.parametrize("kind", KINDS)
def test_selected_features_encode_as_their_columns_of_the_full_encoder(kind):
    spec = dl.DictionarySpec(activation=kind, d_in=D, d_sae=F, k=K)
    pn = random_params(kind)
    p = {k: jnp.asarray(v) for k, v in pn.items()}
    x = jnp.asarray(random_x()).reshape(2, B // 2, D)
    ids = jnp.asarray([[3, 0, 17, 31, 8], [5, 5, 30, 1, 12]])
    got = np.asarray(dl.encode_selected(spec, p, x, ids))
    ref = numpy_forward(kind, pn, random_x(), k=K, sparsity=0, aux=0, training=False)
    if spec.kind.row_topk:  # the value a feature takes when selected: relu of its pre-activation
        full = np.maximum(ref["pre"], 0.0).reshape(2, B // 2, F)
    else:
        full = np.asarray(ref["acts"]).reshape(2, B // 2, F)
    want = np.take_along_axis(full, np.broadcast_to(np.asarray(ids)[:, None, :], got.shape), axis=-1)
    np.testing.assert_allclose(got, want, **TOL)
    assert np.count_nonzero(want) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_folding_an_input_shift_into_the_biases_encodes_shifted_inputs(kind):
    spec = dl.DictionarySpec(activation=kind, d_in=D, d_sae=F, k=K)
    p = {k: jnp.asarray(v) for k, v in random_params(kind).items()} | {"norm_scale": jnp.float32(1.0)}
    x = jnp.asarray(random_x())
    shift = jnp.linspace(-0.5, 0.7, D)
    folded = spec.kind.fold_input_shift(p, shift)
    np.testing.assert_allclose(dl.encode(spec, folded, x), dl.encode(spec, p, x - shift), **TOL)


def test_every_activation_is_one_registry_entry_with_its_own_parameters():
    assert set(dl.ACTIVATIONS) == set(KINDS)
    for name, kind in dl.ACTIVATIONS.items():
        spec = dl.DictionarySpec(activation=name, d_in=D, d_sae=F, k=K)
        params = dl.init(jax.random.key(0), spec)
        assert set(params) == {"W_enc", "W_dec", "b_dec", "norm_scale", *kind.feature_params}
        assert kind.encoder_bias in kind.feature_params
    with pytest.raises(ValueError, match="activation 'sparse' unknown"):
        dl.activation("sparse")


def test_a_new_activation_is_one_value_and_its_registry_entry(tmp_path, monkeypatch):
    """The README's example kind (a ReLU with a fixed threshold), registered, trains in the sharded
    step, encodes, and encodes selected features, with nothing outside its definition."""
    from jaxinterp.config import MeshConfig
    from jaxinterp.dictionaries import kinds
    from jaxinterp.train import make_mesh

    def _train_relu_t(spec, p, xn, weights, training):
        pre = kinds._raw(spec, p, xn) + p["b_enc"]
        acts = jnp.where(pre > 0.1, pre, 0.0)
        return kinds.TrainTerms(acts, kinds._decode(spec, p, acts), pre, sparsity=kinds._l1(weights, p, acts))

    relu_t = kinds.Activation("relu_t", ("b_enc",), ("norm_scale",), "b_enc",
                              lambda raw, f: jnp.where(raw + f["b_enc"] > 0.1, raw + f["b_enc"], 0.0),
                              lambda d_sae, t: kinds._zeros(d_sae, "b_enc"), sparsity_penalty="l1", train=_train_relu_t)
    monkeypatch.setitem(kinds.ACTIVATIONS, "relu_t", relu_t)
    cfg = tiny_config(tmp_path, dictionary={"activation": "relu"}, mesh={"data": 4, "model": 2})
    src = make_source(cfg)
    x = np.asarray(next(src))
    spec = dl.DictionarySpec("relu_t", x.shape[1], 64)
    state = init_state(cfg, spec, [x])
    fns = build_step(cfg, spec, make_mesh(MeshConfig(data=4, model=2)), state)
    state = place_state(state, fns)
    for _ in range(3):
        state, metrics = fns.step(state, jax.device_put(np.asarray(next(src)), fns.batch_sharding))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["sparsity_loss"]) > 0
    p = jax.device_get(state.dictionary)
    f = np.asarray(dl.encode(spec, p, jnp.asarray(x)))
    assert ((f == 0) | (f > 0.1)).all() and (f > 0).any()
    ids = jnp.asarray(np.tile(np.arange(5), (4, 1)), jnp.int32)
    sel = dl.encode_selected(spec, p, jnp.asarray(x[:32].reshape(4, 8, -1)), ids)
    np.testing.assert_allclose(sel, f[:32].reshape(4, 8, -1)[:, :, :5], rtol=1e-5, atol=1e-6)
