"""Parity with transformers for each family: a tiny random model saved as safetensors, loaded here,
compared logit by logit and at every intercept site with transformers' hidden states and module
outputs (float32, max abs difference <= 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jaxinterp.models import decoder as decoder_mod  # noqa: E402
from jaxinterp.models.decoder import forward  # noqa: E402
from jaxinterp.models.hf import CheckpointError, load_hf  # noqa: E402
from jaxinterp.models.intercept import POINTS, Plan, SiteError  # noqa: E402
from jaxinterp.models.registry import load_model  # noqa: E402

TOL = 1e-4
VOCAB = 97


def _llama(tied: bool):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied, attention_bias=False))


def _llama3():
    # Llama 3's RoPE scaling set so that head_dim 8's four frequencies (wavelengths 6, 167, 4,443 and
    # 118,143 positions) fall in every band: kept (< 200 / 16), interpolated, slowed 8x (> 200 / 1).
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 16.0, "original_max_position_embeddings": 200}))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False))


def _qwen3():
    # head_dim 16 set apart from hidden_size / heads (8), as Qwen3's configs do
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False))


def _gemma2():
    # A 4-token sliding window on alternate layers, so that the 11-token inputs exercise it.
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
        sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, pad_token_id=0,
        attn_implementation="eager"))


def _gemma3():
    # Gemma 3 4B's layout in small: sliding layers around a full one (window 4), local RoPE base
    # 10,000, global 1,000,000 with linear scaling 8, q/k norms, no soft-capping.
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        attn_implementation="eager"))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64, attn_implementation="eager"))


FAMILIES = {"llama-tied": lambda: _llama(True), "llama-untied": lambda: _llama(False), "llama-3": _llama3,
            "qwen2": _qwen2, "qwen3": _qwen3,
            "gemma2": _gemma2, "gemma3": _gemma3, "gpt2": _gpt2}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    torch.manual_seed(0)
    model = FAMILIES[request.param]().eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path


def _hf_run(model, tokens):
    with torch.no_grad():
        out = model(torch.tensor(tokens), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def _layers(hf_model):
    return hf_model.transformer.h if hasattr(hf_model, "transformer") else hf_model.model.layers


def test_logits_and_residual_sites_match_transformers(tiny):
    family, hf_model, path = tiny
    model = load_hf(path)
    assert model.cfg.family == family.split("-")[0]
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 11))
    logits, hidden = _hf_run(hf_model, tokens)
    n = model.cfg.n_layers
    sites = ("embed", "final", *(f"blocks.{i}.{p}" for i in range(n) for p in POINTS))
    res = forward(model, jnp.asarray(tokens), plan=Plan(capture=sites))
    np.testing.assert_allclose(np.asarray(res.logits), logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(res.captured["embed"]), hidden[0], atol=TOL, rtol=0)
    for i in range(n - 1):  # transformers' last hidden state is after the final norm
        np.testing.assert_allclose(np.asarray(res.captured[f"blocks.{i}.resid_post"]), hidden[i + 1], atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(res.captured[f"blocks.{i + 1}.resid_pre"]), hidden[i + 1], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(res.captured["final"]), hidden[n], atol=TOL, rtol=0)
    for i in range(n):  # the decomposition of each block holds
        c = {p: np.asarray(res.captured[f"blocks.{i}.{p}"]) for p in POINTS}
        np.testing.assert_allclose(c["resid_mid"], c["resid_pre"] + c["attn_out"], atol=TOL)
        np.testing.assert_allclose(c["resid_post"], c["resid_mid"] + c["mlp_out"], atol=TOL)


def test_attention_and_mlp_sites_match_transformers_modules(tiny):
    """attn_out / mlp_out are what each block adds to the residual (after Gemma 2's post-norms);
    mlp_in is the MLP's normalised input."""
    family, hf_model, path = tiny
    model = load_hf(path)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(1, 9))
    grabbed = {}

    def put(site):
        return lambda m, a, o: grabbed.__setitem__(site, (o[0] if isinstance(o, tuple) else o).numpy())

    hooks = []
    for i, layer in enumerate(_layers(hf_model)):
        if family in ("gemma2", "gemma3"):
            attn, mlp = layer.post_attention_layernorm, layer.post_feedforward_layernorm
        else:
            attn, mlp = (layer.attn, layer.mlp) if family == "gpt2" else (layer.self_attn, layer.mlp)
        hooks.append(attn.register_forward_hook(put(f"blocks.{i}.attn_out")))
        hooks.append(mlp.register_forward_hook(put(f"blocks.{i}.mlp_out")))
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: grabbed.__setitem__(f"blocks.{i}.mlp_in", a[0].numpy())))
    _hf_run(hf_model, tokens)
    for h in hooks:
        h.remove()
    assert len(grabbed) == 3 * model.cfg.n_layers
    res = forward(model, jnp.asarray(tokens), plan=Plan(capture=tuple(grabbed)))
    for site, want in grabbed.items():
        np.testing.assert_allclose(np.asarray(res.captured[site]), want, atol=TOL, rtol=0, err_msg=site)


def test_left_padding_matches_unpadded_rows(tiny):
    _, _, path = tiny
    model = load_hf(path)
    row = np.array([[5, 17, 3, 44, 9, 12, 60]])
    padded = np.array([[0, 0, 5, 17, 3, 44, 9, 12, 60]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1]])
    a = forward(model, jnp.asarray(row)).logits
    b = forward(model, jnp.asarray(padded), attention_mask=jnp.asarray(mask)).logits
    np.testing.assert_allclose(np.asarray(b)[:, 2:], np.asarray(a), atol=TOL)


def test_gemma_sliding_windows_follow_the_layer_types(tiny):
    family, hf_model, path = tiny
    if family not in ("gemma2", "gemma3"):
        pytest.skip("Gemma 2 and 3 only")
    model = load_hf(path)
    assert model.cfg.windows == tuple(4 if t == "sliding_attention" else None for t in hf_model.config.layer_types)
    assert 4 in model.cfg.windows and None in model.cfg.windows
    if family == "gemma3":  # local layers: their own base, unscaled; the global one scaled 8x
        assert model.cfg.rope_of(0) == (10000.0, None) and model.cfg.rope_of(1) == (1000000.0, (8.0,) * 8)


def test_gemma3_configs_written_before_layer_types_read_the_same():
    from jaxinterp.models.hf import _rope, _windows

    old = {"num_hidden_layers": 12, "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
           "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    new = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    assert _windows(old) == (512,) * 5 + (None,) + (512,) * 5 + (None,)
    assert _rope(old, 16) == _rope(new, 16) == {"rope_theta": 1000000.0, "rope_freq_factors": (8.0,) * 8,
                                                 "rope_local_theta": 10000.0}


def test_gemma3_multimodal_checkpoints_load_their_language_model(tmp_path):
    """Gemma3ForConditionalGeneration (Gemma 3 4B and up, what Gemma Scope 2 reads): the language
    model under `language_model.`, its settings in `text_config`; logits and residual sites equal
    transformers' text-only forward. A hub-style config listing only non-default text settings
    reads the same."""
    import json

    torch.manual_seed(0)
    tc = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
              sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              pad_token_id=0, attn_implementation="eager",
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
    hf_model = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / "mm", safe_serialization=True)
    tokens = np.random.default_rng(3).integers(1, VOCAB, size=(2, 9))
    logits, hidden = _hf_run(hf_model, tokens)
    model = load_hf(tmp_path / "mm")
    assert model.cfg.family == "gemma3" and model.cfg.n_layers == 3
    res = forward(model, jnp.asarray(tokens), plan=Plan(capture=("blocks.0.resid_post", "blocks.1.resid_post")))
    np.testing.assert_allclose(np.asarray(res.logits), logits, atol=TOL, rtol=0)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(res.captured[f"blocks.{i}.resid_post"]), hidden[i + 1], atol=TOL, rtol=0)
    # the hub's older layout: a partial text_config (defaults left out), RoPE as rope_theta + rope_scaling
    cfg = json.loads((tmp_path / "mm" / "config.json").read_text())
    text = cfg["text_config"]
    for key in ("rope_parameters", "layer_types", "rms_norm_eps", "hidden_activation", "tie_word_embeddings"):
        text.pop(key, None)
    text |= {"rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 2}
    (tmp_path / "mm" / "config.json").write_text(json.dumps(cfg))
    old = load_hf(tmp_path / "mm")
    assert old.cfg.windows == model.cfg.windows and old.cfg.rope_of(0) == model.cfg.rope_of(0) \
        and old.cfg.rope_of(1) == model.cfg.rope_of(1)
    np.testing.assert_allclose(np.asarray(forward(old, jnp.asarray(tokens)).logits), logits, atol=TOL, rtol=0)


def test_stop_early_returns_same_site_and_no_logits(tiny):
    _, _, path = tiny
    model = load_hf(path)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, size=(2, 6)))
    full = forward(model, tokens, plan=Plan(capture=("blocks.0.resid_post",)))
    early = forward(model, tokens, plan=Plan(capture=("blocks.0.resid_post",), stop_early=True))
    assert early.logits is None
    np.testing.assert_array_equal(np.asarray(early.captured["blocks.0.resid_post"]),
                                  np.asarray(full.captured["blocks.0.resid_post"]))


def test_edit_params_are_data(tiny):
    """An edit at one site changes later sites by exactly its effect; new values do not recompile."""
    _, _, path = tiny
    model = load_hf(path)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, size=(1, 5)))
    plan = Plan(capture=("blocks.0.resid_post", "blocks.1.resid_pre"),
                edits=(("blocks.0.resid_post", lambda x, p, pos: x + p["v"]),))
    before = decoder_mod._forward._cache_size()
    outs = []
    for s in (0.0, 1.0, 2.0):
        v = jnp.full((model.cfg.d_model,), s, jnp.float32)
        outs.append(forward(model, tokens, plan=plan, edit_params={"blocks.0.resid_post": {"v": v}}))
    assert decoder_mod._forward._cache_size() - before == 1
    np.testing.assert_allclose(np.asarray(outs[2].captured["blocks.1.resid_pre"] - outs[0].captured["blocks.1.resid_pre"]),
                               2.0, atol=1e-5)


def test_hf_tokenizer_json_is_loaded(tmp_path, tiny):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, _, path = tiny
    d = tmp_path / "with_tok"
    d.mkdir()
    for f in path.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    tok = Tokenizer(models.WordLevel({**vocab, "[UNK]": 26}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.save(str(d / "tokenizer.json"))
    model, ours = load_model(str(d))
    assert ours is not None and ours.encode("cab", add_bos=False) == [2, 0, 1]
    assert ours.encode("cab")[0] == (model.cfg.bos_id if model.cfg.bos_id is not None else model.cfg.eos_id)


def test_bad_sites_and_checkpoints(tiny, tmp_path):
    _, _, path = tiny
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


def test_placed_on_a_mesh_with_declared_shardings(tiny):
    """On a (data 2, model 4) mesh: heads, MLP units and vocabulary split over `model`; the forward
    of the placed model, with the batch split over `data`, equals the one-device forward."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxinterp.config import MeshConfig
    from jaxinterp.models.placement import shardings_of
    from jaxinterp.train.sharding import make_mesh

    _, _, path = tiny
    mesh = make_mesh(MeshConfig(data=2, model=4))
    ref_model, _ = load_model(str(path))
    model, _ = load_model(str(path), mesh=mesh)
    got = shardings_of(model)

    def is_(name, spec):
        return got[name].is_equivalent_to(NamedSharding(mesh, spec), model_ndim[name])

    model_ndim = {"layers.0.wq": 2, "layers.0.w_down": 2, "layers.0.wo": 2, "embed": 2}
    assert is_("layers.0.wq", P(None, "model")) and is_("layers.0.w_down", P("model", None))
    assert is_("layers.0.wo", P("model", None)) and is_("embed", P())  # 97 rows do not split 4 ways
    assert all(len(s.device_set) == 8 for s in got.values())
    tokens = np.random.default_rng(4).integers(0, VOCAB, size=(4, 8))
    want = forward(ref_model, jnp.asarray(tokens)).logits
    placed = jax.device_put(jnp.asarray(tokens, jnp.int32), NamedSharding(mesh, P("data", None)))
    res = forward(model, placed, plan=Plan(capture=("blocks.1.mlp_out",)))
    np.testing.assert_allclose(np.asarray(res.logits), np.asarray(want), atol=TOL, rtol=0)


def test_bfloat16_on_request(tiny):
    _, _, path = tiny
    model, _ = load_model(str(path), dtype=jnp.bfloat16)
    assert model.blocks[0].wq[...].dtype == jnp.bfloat16
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, size=(1, 8)))
    ref = forward(load_hf(path), tokens).logits
    got = forward(model, tokens).logits
    assert got.dtype == jnp.float32 and float(jnp.abs(got - ref).max()) < 0.1 * float(jnp.abs(ref).max()) + 0.05
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        load_model(str(path), dtype=jnp.float16)


def test_generate_cli_reproduces_transformers_greedy_continuations(tmp_path, tiny):
    """`launch/generate.py --json` without steering gives transformers' greedy continuation for every
    family: prompts tokenized as transformers' tokenizer does (the tokenizer.json's post-processor
    adds BOS where the family has one), decoded through the same tokenizer."""
    import json
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from helpers import subprocess_env

    name, hf_model, path = tiny
    if name in ("llama-3", "qwen3", "gemma3"):
        pytest.skip("the CLI and tokenizer path of its older family (llama, qwen2, gemma2); its forward is tested above")
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in path.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    letters = "abcdefghijklmnopqrstuvwxyz"
    names = [*letters, *(f"<{i}>" for i in range(len(letters), VOCAB))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<26>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    bos = hf_model.config.bos_token_id
    if bos is not None and bos < VOCAB:
        tok.post_processor = processors.TemplateProcessing(single=f"{names[bos]} $A", special_tokens=[(names[bos], bos)])
    tok.save(str(d / "tokenizer.json"))
    prompts = ["cab", "hello world", "zzz", "q"]
    cmd = [sys.executable, "launch/generate.py", "--model", str(d), "--max-new-tokens", "8", "--json"]
    for p in prompts:
        cmd += ["--prompt", p]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    eos = load_model(str(d))[0].cfg.eos_id
    for prompt, row in zip(prompts, rows):
        ids = hf_tok(prompt)["input_ids"]
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
        new = gen[0, len(ids):].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        assert row["text"] == hf_tok.decode(new) and row["unsteered"] == row["text"], (name, prompt, new)


def _interleave_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k rows (each head's two rotary halves one after the other) in GGUF's order (pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_a_llama3_gguf_with_rope_freqs_matches_transformers(tmp_path):
    """The GGUF layout of Llama 3's scaling (a `rope_freqs` tensor of per-frequency divisors, as
    llama.cpp's converter writes it) loads to the same logits as transformers' model."""
    import gguf

    from jaxinterp.models.registry import load_model

    torch.manual_seed(0)
    hf = _llama3().eval()
    cfg = hf.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    base = 500000.0 ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = (base / hf.model.rotary_emb.inv_freq.numpy().astype(np.float64)).astype(np.float32)
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)  # scaled in transformers
    w = gguf.GGUFWriter(str(tmp_path / "llama3.gguf"), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(500000.0)
    w.add_context_length(256)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<s>", "</s>", *(chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 2))])
    w.add_token_types([3, 3] + [1] * (VOCAB - 2))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_tensor("rope_freqs.weight", factors)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        hf_p, p = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", sd[hf_p + "input_layernorm.weight"])
        w.add_tensor(p + "ffn_norm.weight", sd[hf_p + "post_attention_layernorm.weight"])
        q, k = sd[hf_p + "self_attn.q_proj.weight"], sd[hf_p + "self_attn.k_proj.weight"]
        w.add_tensor(p + "attn_q.weight", _interleave_rows(q, cfg.num_attention_heads))
        w.add_tensor(p + "attn_k.weight", _interleave_rows(k, cfg.num_key_value_heads))
        w.add_tensor(p + "attn_v.weight", sd[hf_p + "self_attn.v_proj.weight"])
        w.add_tensor(p + "attn_output.weight", sd[hf_p + "self_attn.o_proj.weight"])
        w.add_tensor(p + "ffn_gate.weight", sd[hf_p + "mlp.gate_proj.weight"])
        w.add_tensor(p + "ffn_up.weight", sd[hf_p + "mlp.up_proj.weight"])
        w.add_tensor(p + "ffn_down.weight", sd[hf_p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model, _ = load_model(str(tmp_path / "llama3.gguf"))
    assert model.cfg.rope_freq_factors == pytest.approx(tuple(factors.tolist()))
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 11))
    logits, _ = _hf_run(hf, tokens)
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(tokens)).logits), logits, atol=TOL, rtol=0)


def test_rope_settings_from_either_config_layout_and_unknown_types_refused():
    from jaxinterp.models.hf import _rope

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0,
              "original_max_position_embeddings": 200}
    new = _rope({"rope_parameters": {**llama3, "rope_theta": 500000.0}}, 8)  # transformers 5
    old = _rope({"rope_theta": 500000.0, "rope_scaling": llama3}, 8)  # the hub's Llama 3.x configs
    assert new == old and new["rope_theta"] == 500000.0 and new["rope_freq_factors"][1] == pytest.approx(7.3263383)
    assert _rope({"rope_theta": 1e6}, 8) == {"rope_theta": 1e6}
    with pytest.raises(CheckpointError, match="RoPE type 'yarn' is not supported .supported: default, linear, llama3."):
        _rope({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 8)
    with pytest.raises(CheckpointError, match="without 'low_freq_factor'"):
        _rope({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 8)
