"""Cross-layer transcoders against an explicit float64 NumPy implementation: the triangular
forward, every loss term (the tanh penalty on each feature's decoder norm concatenated over its
targets, the pre-activation penalty) and every gradient, written out by hand from the definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.dictionaries import clt
from jaxinterp.errors import UsageError

LAM, LAM_P = 0.3, 0.7


def _params(spec, seed=0):
    rng = np.random.default_rng(seed)
    p = {k: np.asarray(v, np.float64) for k, v in clt.init(jax.random.key(seed), spec).items()}
    p["W_enc"] = rng.normal(0, 0.5, p["W_enc"].shape)
    p["b_enc"] = rng.normal(0, 0.2, p["b_enc"].shape)
    p["b_dec"] = rng.normal(0, 0.1, p["b_dec"].shape)
    p["norm_in"] = rng.uniform(0.5, 1.5, spec.n_layers)
    p["norm_out"] = rng.uniform(0.5, 1.5, spec.n_layers)
    for l in range(spec.n_layers):
        p[f"W_dec_{l}"] = rng.normal(0, 0.4, p[f"W_dec_{l}"].shape)
    if "threshold" in p:
        p["threshold"] = rng.uniform(0.1, 0.6, p["threshold"].shape)
    if "W_skip" in p:
        p["W_skip"] = rng.normal(0, 0.2, p["W_skip"].shape)
    return p


def _reference(spec, p, x, y):
    """(loss terms, gradients) of the CLT loss, in float64, loops over (source, target) pairs."""
    b, n = x.shape[0], spec.n_layers
    eps, c = spec.jumprelu_bandwidth, spec.tanh_scale
    xn, yn = x * p["norm_in"][:, None], y * p["norm_out"][:, None]
    h = np.einsum("bld,ldf->blf", xn, p["W_enc"]) + p["b_enc"]
    if spec.activation == "jumprelu":
        on = h > p["threshold"]
    else:
        on = h >= np.sort(h, axis=-1)[..., -spec.k][..., None]
    a = np.where(on, np.maximum(h, 0.0), 0.0)
    r = np.broadcast_to(p["b_dec"], y.shape).copy()
    for l in range(n):
        for j in range(l, min(n, l + spec.targets(l))):
            r[:, j] += a[:, l] @ p[f"W_dec_{l}"][:, j - l]
    if spec.skip:
        for j in range(n):
            r[:, j] += xn[:, j] @ p["W_skip"][j]
    e = r - yn
    mse_layer = (e**2).sum(-1).mean(0)
    norms = np.stack([np.sqrt((p[f"W_dec_{l}"] ** 2).sum((1, 2))) for l in range(n)])
    jump = spec.activation == "jumprelu"
    sparsity = np.tanh(c * norms * a).sum((1, 2)).mean() if jump else 0.0
    pre = (np.maximum(p["threshold"] - h, 0.0) * norms).sum((1, 2)).mean() if jump else 0.0
    terms = {"mse": mse_layer.sum(), "mse_per_layer": mse_layer, "sparsity": sparsity, "pre_act": pre,
             "loss": mse_layer.sum() + LAM * sparsity + LAM_P * pre, "l0_per_layer": (a > 0).sum(-1).mean(0)}

    g = {k: np.zeros_like(v) for k, v in p.items()}
    dr = 2.0 * e / b
    g["b_dec"] = dr.sum(0)
    da = np.zeros_like(a)
    for l in range(n):
        for j in range(l, min(n, l + spec.targets(l))):
            g[f"W_dec_{l}"][:, j - l] += a[:, l].T @ dr[:, j]
            da[:, l] += dr[:, j] @ p[f"W_dec_{l}"][:, j - l].T
    if spec.skip:
        for j in range(n):
            g["W_skip"][j] = xn[:, j].T @ dr[:, j]
    dh = np.zeros_like(h)
    if jump:
        sech2 = 1.0 - np.tanh(c * norms * a) ** 2
        da += LAM / b * c * norms * sech2
        dnorm = LAM / b * (c * a * sech2).sum(0) + LAM_P / b * np.maximum(p["threshold"] - h, 0.0).sum(0)
        for l in range(n):
            g[f"W_dec_{l}"] += (dnorm[l] / norms[l])[:, None, None] * p[f"W_dec_{l}"]
        below = p["threshold"] > h
        dh += -LAM_P / b * below * norms
        rect = (np.abs((h - p["threshold"]) / eps) < 0.5).astype(float)
        g["threshold"] = (-(p["threshold"] / eps) * rect * da).sum(0) + (LAM_P / b * below * norms).sum(0)
    dh += np.where(on & (h > 0), da, 0.0)
    g["W_enc"] = np.einsum("bld,blf->ldf", xn, dh)
    g["b_enc"] = dh.sum(0)
    return terms, g


@pytest.mark.parametrize("activation,span,skip", [("jumprelu", None, False), ("jumprelu", 2, True),
                                                  ("topk", None, False), ("topk", 3, True)])
def test_clt_loss_terms_and_gradients_equal_numpy(activation, span, skip):
    spec = clt.CLTSpec(activation, n_layers=4, d_model=6, d_sae=9, k=3, span=span, skip=skip)
    p = _params(spec)
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, (16, 4, 6)), rng.normal(0, 1, (16, 4, 6))
    want, want_g = _reference(spec, p, x, y)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    weights = clt.LossWeights(sparsity=LAM, pre_act=LAM_P)

    def loss(trainable):
        out = clt.forward(spec, params | trainable, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), weights)
        return out.loss, out

    trainable = {k: v for k, v in params.items() if not k.startswith("norm_")}
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    for name in ("loss", "mse", "mse_per_layer", "sparsity", "pre_act", "l0_per_layer"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), want[name], rtol=2e-5, atol=1e-5, err_msg=name)
    assert 0 < float(out.l0_per_layer.mean()) < spec.d_sae  # some features on, some off
    for name, gv in grads.items():
        np.testing.assert_allclose(np.asarray(gv), want_g[name], rtol=1e-4, atol=2e-5, err_msg=name)
    # the triangle: a source writes only to its targets
    assert [params[f"W_dec_{l}"].shape[1] for l in range(4)] == [spec.targets(l) for l in range(4)]
    assert [spec.targets(l) for l in range(4)] == ([4, 3, 2, 1] if span is None else [min(span, 4 - l) for l in range(4)])


def test_clt_reconstruct_is_the_forward_in_raw_units_and_counts_its_weights():
    spec = clt.CLTSpec("jumprelu", n_layers=3, d_model=4, d_sae=5, skip=True)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(spec, seed=2).items()}
    x = jnp.asarray(np.random.default_rng(3).normal(0, 1, (8, 3, 4)), jnp.float32)
    xn = clt.normalise_in(p, x)
    want = clt.decode(spec, p, clt.activate(spec, p, clt.pre_acts(spec, p, xn)), xn) / p["norm_out"][:, None]
    np.testing.assert_allclose(np.asarray(clt.reconstruct(spec, p, x)), np.asarray(want), rtol=1e-6)
    assert spec.n_weights == sum(int(np.prod(v.shape)) for k, v in p.items() if not k.startswith("norm_"))
    assert clt.param_axes(spec).keys() == p.keys()
    with pytest.raises(UsageError, match="CLT activation 'gated'"):
        clt.CLTSpec("gated", 2, 4, 5)
    with pytest.raises(UsageError, match="span=0"):
        clt.CLTSpec("topk", 2, 4, 5, k=2, span=0)


def test_clt_gradients_on_a_4x2_mesh_equal_one_device():
    """Parameters split over d_sae on `model` as `param_axes` declare, rows over `data` (the
    trainer's mesh of Auto axes): the same loss and gradients as on one device."""
    from jaxinterp.sharding import named

    spec = clt.CLTSpec("jumprelu", n_layers=3, d_model=8, d_sae=16, span=2)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(spec, seed=4).items()}
    rng = np.random.default_rng(5)
    x, y = (jnp.asarray(rng.normal(0, 1, (32, 3, 8)), jnp.float32) for _ in range(2))
    weights = clt.LossWeights(sparsity=LAM, pre_act=LAM_P)
    step = jax.jit(jax.value_and_grad(lambda q, a, b: clt.forward(spec, q, a, b, weights).loss))
    want_loss, want = step(p, x, y)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as training's
    axes = clt.param_axes(spec)
    placed = {k: jax.device_put(v, named(mesh, axes[k], v.shape, name=k)) for k, v in p.items()}
    rows = named(mesh, ("batch", None, None), x.shape)
    got_loss, got = step(placed, jax.device_put(x, rows), jax.device_put(y, rows))
    assert placed["W_enc"].sharding.spec[2] == "model" and placed["W_dec_0"].sharding.spec[0] == "model"
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_one_forward_gives_every_covered_layers_input_and_target():
    """The rows of one stopped-early forward over the CLT's sites split into x [N, L, D] and
    y [N, L, D] equal each site captured alone."""
    from helpers import TINY_DECODERS, tiny_model

    from jaxinterp.data.activations import site_activations

    model = tiny_model(TINY_DECODERS["llama"])
    spec = clt.CLTSpec("topk", n_layers=2, d_model=model.cfg.d_model, d_sae=8, k=2, first_layer=1,
                       input_point="mlp_in")
    inputs, targets = clt.sites(spec)
    assert inputs == ("blocks.1.mlp_in", "blocks.2.mlp_in") and targets == ("blocks.1.mlp_out", "blocks.2.mlp_out")
    ctx = np.random.default_rng(0).integers(1, model.cfg.vocab_size, size=(3, 7)).astype(np.int32)
    x, y = clt.split_rows(spec, jnp.asarray(site_activations(model, ctx, inputs + targets)))
    for i, (a, b) in enumerate(zip(inputs, targets)):
        np.testing.assert_allclose(np.asarray(x[:, i]), site_activations(model, ctx, a), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(y[:, i]), site_activations(model, ctx, b), rtol=1e-6)
    with pytest.raises(UsageError, match="expected \\[N, 128\\]"):
        clt.split_rows(spec, jnp.zeros((4, 100)))
    with pytest.raises(UsageError, match="input_point 'resid_post'"):
        clt.CLTSpec("topk", 2, 4, 5, k=2, input_point="resid_post")


def test_memory_estimate_and_refusal():
    """The published Gemma-2-2B CLT size (F 16,384 per layer, D 2,304, L 26: about 14 billion weights)
    and a per-device estimate that is refused over budget with its numbers, before any allocation."""
    gemma = clt.CLTSpec("jumprelu", n_layers=26, d_model=2304, d_sae=16384)
    assert gemma.n_weights == 16384 * 2304 * (26 + 26 * 27 // 2) + 26 * 16384 * 2 + 26 * 2304
    assert 14.0e9 < gemma.n_weights < 14.3e9
    est = clt.memory_estimate(gemma, batch=4096, data=4, model=8)
    per_device = (gemma.n_weights - 2 * 26 * 2304 - 2 * 26) // 8 + 2 * 26 * 2304 + 2 * 26
    assert est.weights == 4 * per_device and est.optimizer == 8 * per_device and est.gradients == 4 * per_device
    assert est.activations == 1024 * (2 * 26 * 2304 + 4 * 26 * 16384 // 8) * 4
    assert est.total / 2**30 == pytest.approx(4 * 4 * 14.2e9 / 8 / 2**30 + 1.27, rel=0.01)  # ~27.8 GiB
    with pytest.raises(UsageError, match=rf"needs {est.total / 2**30:.2f} GiB per device .* over the budget of 16\.00 GiB"):
        clt.check_memory(est, 16 * 2**30)
    clt.check_memory(clt.memory_estimate(clt.CLTSpec("topk", 4, 6, 9, k=2), batch=8), 2**20)
    # a span bounds the triangle: L + sum min(span, L - l) decoder blocks
    assert clt.CLTSpec("topk", 4, 6, 9, k=2, span=2).n_weights == 9 * 6 * (4 + 2 + 2 + 2 + 1) + 4 * 9 + 4 * 6
