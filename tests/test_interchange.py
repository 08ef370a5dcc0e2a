"""Dictionaries written by SAELens 6.54 and sparsify 1.3 themselves load here with their numerics,
and ours written in their formats load there with ours; the released Gemma Scope / Llama Scope
layouts read as SAELens' own loaders read them; every folder that is not a dictionary fails in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxinterp
from jaxinterp.interop import formats, hooks

torch = pytest.importorskip("torch")
sae_lens = pytest.importorskip("sae_lens")
sparsify = pytest.importorskip("sparsify")

D_IN, D_SAE, K = 16, 48, 6
RTOL = 1e-5


def _x(n=40, d=D_IN, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) * 2.0


def _close(ours, theirs, what):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = max(np.abs(theirs).max(), 1e-6)
    err = np.abs(ours - theirs).max() / scale
    assert err < RTOL, f"{what}: max relative difference {err:.2e}"


def _randomise(module, seed=0):
    """Every parameter random, thresholds positive and small enough that features fire."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.5))
            if "threshold" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.8)
            if name == "r_mag":
                p.mul_(0.3)
    for name, b in module.named_buffers():
        if "threshold" in name:
            b.copy_(torch.tensor(0.4))


SAELENS_INFERENCE = [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("gated", {}), ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}), ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}), ("standard", {"normalize_activations": "layer_norm"}),
    ("topk", {"k": K, "normalize_activations": "constant_norm_rescale"}),
    ("transcoder", {"d_out": 20, "apply_b_dec_to_input": False}),
    ("skip_transcoder", {"d_out": D_IN, "apply_b_dec_to_input": False}),
    ("jumprelu_transcoder", {"d_out": 20, "apply_b_dec_to_input": False}),
    ("jumprelu_skip_transcoder", {"d_out": D_IN, "apply_b_dec_to_input": False}),
]


def _saelens_sae(architecture: str, extra: dict, *, training: bool = False):
    from sae_lens.registry import get_sae_class, get_sae_training_class

    cls, cfg_cls = (get_sae_training_class if training else get_sae_class)(architecture)
    meta = {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny"}
    if "d_out" in extra:
        meta |= {"hook_name": "blocks.3.ln2.hook_normalized", "hook_name_out": "blocks.3.hook_mlp_out"}
    cfg = cfg_cls.from_dict({"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "metadata": meta, **extra})
    sae = cls(cfg)
    _randomise(sae)
    return sae.eval()


def _saelens_outputs(sae, x):
    with torch.no_grad():
        t = torch.from_numpy(x)
        f = sae.encode(t)
        y = sae.forward(t) if hasattr(sae, "W_skip") else sae.decode(f)
    return f.numpy(), y.numpy()


@pytest.mark.parametrize("architecture,extra", SAELENS_INFERENCE,
                         ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in e.items() if k != 'd_out')}" for a, e in SAELENS_INFERENCE])
def test_saelens_folders_load_with_saelens_numerics(tmp_path, architecture, extra):
    sae = _saelens_sae(architecture, extra)
    sae.save_model(tmp_path / "sae")
    x = _x()
    f_ref, y_ref = _saelens_outputs(sae, x)
    assert (f_ref > 0).any()
    d = jaxinterp.load_dictionary(tmp_path / "sae")
    assert formats.detect(tmp_path / "sae") == "saelens"
    _close(d.encode(x), f_ref, "feature activations")
    _close(d.reconstruct(x), y_ref, "reconstruction")
    if "d_out" in extra:
        assert (d.site, d.target_site) == ("blocks.3.mlp_in", "blocks.3.mlp_out")
    else:
        assert d.site == "blocks.3.resid_post" and d.model == "tiny"


@pytest.mark.parametrize("architecture,extra", [("batchtopk", {"k": K}), ("topk", {"k": K}), ("jumprelu", {}),
                                                ("matryoshka_batchtopk", {"k": K, "matryoshka_widths": [12, 30, D_SAE]})])
def test_saelens_training_checkpoints_load_as_their_inference_form(tmp_path, architecture, extra):
    """A training checkpoint (`save_model` of a TrainingSAE) reads as what `save_inference_model`
    writes, and both equal SAELens' inference SAE loaded from the latter."""
    from sae_lens import SAE

    sae = _saelens_sae(architecture, extra, training=True)
    sae.save_model(tmp_path / "train")
    sae.save_inference_model(tmp_path / "inference")
    ref = SAE.load_from_disk(tmp_path / "inference")
    x = _x(seed=1)
    f_ref, y_ref = _saelens_outputs(ref, x)
    assert (f_ref > 0).any()
    for folder in ("train", "inference"):
        d = jaxinterp.load_dictionary(tmp_path / folder)
        _close(d.encode(x), f_ref, f"{folder} feature activations")
        _close(d.reconstruct(x), y_ref, f"{folder} reconstruction")
    if architecture == "matryoshka_batchtopk":
        assert jaxinterp.load_dictionary(tmp_path / "train").spec.matryoshka_widths == (12, 30, D_SAE)


def test_saelens_pre_6_config(tmp_path):
    """A SAELens 3-5 config (hook_point, activation_fn_str topk, boolean normalize_activations, no
    version) and its old scaling_factor of ones load as SAELens 6 loads them."""
    from sae_lens import SAE
    from safetensors.torch import save_file

    sae = _saelens_sae("topk", {"k": K})
    old = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "hook_point": "blocks.2.hook_resid_pre",
           "hook_point_layer": 2, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "normalize_activations": False, "model_name": "gpt2", "apply_b_dec_to_input": True}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(old))
    tensors = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
    save_file(tensors | {"scaling_factor": torch.ones(D_SAE)}, str(tmp_path / "old" / "sae_weights.safetensors"))
    ref = SAE.load_from_disk(tmp_path / "old")
    x = _x(seed=2)
    f_ref, y_ref = _saelens_outputs(ref, x)
    d = jaxinterp.load_dictionary(tmp_path / "old")
    assert d.spec.activation == "topk" and d.spec.k == K and d.site == "blocks.2.resid_pre" and d.model == "gpt2"
    _close(d.encode(x), f_ref, "feature activations")
    _close(d.reconstruct(x), y_ref, "reconstruction")


def test_row_normalised_dictionaries_refuse_what_needs_row_statistics(tmp_path):
    sae = _saelens_sae("standard", {"normalize_activations": "layer_norm"})
    sae.save_model(tmp_path / "ln")
    d = jaxinterp.load_dictionary(tmp_path / "ln")
    with pytest.raises(jaxinterp.DictionaryError, match="use reconstruct"):
        d.decode(np.zeros((1, D_SAE), np.float32))
    with pytest.raises(jaxinterp.DictionaryError, match="cannot be attached"):
        d.check_model(D_IN, 4)


def _sparsify_coder(transcode: bool, skip: bool):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D_IN, SparseCoderConfig(k=K, num_latents=D_SAE, transcode=transcode, skip_connection=skip))
    _randomise(coder, seed=3)
    return coder


@pytest.mark.parametrize("transcode,skip", [(False, False), (True, False), (True, True), (False, True)])
def test_sparsify_folders_load_with_sparsify_numerics(tmp_path, transcode, skip):
    coder = _sparsify_coder(transcode, skip)
    folder = tmp_path / "run" / "layers.4.mlp"
    coder.save_to_disk(folder)
    x = _x(seed=4)
    with torch.no_grad():
        out = coder(torch.from_numpy(x))
        dense = torch.zeros(x.shape[0], D_SAE).scatter_(1, out.latent_indices, out.latent_acts)
    d = jaxinterp.load_dictionary(folder)
    _close(d.encode(x), dense.numpy(), "feature activations")
    _close(d.reconstruct(x), out.sae_out.numpy(), "reconstruction")
    if transcode:
        assert (d.site, d.target_site) == ("blocks.4.mlp_in", "blocks.4.mlp_out")
    else:
        assert d.site == "blocks.4.mlp_out"
    with pytest.raises(jaxinterp.DictionaryError, match="one dictionary per hookpoint.*layers.4.mlp"):
        jaxinterp.load_dictionary(tmp_path / "run")


def _saelens_hub_loader(monkeypatch, root):
    """SAELens' pretrained loaders, with the hub replaced by a local folder."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    def local(repo_id, filename=None, subfolder=None, **_):
        path = root / repo_id / (f"{subfolder}/{filename}" if subfolder else filename)
        if not path.exists():
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(str(path))
        return str(path)

    def shapes(repo_id, filename):
        from safetensors import safe_open

        with safe_open(str(root / repo_id / filename), "np") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    monkeypatch.setattr(loaders, "hf_hub_download", local)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
    return loaders


def _sae_from_loader(cfg_dict, state_dict, fold=None):
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    cfg_dict = handle_config_defaulting(cfg_dict)
    cfg = SAE.get_sae_config_class_for_architecture(cfg_dict["architecture"]).from_dict(cfg_dict)
    sae = SAE.get_sae_class_for_architecture(cfg.architecture())(cfg)
    sae.process_state_dict_for_loading(state_dict)
    sae.load_state_dict(state_dict)
    if fold is not None:
        sae.fold_activation_norm_scaling_factor(fold)
    return sae.to(torch.float32).eval()


def _random(shape, rng, scale=0.3):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def test_gemma_scope_1_layout(tmp_path, monkeypatch):
    loaders = _saelens_hub_loader(monkeypatch, tmp_path)
    rng = np.random.default_rng(5)
    folder = tmp_path / "google" / "gemma-scope-2b-pt-res" / "layer_7" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    d_in = 2304  # SAELens takes the width from the repository's model
    np.savez(folder / "params.npz", W_enc=_random((d_in, D_SAE), rng, 0.02), W_dec=_random((D_SAE, d_in), rng),
             b_enc=_random((D_SAE,), rng), b_dec=_random((d_in,), rng), threshold=np.abs(_random((D_SAE,), rng)))
    cfg, state, _ = loaders.gemma_2_sae_huggingface_loader("google/gemma-scope-2b-pt-res",
                                                           "layer_7/width_16k/average_l0_20",
                                                           cfg_overrides={"d_sae": D_SAE})  # a tiny "16k"
    ref = _sae_from_loader(cfg, state)
    x = _x(d=d_in, seed=6)
    f_ref, y_ref = _saelens_outputs(ref, x)
    assert (f_ref > 0).any()
    d = jaxinterp.load_dictionary(folder)
    assert formats.detect(folder) == "gemma-scope" and d.site == "blocks.7.resid_post" and d.model == "google/gemma-2-2b"
    _close(d.encode(x), f_ref, "feature activations")
    _close(d.reconstruct(x), y_ref, "reconstruction")


@pytest.mark.parametrize("kind", ["resid_post", "transcoder_affine"])
def test_gemma_scope_2_layout(tmp_path, monkeypatch, kind):
    from safetensors.numpy import save_file

    loaders = _saelens_hub_loader(monkeypatch, tmp_path)
    rng = np.random.default_rng(7)
    sub = f"{kind}/layer_5_width_16k_l0_small"
    folder = tmp_path / "google" / "gemma-scope-2-270m-pt" / sub
    folder.mkdir(parents=True)
    tensors = {"w_enc": _random((D_IN, D_SAE), rng), "w_dec": _random((D_SAE, D_IN), rng),
               "b_enc": _random((D_SAE,), rng), "b_dec": _random((D_IN,), rng),
               "threshold": np.abs(_random((D_SAE,), rng))}
    config = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
              "hf_hook_point_in": "model.layers.5.output"}
    if kind == "transcoder_affine":
        tensors["affine_skip_connection"] = _random((D_IN, D_IN), rng)
        config |= {"affine_connection": True, "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
                   "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output"}
    save_file(tensors, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    cfg, state, _ = loaders.gemma_3_sae_huggingface_loader("google/gemma-scope-2-270m-pt", sub)
    ref = _sae_from_loader(cfg, state)
    x = _x(seed=8)
    f_ref, y_ref = _saelens_outputs(ref, x)
    d = jaxinterp.load_dictionary(folder)
    assert formats.detect(folder) == "gemma-scope-2"
    _close(d.encode(x), f_ref, "feature activations")
    _close(d.reconstruct(x), y_ref, "reconstruction")
    if kind == "transcoder_affine":
        assert d.spec.architecture == "skip_transcoder" and (d.site, d.target_site) == ("blocks.5.mlp_in", "blocks.5.mlp_out")
    else:
        assert d.site == "blocks.5.resid_post"


def test_llama_scope_layout(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    loaders = _saelens_hub_loader(monkeypatch, tmp_path)
    rng = np.random.default_rng(9)
    sub = "Llama3_1-8B-Base-L3R-8x"
    folder = tmp_path / "fnlp" / "Llama3_1-8B-Base-LXR-8x" / sub
    (folder / "checkpoints").mkdir(parents=True)
    norm_in = 7.5
    hp = {"d_model": D_IN, "d_sae": D_SAE, "hook_point_in": "blocks.3.hook_resid_post",
          "hook_point_out": "blocks.3.hook_resid_post", "jump_relu_threshold": 0.2,
          "dataset_average_activation_norm": {"in": norm_in, "out": norm_in}}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    save_file({"encoder.weight": _random((D_SAE, D_IN), rng), "encoder.bias": _random((D_SAE,), rng),
               "decoder.weight": _random((D_IN, D_SAE), rng), "decoder.bias": _random((D_IN,), rng)},
              str(folder / "checkpoints" / "final.safetensors"))
    cfg, state, _ = loaders.llama_scope_sae_huggingface_loader("fnlp/Llama3_1-8B-Base-LXR-8x", sub,
                                                               cfg_overrides={"dtype": "float32"})
    ref = _sae_from_loader(cfg, state, fold=D_IN**0.5 / norm_in)  # as SAE.from_pretrained folds it
    x = _x(seed=10) * 3
    f_ref, y_ref = _saelens_outputs(ref, x)
    assert (f_ref > 0).any()
    d = jaxinterp.load_dictionary(folder)
    assert formats.detect(folder) == "llama-scope" and d.site == "blocks.3.resid_post"
    _close(d.encode(x), f_ref, "feature activations")
    _close(d.reconstruct(x), y_ref, "reconstruction")


def test_hook_name_table():
    cases = {
        "blocks.8.hook_resid_post": "blocks.8.resid_post", "blocks.8.hook_resid_pre": "blocks.8.resid_pre",
        "blocks.8.hook_resid_mid": "blocks.8.resid_mid", "blocks.8.hook_attn_out": "blocks.8.attn_out",
        "blocks.8.hook_mlp_out": "blocks.8.mlp_out", "blocks.8.ln2.hook_normalized": "blocks.8.mlp_in",
        "blocks.8.hook_mlp_in": "blocks.8.mlp_in", "blocks.8.mlp.hook_in": "blocks.8.mlp_in",
        "hook_embed": "embed", "ln_final.hook_normalized": "final", "layers.8": "blocks.8.resid_post",
        "layers.8.mlp": "blocks.8.mlp_out", "model.layers.8.self_attn": "blocks.8.attn_out",
        "model.layers.8.output": "blocks.8.resid_post", "model.layers.8.mlp.input": "blocks.8.mlp_in",
        "model.layers.8.pre_feedforward_layernorm.output": "blocks.8.mlp_in",
        "model.layers.8.post_feedforward_layernorm.output": "blocks.8.mlp_out",
        "model.language_model.layers.8.output": "blocks.8.resid_post", "embed_tokens": "embed",
        "blocks.8.mlp_out": "blocks.8.mlp_out",
    }
    for hook, site in cases.items():
        assert hooks.site_for_hook(hook) == site, hook
    assert hooks.site_for_hook("layers.8.mlp", reads_input=True) == "blocks.8.mlp_in"
    assert hooks.site_for_hook("layers.8", reads_input=True) == "blocks.8.resid_pre"
    for site in ("blocks.2.resid_post", "blocks.2.mlp_in", "blocks.2.attn_out", "embed", "final"):
        assert hooks.site_for_hook(hooks.hook_for_site(site)) == site
    for bad, match in (("blocks.3.attn.hook_z", "per-head z"), ("model.layers.3.self_attn.o_proj.input", "per-head z"),
                       ("unembed", "not recognised"), ("model.layers.3.post_attention_layernorm", "not a site")):
        with pytest.raises(hooks.HookNameError, match=match):
            hooks.site_for_hook(bad)


def test_folders_that_are_not_dictionaries_fail_in_one_line(tmp_path):
    cases = []
    (tmp_path / "empty").mkdir()
    cases.append(("empty", "matches no dictionary format .*found nothing.*saelens: cfg.json"))
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "cfg.json").write_text("{}")
    cases.append(("cfg_only", "neither sae_weights.safetensors .* nor sae.safetensors"))
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "sae_weights.safetensors").write_bytes(b"")
    cases.append(("weights_only", "no cfg.json"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 4, "d_sae": 8}))
    (tmp_path / "corrupt" / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    cases.append(("corrupt", "not a readable safetensors file"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "hyperparams.json").write_text("{}")
    cases.append(("llama", "no checkpoints/final.safetensors"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "cfg.json").write_text(json.dumps({"architecture": "temporal", "d_in": 4, "d_sae": 8}))
    from safetensors.numpy import save_file

    save_file({"W_enc": np.zeros((4, 8), np.float32)}, str(tmp_path / "foreign" / "sae_weights.safetensors"))
    cases.append(("foreign", "'temporal' is not a kind jaxinterp runs"))
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": 4, "d_sae": 8,
                                                               "sae_lens_version": "6.54.0"}))
    save_file({"W_enc": np.zeros((4, 8), np.float32)}, str(tmp_path / "short" / "sae_weights.safetensors"))
    cases.append(("short", r"needs tensors \['W_dec', 'b_dec', 'b_enc', 'threshold'\]"))
    for name, match in cases:
        with pytest.raises(jaxinterp.DictionaryError, match=match) as e:
            jaxinterp.load_dictionary(tmp_path / name)
        assert "\n" not in str(e.value), name


def _ours(activation, architecture="sae", seed=0, **extra):
    """One of our dictionaries with every parameter random and scales far from 1."""
    import jax
    import jax.numpy as jnp

    from jaxinterp import dictionaries as dl

    d_out = D_IN if architecture != "transcoder" else D_IN - 4
    spec = dl.DictionarySpec(activation=activation, d_in=D_IN, d_sae=D_SAE, k=K, architecture=architecture,
                             d_out=None if architecture == "sae" else d_out, **extra)
    p = dl.init(jax.random.key(seed), spec)
    rng = np.random.default_rng(seed)
    for name, v in p.items():
        if name in ("norm_scale", "norm_scale_out"):
            p[name] = jnp.float32(0.37 if name == "norm_scale" else 2.3)
        elif name == "threshold":
            p[name] = jnp.asarray(rng.uniform(0.05, 0.6, v.shape), jnp.float32)
        else:
            p[name] = v + jnp.asarray(rng.normal(size=v.shape) * 0.3, jnp.float32)
    site, target = ("blocks.2.mlp_in", "blocks.2.mlp_out") if architecture != "sae" else ("blocks.2.resid_post", None)
    return jaxinterp.Dictionary(spec, p, site=site, target_site=target, model="tiny")


OUR_KINDS = [("relu", "sae"), ("topk", "sae"), ("batchtopk", "sae"), ("jumprelu", "sae"), ("gated", "sae"),
             ("relu", "transcoder"), ("jumprelu", "transcoder"), ("batchtopk", "transcoder"),
             ("relu", "skip_transcoder"), ("jumprelu", "skip_transcoder")]


@pytest.mark.parametrize("activation,architecture", OUR_KINDS + [("topk", "matryoshka")])
def test_our_exports_load_in_saelens_with_our_outputs(tmp_path, activation, architecture):
    from sae_lens import SAE

    from jaxinterp.interop.convert import write

    extra = {"matryoshka_widths": (12, 30, D_SAE)} if architecture == "matryoshka" else {}
    d = _ours(activation, "sae" if architecture == "matryoshka" else architecture, **extra)
    folder = write(d, tmp_path / "saelens", "saelens")
    sae = SAE.load_from_disk(folder)
    x = _x(seed=11) * 8
    f_ref, y_ref = _saelens_outputs(sae, x)
    assert 0 < (f_ref > 0).mean() < 0.9
    _close(d.encode(x), f_ref, "feature activations")
    _close(d.reconstruct(x), y_ref, "reconstruction")
    back = jaxinterp.load_dictionary(folder)
    assert (back.site, back.target_site) == (d.site, d.target_site)
    _close(back.reconstruct(x), np.asarray(d.reconstruct(x)), "read back")


@pytest.mark.parametrize("architecture", ["sae", "transcoder", "skip_transcoder"])
def test_our_topk_exports_load_in_sparsify_with_our_outputs(tmp_path, architecture):
    from sparsify import SparseCoder

    from jaxinterp.interop.convert import write

    d = _ours("topk", architecture)
    if architecture == "transcoder":  # sparsify's coders predict an output as wide as their input
        d = _ours("topk", "skip_transcoder")
        d = jaxinterp.Dictionary(d.spec.__class__(**{**d.spec.__dict__, "architecture": "transcoder"}),
                                 {k: v for k, v in d.params.items() if k != "W_skip"}, site=d.site,
                                 target_site=d.target_site)
    folder = write(d, tmp_path / "sparsify", "sparsify")
    assert folder.name == ("layers.2" if architecture == "sae" else "layers.2.mlp")
    coder = SparseCoder.load_from_disk(folder)
    x = _x(seed=12) * 8
    with torch.no_grad():
        out = coder(torch.from_numpy(x))
        dense = torch.zeros(x.shape[0], D_SAE).scatter_(1, out.latent_indices, out.latent_acts)
    _close(d.encode(x), dense.numpy(), "feature activations")
    _close(d.reconstruct(x), out.sae_out.numpy(), "reconstruction")


def test_kinds_a_format_cannot_hold_are_refused_by_name(tmp_path):
    from jaxinterp.interop.convert import write
    from jaxinterp.interop.saelens import ExportError

    with pytest.raises(ExportError, match="sparsify runs top-k coders only; this dictionary is jumprelu"):
        write(_ours("jumprelu"), tmp_path / "a", "sparsify")
    with pytest.raises(ExportError, match="SAELens has no topk transcoder"):
        write(_ours("topk", "transcoder"), tmp_path / "b", "saelens")
    with pytest.raises(jaxinterp.DictionaryError, match="choose one of"):
        write(_ours("relu", "sae"), tmp_path / "c", "onnx")


def test_convert_cli(tmp_path):
    """launch/convert.py: a SAELens folder to sparsify and back to ours; a trained run's checkpoint to
    a SAELens folder; a refusal is one line."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import tiny_config

    from jaxinterp.train import train

    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run([sys.executable, str(root / "launch" / "convert.py"), *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=tmp_path, timeout=300)
    sae = _saelens_sae("topk", {"k": K})
    sae.save_model(tmp_path / "sl")
    r = run(tmp_path / "sl", tmp_path / "sp", "--to", "sparsify", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["format"] == "sparsify" and res["written"].endswith("layers.3") and res["max_relative_difference"] < 1e-5
    r = run(res["written"], tmp_path / "ours", "--to", "jaxinterp")
    assert r.returncode == 0 and "jaxinterp" in r.stdout, r.stderr
    x = _x(seed=13)
    _close(jaxinterp.load_dictionary(tmp_path / "ours").encode(x), _saelens_outputs(sae, x)[0], "after two hops")

    cfg = tiny_config(tmp_path, dictionary={"activation": "jumprelu"}, train={"tokens": 256 * 6},
                      output={"checkpoint_every": 3})
    train(cfg)
    r = run(tmp_path / "run", tmp_path / "step3", "--to", "saelens", "--step", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["max_relative_difference"] < 1e-5
    from jaxinterp.train import checkpoint_dictionary

    _, params3 = checkpoint_dictionary(tmp_path / "run", 3)
    back = jaxinterp.load_dictionary(tmp_path / "step3")
    assert back.spec.activation == "jumprelu" and back.d_sae == params3["W_enc"].shape[1]
    r = run(tmp_path / "run", tmp_path / "bad", "--to", "sparsify")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "top-k coders only" in r.stderr
