"""Llama parity with transformers: a tiny random LlamaForCausalLM saved as safetensors, loaded here,
compared logit by logit and at every intercept site with transformers' hidden states (float32)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jaxinterp.models.hf import CheckpointError, load_hf  # noqa: E402
from jaxinterp.models.intercept import POINTS, Plan, SiteError  # noqa: E402
from jaxinterp.models.llama import forward  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_llama(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=request.param, attention_bias=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _hf_run(model, tokens):
    with torch.no_grad():
        out = model(torch.tensor(tokens), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def test_logits_and_residual_sites_match_transformers(tiny_llama):
    hf_model, path = tiny_llama
    model = load_hf(path)
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 11))
    logits, hidden = _hf_run(hf_model, tokens)
    n = model.cfg.n_layers
    sites = ("embed", *(f"blocks.{i}.resid_post" for i in range(n)), *(f"blocks.{i}.{p}" for i in range(n) for p in POINTS))
    res = forward(model, jnp.asarray(tokens), plan=Plan(capture=tuple(dict.fromkeys(sites))))
    np.testing.assert_allclose(np.asarray(res.logits), logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(res.captured["embed"]), hidden[0], atol=TOL, rtol=0)
    for i in range(n - 1):  # transformers' last hidden state is after the final norm
        np.testing.assert_allclose(np.asarray(res.captured[f"blocks.{i}.resid_post"]), hidden[i + 1], atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(res.captured[f"blocks.{i + 1}.resid_pre"]), hidden[i + 1], atol=TOL, rtol=0)
    for i in range(n):  # the decomposition of each block holds
        c = {p: np.asarray(res.captured[f"blocks.{i}.{p}"]) for p in POINTS}
        np.testing.assert_allclose(c["resid_mid"], c["resid_pre"] + c["attn_out"], atol=TOL)
        np.testing.assert_allclose(c["resid_post"], c["resid_mid"] + c["mlp_out"], atol=TOL)


def test_attention_and_mlp_sites_match_transformers_modules(tiny_llama):
    hf_model, path = tiny_llama
    model = load_hf(path)
    tokens = np.random.default_rng(1).integers(0, 97, size=(1, 9))
    grabbed = {}
    hooks = []
    for i, layer in enumerate(hf_model.model.layers):
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: grabbed.__setitem__(f"blocks.{i}.attn_out", o[0].numpy())))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: grabbed.__setitem__(f"blocks.{i}.mlp_out", o.numpy())))
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: grabbed.__setitem__(f"blocks.{i}.mlp_in", a[0].numpy())))
    _hf_run(hf_model, tokens)
    for h in hooks:
        h.remove()
    res = forward(model, jnp.asarray(tokens), plan=Plan(capture=tuple(grabbed)))
    for site, want in grabbed.items():
        np.testing.assert_allclose(np.asarray(res.captured[site]), want, atol=TOL, rtol=0, err_msg=site)


def test_left_padding_matches_unpadded_rows(tiny_llama):
    _, path = tiny_llama
    model = load_hf(path)
    row = np.array([[5, 17, 3, 44, 9]])
    padded = np.array([[0, 0, 5, 17, 3, 44, 9]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1]])
    a = forward(model, jnp.asarray(row)).logits
    b = forward(model, jnp.asarray(padded), attention_mask=jnp.asarray(mask)).logits
    np.testing.assert_allclose(np.asarray(b)[:, 2:], np.asarray(a), atol=TOL)


def test_stop_early_returns_same_site_and_no_logits(tiny_llama):
    _, path = tiny_llama
    model = load_hf(path)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, size=(2, 6)))
    full = forward(model, tokens, plan=Plan(capture=("blocks.0.resid_post",)))
    early = forward(model, tokens, plan=Plan(capture=("blocks.0.resid_post",), stop_early=True))
    assert early.logits is None
    np.testing.assert_array_equal(np.asarray(early.captured["blocks.0.resid_post"]),
                                  np.asarray(full.captured["blocks.0.resid_post"]))


def test_edit_params_are_data(tiny_llama):
    """An edit at one site changes later sites by exactly its effect; new values do not recompile."""
    from jaxinterp.models import llama as llama_mod

    _, path = tiny_llama
    model = load_hf(path)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, size=(1, 5)))
    plan = Plan(capture=("blocks.0.resid_post", "blocks.1.resid_pre"),
                edits=(("blocks.0.resid_post", lambda x, p: x + p["v"]),))
    before = llama_mod._forward._cache_size()
    outs = []
    for s in (0.0, 1.0, 2.0):
        v = jnp.full((model.cfg.d_model,), s, jnp.float32)
        outs.append(forward(model, tokens, plan=plan, edit_params={"blocks.0.resid_post": {"v": v}}))
    assert llama_mod._forward._cache_size() - before == 1
    np.testing.assert_allclose(np.asarray(outs[2].captured["blocks.1.resid_pre"] - outs[0].captured["blocks.1.resid_pre"]),
                               2.0, atol=1e-5)


def test_bad_sites_and_checkpoints(tiny_llama, tmp_path):
    _, path = tiny_llama
    model = load_hf(path)
    tokens = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(SiteError, match="out of range"):
        forward(model, tokens, plan=Plan(capture=("blocks.9.resid_post",)))
    with pytest.raises(SiteError, match="not found"):
        forward(model, tokens, plan=Plan(capture=("blocks.0.resid",)))
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_hf(bad)
    (bad / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(CheckpointError, match="not supported"):
        load_hf(bad)
