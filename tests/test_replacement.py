"""The replacement model: a CLT standing in for a tiny model's MLPs, with and without error terms."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY_DECODERS, tiny_model
from jaxinterp.circuits import replacement_forward
from jaxinterp.dictionaries import clt
from jaxinterp.models import Plan, forward
from jaxinterp.models.intercept import SiteError


def _random_clt(model, activation="jumprelu", span=None, seed=0):
    spec = clt.CLTSpec(activation, n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=12, k=3, span=span)
    p = dict(clt.init(jax.random.key(seed), spec))
    p["b_enc"] = 0.3 * jax.random.normal(jax.random.key(seed + 1), p["b_enc"].shape)
    return spec, p


@pytest.mark.parametrize("activation,span", [("jumprelu", None), ("topk", 2)])
def test_with_error_terms_the_replacement_model_is_the_model_exactly(activation, span):
    model = tiny_model(TINY_DECODERS["llama"])
    spec, p = _random_clt(model, activation, span)
    tokens = np.random.default_rng(0).integers(1, model.cfg.vocab_size, size=(2, 9))
    want = forward(model, jnp.asarray(tokens)).logits
    got = replacement_forward(model, tokens, spec, p, error_terms=True).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    without = replacement_forward(model, tokens, spec, p).logits
    assert float(jnp.max(jnp.abs(without - want))) > 1e-2  # a random CLT is no stand-in without them


def _relu_model_and_exact_clt():
    cfg = dataclasses.replace(TINY_DECODERS["gpt2-like"], activation="relu", out_bias=False, qkv_bias=False)
    model = tiny_model(cfg)
    n, d, f = cfg.n_layers, cfg.d_model, cfg.d_ff
    spec = clt.CLTSpec("jumprelu", n_layers=n, d_model=d, d_sae=f, input_point="mlp_in")
    p = dict(clt.init(jax.random.key(0), spec, threshold=0.0))
    p["W_enc"] = jnp.stack([model.blocks[i].w_up[...] for i in range(n)]).astype(jnp.float32)
    for l in range(n):
        p[f"W_dec_{l}"] = jnp.zeros((f, n - l, d), jnp.float32).at[:, 0].set(model.blocks[l].w_down[...])
    return model, spec, p


def test_a_clt_holding_the_mlps_weights_reproduces_the_model():
    """A model with plain ReLU MLPs (no biases): a CLT reading mlp_in with W_enc = W_up, threshold 0,
    and each layer's own decoder W_down (later targets zero) is the same model, logits to 1e-4; the
    MLP outputs it writes at each layer are computed from the replaced earlier layers."""
    model, spec, p = _relu_model_and_exact_clt()
    cfg, d, f = model.cfg, model.cfg.d_model, model.cfg.d_ff
    tokens = np.random.default_rng(1).integers(1, cfg.vocab_size, size=(3, 11))
    want = forward(model, jnp.asarray(tokens)).logits
    got = replacement_forward(model, tokens, spec, p).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    # moving one decoder row changes the logits: the replacement is really in the forward
    p["W_dec_0"] = p["W_dec_0"].at[:, 1].set(0.1 * jax.random.normal(jax.random.key(1), (f, d)))  # not a constant
    # shift: LayerNorm would remove that
    assert float(jnp.max(jnp.abs(replacement_forward(model, tokens, spec, p).logits - want))) > 1e-3


def test_a_derived_value_must_come_before_its_reader():
    model = tiny_model(TINY_DECODERS["llama"])
    ident = lambda x, p, pos, *r: x  # noqa: E731
    bad = Plan(edits=(("blocks.0.mlp_out", ident, "late"),), derive=(("late", "blocks.1.resid_mid", ident),))
    with pytest.raises(SiteError, match="reads 'late'"):
        forward(model, jnp.ones((1, 4), jnp.int32), plan=bad)
    clash = Plan(derive=(("blocks.0.mlp_out", "blocks.0.resid_mid", ident),))
    with pytest.raises(SiteError, match="not site names"):
        forward(model, jnp.ones((1, 4), jnp.int32), plan=clash)


def test_fidelity_metrics_equal_their_definitions():
    """Agreement, KL, the three cross-entropies, ce_loss_score, per-layer FVU and L0 against NumPy
    on the logits and activations; a CLT holding the MLPs' weights scores as the model itself."""
    from jaxinterp.circuits import replacement_fidelity

    model, spec, exact = _relu_model_and_exact_clt()
    ctx = np.random.default_rng(2).integers(1, model.cfg.vocab_size, size=(5, 8)).astype(np.int32)
    got = replacement_fidelity(model, spec, exact, ctx, batch=2)
    assert got["agreement"] == 1.0 and abs(got["kl"]) < 1e-5 and got["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert max(got["fvu_per_layer"]) < 1e-8 and got["eval_tokens"] == 5 * 7

    noisy = dict(exact)
    noisy["W_enc"] = exact["W_enc"] + 0.3 * jax.random.normal(jax.random.key(5), exact["W_enc"].shape)
    got = replacement_fidelity(model, spec, noisy, ctx, batch=2)

    def logp(logits):
        z = np.asarray(logits, np.float64)[:, :-1]
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    orig = logp(forward(model, jnp.asarray(ctx)).logits)
    repl = logp(replacement_forward(model, ctx, spec, noisy).logits)
    zero = Plan(edits=tuple((f"blocks.{i}.mlp_out", lambda x, p, pos: jnp.zeros_like(x)) for i in range(3)))
    abl = logp(forward(model, jnp.asarray(ctx), plan=zero).logits)
    nxt = ctx[:, 1:, None]
    ce = [float(-np.take_along_axis(a, nxt, -1).mean()) for a in (orig, repl, abl)]
    assert got["agreement"] == pytest.approx(float((orig.argmax(-1) == repl.argmax(-1)).mean()))
    assert got["kl"] == pytest.approx(float((np.exp(orig) * (orig - repl)).sum(-1).mean()), rel=1e-4)
    assert [got["ce_original"], got["ce_replacement"], got["ce_ablated"]] == pytest.approx(ce, rel=1e-5)
    assert got["ce_loss_score"] == pytest.approx((ce[2] - ce[1]) / (ce[2] - ce[0]), rel=1e-4)
    assert 0 < got["agreement"] < 1
    from jaxinterp.data.activations import site_activations

    inputs, targets = clt.sites(spec)
    x = np.stack([site_activations(model, ctx, s) for s in inputs], 1)
    y = np.stack([site_activations(model, ctx, s) for s in targets], 1).astype(np.float64)
    r = np.asarray(clt.reconstruct(spec, noisy, jnp.asarray(x)), np.float64)
    fvu = ((r - y) ** 2).sum((0, 2)) / ((y - y.mean(0)) ** 2).sum((0, 2))
    np.testing.assert_allclose(got["fvu_per_layer"], fvu, rtol=1e-4)
    a = np.asarray(clt.encode(spec, noisy, jnp.asarray(x)))
    np.testing.assert_allclose(got["l0_per_layer"], (a > 0).sum(-1).mean(0), rtol=1e-6)
    assert got["dead_fraction"] == pytest.approx(float(1 - (a > 0).any(0).mean()))


@pytest.mark.parametrize("mode,value", [("add", 2.0), ("clamp", 1.5), ("ablate", 0.0)])
def test_steering_a_clt_feature_writes_its_decoder_vectors_into_every_target(mode, value):
    """Each target layer's mlp_out moves by exactly (a' - a) W_dec_l[i, j - l] / norm_out[j] over what
    its MLP computes from its (steered) input; layers the feature does not write to move by nothing."""
    from jaxinterp.steering.clt import steer_clt

    model = tiny_model(TINY_DECODERS["llama"])
    spec = clt.CLTSpec("jumprelu", n_layers=3, d_model=model.cfg.d_model, d_sae=12, span=2)
    p = dict(clt.init(jax.random.key(0), spec, threshold=0.05))
    p["b_enc"] = 0.5 + 0.1 * jax.random.normal(jax.random.key(1), p["b_enc"].shape)  # feature 3 fires
    p["norm_out"] = jnp.asarray([0.5, 2.0, 1.0], jnp.float32)
    plan, ep = steer_clt(spec, p, {(1, 3): value}, mode)
    sites = tuple(f"blocks.{j}.{pt}" for j in range(3) for pt in ("resid_mid", "mlp_in", "mlp_out"))
    plan = dataclasses.replace(plan, capture=sites)
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, model.cfg.vocab_size, size=(2, 6)))
    got = forward(model, tokens, plan=plan, edit_params=ep).captured
    x1 = got["blocks.1.resid_mid"]
    a = np.asarray(clt.encode(spec, p, jnp.stack([x1] * 3, 2).reshape(-1, 3, spec.d_model)))[:, 1, 3].reshape(2, 6)
    assert (a > 0).any() and (a == 0).any()  # tokens where it fires and where it does not
    new = {"add": a + value, "clamp": np.full_like(a, value), "ablate": np.zeros_like(a)}[mode]
    for j in range(3):
        moved = got[f"blocks.{j}.mlp_out"] - model.blocks[j].mlp(model.cfg, got[f"blocks.{j}.mlp_in"])
        want = 0.0 if j == 0 else (new - a)[..., None] * np.asarray(p["W_dec_1"][3, j - 1]) / float(p["norm_out"][j])
        np.testing.assert_allclose(np.asarray(moved), np.broadcast_to(want, moved.shape), atol=2e-5, rtol=1e-4)


def test_the_replacement_model_generates_with_the_kv_cache_without_recompiling(monkeypatch):
    """Greedy generation through the replacement model: with error terms the tokens and logits of
    the model; a CLT holding a ReLU model's MLP weights generates the model's tokens; new CLT
    weights of the same shape reuse the compiled program; a steered mlp_out is refused."""
    import chex

    from jaxinterp import generation
    from jaxinterp.circuits import replacement_intercepts
    from jaxinterp.generation import Sampling, generate
    from jaxinterp.steering import SteeringError, SteeringVector

    model, spec, exact = _relu_model_and_exact_clt()
    prompts = [[2, 3, 4, 5], [7, 8, 9]]
    plain = generate(model, prompts, max_new_tokens=6, return_logits=True)
    chex.clear_trace_counter()
    counted = jax.jit(chex.assert_max_traces(generation.generate_program, n=1), static_argnames=generation.STATIC)
    monkeypatch.setattr(generation, "_generate", counted)
    got = generate(model, prompts, max_new_tokens=6, return_logits=True, intercepts=replacement_intercepts(spec, exact))
    np.testing.assert_array_equal(got.tokens, plain.tokens)
    np.testing.assert_allclose(got.logits, plain.logits, atol=1e-4)
    noisy = dict(exact)
    noisy["W_enc"] = exact["W_enc"] + 0.5 * jax.random.normal(jax.random.key(9), exact["W_enc"].shape)
    other = generate(model, prompts, max_new_tokens=6, return_logits=True, intercepts=replacement_intercepts(spec, noisy))
    assert np.abs(other.logits - plain.logits).max() > 1e-3  # another CLT, the same compiled program
    chex.clear_trace_counter()
    monkeypatch.undo()
    with_errors = generate(model, prompts, max_new_tokens=6, return_logits=True,
                           intercepts=replacement_intercepts(spec, noisy, error_terms=True))
    np.testing.assert_array_equal(with_errors.tokens, plain.tokens)
    # another compiled program than the plain one: equal up to XLA's float reassociation
    np.testing.assert_allclose(with_errors.logits, plain.logits, atol=2e-6, rtol=2e-6)
    with pytest.raises(SteeringError, match="both steered and edited"):
        generate(model, prompts, max_new_tokens=2, intercepts=replacement_intercepts(spec, exact),
                 steering=SteeringVector("blocks.1.mlp_out", vector=np.ones(model.cfg.d_model)), sampling=Sampling())


@pytest.mark.parametrize("activation,span,skip", [("jumprelu", None, True), ("topk", 2, False)])
def test_each_replaced_mlp_out_is_the_clt_of_this_forwards_own_inputs(activation, span, skip):
    """What the replacement model writes at every covered mlp_out equals `clt.reconstruct` of the
    input sites captured in the same forward (skips included)."""
    model = tiny_model(TINY_DECODERS["llama"])
    spec = clt.CLTSpec(activation, n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=12, k=3, span=span,
                       skip=skip)
    p = dict(clt.init(jax.random.key(2), spec))
    p["b_enc"] = 0.3 * jax.random.normal(jax.random.key(3), p["b_enc"].shape)
    if skip:
        p["W_skip"] = 0.2 * jax.random.normal(jax.random.key(4), p["W_skip"].shape)
    inputs, targets = clt.sites(spec)
    tokens = np.random.default_rng(5).integers(1, model.cfg.vocab_size, size=(2, 9))
    res = replacement_forward(model, tokens, spec, p, capture=inputs + targets)
    x = jnp.stack([res.captured[s] for s in inputs], 2).reshape(-1, spec.n_layers, spec.d_model)
    y = jnp.stack([res.captured[s] for s in targets], 2).reshape(-1, spec.n_layers, spec.d_model)
    np.testing.assert_allclose(np.asarray(y), np.asarray(clt.reconstruct(spec, p, x)), rtol=2e-4, atol=2e-5)


def test_adding_to_a_clt_feature_through_steering_vectors_equals_steer_clt_and_reads_see_it():
    """`steering_vectors` (today's specs, raw vectors at each target mlp_out) moves the model as
    `steer_clt` add does; `top_features` reads each layer's strongest features of the forward."""
    from jaxinterp.steering.clt import steer_clt, steering_vectors, top_features
    from jaxinterp.steering.spec import compile_steering

    model = tiny_model(TINY_DECODERS["llama"])
    spec = clt.CLTSpec("jumprelu", n_layers=3, d_model=model.cfg.d_model, d_sae=12, span=2)
    p = dict(clt.init(jax.random.key(0), spec, threshold=0.05))
    p["b_enc"] = 0.5 + 0.1 * jax.random.normal(jax.random.key(1), p["b_enc"].shape)
    p["norm_out"] = jnp.asarray([0.5, 2.0, 1.0], jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, model.cfg.vocab_size, size=(2, 6)))
    features = {(0, 2): 1.5, (1, 3): -2.0}
    plan, ep = steer_clt(spec, p, features, "add")
    want = forward(model, tokens, plan=plan, edit_params=ep).logits
    vectors = steering_vectors(spec, p, features)
    assert sorted(v.site for v in vectors) == ["blocks.0.mlp_out", "blocks.1.mlp_out", "blocks.2.mlp_out"]
    edits, sparams = compile_steering(vectors, None, model.cfg, [6, 6])
    got = forward(model, tokens, plan=Plan(edits=edits), edit_params=sparams).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(got - forward(model, tokens).logits))) > 1e-3
    vals, ids = top_features(model, tokens, spec, p, k=4)
    assert vals.shape == ids.shape == (2, 6, 3, 4)
    x = forward(model, tokens, plan=Plan(capture=clt.sites(spec)[0])).captured
    a = clt.encode(spec, p, jnp.stack([x[s] for s in clt.sites(spec)[0]], 2).reshape(12, 3, spec.d_model))
    np.testing.assert_allclose(np.asarray(vals).reshape(12, 3, 4), np.sort(np.asarray(a), -1)[..., ::-1][..., :4],
                               rtol=1e-5, atol=1e-6)
