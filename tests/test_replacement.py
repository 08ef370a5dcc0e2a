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


def test_a_clt_holding_the_mlps_weights_reproduces_the_model():
    """A model with plain ReLU MLPs (no biases): a CLT reading mlp_in with W_enc = W_up, threshold 0,
    and each layer's own decoder W_down (later targets zero) is the same model, logits to 1e-4; the
    MLP outputs it writes at each layer are computed from the replaced earlier layers."""
    cfg = dataclasses.replace(TINY_DECODERS["gpt2-like"], activation="relu", out_bias=False, qkv_bias=False)
    model = tiny_model(cfg)
    n, d, f = cfg.n_layers, cfg.d_model, cfg.d_ff
    spec = clt.CLTSpec("jumprelu", n_layers=n, d_model=d, d_sae=f, input_point="mlp_in")
    p = dict(clt.init(jax.random.key(0), spec, threshold=0.0))
    blocks = model.blocks
    p["W_enc"] = jnp.stack([blocks[i].w_up[...] for i in range(n)]).astype(jnp.float32)
    for l in range(n):
        w = jnp.zeros((f, n - l, d), jnp.float32)
        p[f"W_dec_{l}"] = w.at[:, 0].set(blocks[l].w_down[...].astype(jnp.float32))
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
