"""SAELens export: the files on disk, read with SAELens' own formulas, reconstruct like our dictionary."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from safetensors.numpy import load_file

from jaxinterp import dictionaries as dl
from jaxinterp.data import make_source
from jaxinterp.interop.saelens import export_saelens, hook_name_for_site, load_saelens
from jaxinterp.train import checkpoint_dictionary, train

D_IN, D_SAE, K = 12, 40, 5


def saelens_reconstruct(directory, x: np.ndarray) -> np.ndarray:
    """SAELens' inference path, in NumPy, from cfg.json + sae_weights.safetensors only."""
    cfg = json.loads((directory / "cfg.json").read_text())
    w = {k: np.asarray(v, np.float64) for k, v in load_file(str(directory / "sae_weights.safetensors")).items()}
    assert cfg.get("normalize_activations", "none") == "none"
    x = np.asarray(x, np.float64)
    sae_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    arch = cfg["architecture"]
    if arch in ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
        assert cfg["apply_b_dec_to_input"] is False
        pre = x @ w["W_enc"] + w["b_enc"]
        f = np.maximum(pre, 0.0) * (pre > w["threshold"] if arch.startswith("jumprelu") else 1.0)
        return f @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if arch.endswith("skip_transcoder") else 0.0)
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
        mag = np.maximum(sae_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0.0)
        f = gate * mag
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if arch == "standard":
            f = np.maximum(pre, 0.0)
        elif arch == "topk":
            k = cfg["k"]
            idx = np.argsort(-pre, axis=1)[:, :k]
            f = np.zeros_like(pre)
            np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0.0), 1)
        elif arch == "jumprelu":
            f = np.where(pre > w["threshold"], np.maximum(pre, 0.0), 0.0)
        else:
            raise AssertionError(f"unexpected architecture {arch}")
    return f @ w["W_dec"] + w["b_dec"]


def random_dictionary(activation: str, seed: int = 0) -> tuple[dl.DictionarySpec, dl.Params]:
    """A dictionary with every parameter non-trivial and an input scale far from 1."""
    spec = dl.DictionarySpec(activation=activation, d_in=D_IN, d_sae=D_SAE, k=K)
    keys = jax.random.split(jax.random.key(seed), 8)
    p = dl.init(keys[0], spec)
    p["W_enc"] = p["W_enc"] * 1.5 + 0.1 * jax.random.normal(keys[1], p["W_enc"].shape)
    p["b_dec"] = 0.3 * jax.random.normal(keys[2], (D_IN,))
    p["norm_scale"] = jnp.asarray(0.37, jnp.float32)
    if activation == "gated":
        p["b_gate"] = 0.3 * jax.random.normal(keys[3], (D_SAE,))
        p["b_mag"] = 0.3 * jax.random.normal(keys[4], (D_SAE,))
        p["r_mag"] = 0.3 * jax.random.normal(keys[5], (D_SAE,))
    else:
        p["b_enc"] = 0.2 * jax.random.normal(keys[3], (D_SAE,))
    if activation in ("jumprelu", "batchtopk"):
        p["threshold"] = jax.random.uniform(keys[6], (D_SAE,), minval=0.05, maxval=0.6)
    return spec, p


def raw_inputs(n=256, seed=1) -> np.ndarray:
    # raw units: norm ~ 30, well away from the normalised scale
    return np.asarray(8.0 * jax.random.normal(jax.random.key(seed), (n, D_IN)) + 2.0, np.float32)


ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "gated": "gated"}


@pytest.mark.parametrize("activation", list(ARCH))
def test_saelens_formulas_reconstruct_like_the_dictionary(tmp_path, activation):
    spec, params = random_dictionary(activation)
    x = raw_inputs()
    out = export_saelens(tmp_path / "sae", spec, params, hook_name="blocks.6.hook_resid_post")
    ours = np.asarray(dl.reconstruct(spec, params, x))
    theirs = saelens_reconstruct(out, x)
    # the dictionary is not trivial on these inputs
    acts = np.asarray(dl.encode(spec, params, x))
    assert 0 < (acts > 0).mean() < 0.9
    assert np.abs(ours - x).mean() > 0.01
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())

    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == ARCH[activation]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"
    if activation == "topk":
        assert cfg["k"] == K
    weights = load_file(str(out / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (D_IN, D_SAE) and weights["W_dec"].shape == (D_SAE, D_IN)
    assert all(v.dtype == np.float32 for v in weights.values())
    if activation == "batchtopk":
        np.testing.assert_allclose(weights["threshold"], np.asarray(params["threshold"]), rtol=1e-6)


@pytest.mark.parametrize("activation", list(ARCH))
def test_load_saelens_round_trips(tmp_path, activation):
    spec, params = random_dictionary(activation, seed=2)
    x = raw_inputs(seed=3)
    export_saelens(tmp_path / "sae", spec, params)
    spec2, params2, cfg = load_saelens(tmp_path / "sae")
    assert float(params2["norm_scale"]) == 1.0
    assert (spec2.d_in, spec2.d_sae) == (D_IN, D_SAE)
    ours = np.asarray(dl.reconstruct(spec, params, x))
    reloaded = np.asarray(dl.reconstruct(spec2, params2, x))
    np.testing.assert_allclose(reloaded, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_load_saelens_without_b_dec_on_input(tmp_path):
    """A SAELens file with apply_b_dec_to_input=false loads to the same function."""
    spec, params = random_dictionary("relu", seed=4)
    out = export_saelens(tmp_path / "sae", spec, params)
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = False
    (out / "cfg.json").write_text(json.dumps(cfg))
    x = raw_inputs(seed=5)
    want = saelens_reconstruct(out, x)
    spec2, params2, _ = load_saelens(out)
    np.testing.assert_allclose(np.asarray(dl.reconstruct(spec2, params2, x)), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_half_precision_export(tmp_path):
    spec, params = random_dictionary("topk", seed=6)
    out = export_saelens(tmp_path / "sae", spec, params, dtype="float16")
    assert json.loads((out / "cfg.json").read_text())["dtype"] == "float16"
    assert all(v.dtype == np.float16 for v in load_file(str(out / "sae_weights.safetensors")).values())
    x = raw_inputs(seed=7)
    ours = np.asarray(dl.reconstruct(spec, params, x))
    rel = np.linalg.norm(saelens_reconstruct(out, x) - ours) / np.linalg.norm(ours)
    assert rel < 5e-3


def test_load_saelens_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_saelens(tmp_path)


def test_hook_name_for_site():
    assert hook_name_for_site("blocks.6.resid_post") == "blocks.6.hook_resid_post"
    assert hook_name_for_site("blocks.0.mlp_out") == "blocks.0.hook_mlp_out"
    assert hook_name_for_site(None) == "unknown"


@pytest.mark.parametrize("activation", ["batchtopk"])
def test_trained_run_export_reconstructs_like_checkpoint(tmp_path, activation):
    cfg = tiny_config(tmp_path, dictionary={"activation": activation}, data={"site": "blocks.6.resid_post"},
                      train={"tokens": 256 * 20})
    train(cfg, log=lambda s: None)
    spec, params = checkpoint_dictionary(tmp_path / "run")
    saved = dl.load_dictionary(tmp_path / "run")  # the run's artifact holds the checkpoint's dictionary
    assert saved.spec == spec and saved.site == "blocks.6.resid_post"
    assert saved.params.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(np.asarray(saved.params[k]), np.asarray(params[k]), err_msg=k)
    assert abs(float(params["norm_scale"]) - 1.0) > 0.1  # the fold is exercised
    export = tmp_path / "run" / "export" / "saelens"
    x = np.concatenate([np.asarray(b) for b in make_source(cfg).eval_batches(512, 256)])
    ours = np.asarray(dl.reconstruct(spec, params, x))
    theirs = saelens_reconstruct(export, x)
    assert np.mean(np.sum(np.asarray(dl.encode(spec, params, x)) > 0, 1)) > 0.5  # features do fire
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    cfg_json = json.loads((export / "cfg.json").read_text())
    assert cfg_json["architecture"] == "jumprelu"
    assert cfg_json["metadata"]["hook_name"] == "blocks.6.hook_resid_post"
    assert cfg_json["metadata"]["original_activation"] == activation
    assert np.all(load_file(str(export / "sae_weights.safetensors"))["threshold"] > 0)


TRANSCODERS = [("relu", "transcoder", "transcoder"), ("jumprelu", "transcoder", "jumprelu_transcoder"),
               ("batchtopk", "transcoder", "jumprelu_transcoder"), ("relu", "skip_transcoder", "skip_transcoder"),
               ("jumprelu", "skip_transcoder", "jumprelu_skip_transcoder")]


def random_transcoder(activation: str, arch: str, seed: int = 0) -> tuple[dl.DictionarySpec, dl.Params]:
    """A transcoder with every parameter non-trivial, input and output scales far from 1 and apart."""
    spec = dl.DictionarySpec(activation=activation, d_in=D_IN, d_sae=D_SAE, k=K, architecture=arch, d_out=D_IN - 4)
    keys = jax.random.split(jax.random.key(seed), 8)
    p = dl.init(keys[0], spec)
    p |= {"b_dec": 0.3 * jax.random.normal(keys[2], (spec.d_out,)), "b_in": 0.5 * jax.random.normal(keys[4], (D_IN,)),
          "b_enc": 0.2 * jax.random.normal(keys[3], (D_SAE,)), "norm_scale": jnp.asarray(0.37, jnp.float32),
          "norm_scale_out": jnp.asarray(2.3, jnp.float32)}
    if "W_skip" in p:
        p["W_skip"] = 0.2 * jax.random.normal(keys[5], p["W_skip"].shape)
    if "threshold" in p:
        p["threshold"] = jax.random.uniform(keys[6], (D_SAE,), minval=0.05, maxval=0.6)
    return spec, p


@pytest.mark.parametrize("activation,arch,name", TRANSCODERS)
def test_transcoders_export_as_saelens_runs_them_and_load_back(tmp_path, activation, arch, name):
    spec, params = random_transcoder(activation, arch)
    x = raw_inputs()
    out = export_saelens(tmp_path / "tc", spec, params, hook_name="blocks.6.hook_mlp_in",
                         hook_name_out="blocks.6.hook_mlp_out")
    ours = np.asarray(dl.reconstruct(spec, params, x))
    assert 0 < (np.asarray(dl.encode(spec, params, x)) > 0).mean() < 0.9
    np.testing.assert_allclose(saelens_reconstruct(out, x), ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (name, D_IN, D_IN - 4, D_SAE)
    assert cfg["metadata"]["hook_name_out"] == "blocks.6.hook_mlp_out"
    w = load_file(str(out / "sae_weights.safetensors"))
    assert w["W_dec"].shape == (D_SAE, D_IN - 4) and ("W_skip" in w) == (arch == "skip_transcoder")
    spec2, params2, _ = load_saelens(out)
    assert (spec2.architecture, spec2.d_out) == (arch, D_IN - 4)
    np.testing.assert_allclose(np.asarray(dl.reconstruct(spec2, params2, x)), ours, rtol=1e-4,
                               atol=1e-4 * np.abs(ours).max())


@pytest.mark.parametrize("activation,arch", [("topk", "transcoder"), ("gated", "skip_transcoder")])
def test_transcoders_saelens_cannot_hold_are_refused_by_name(tmp_path, activation, arch):
    from jaxinterp.interop.saelens import ExportError

    spec, params = random_transcoder(activation, arch)
    with pytest.raises(ExportError, match=f"SAELens has no {activation} {arch}"):
        export_saelens(tmp_path / "tc", spec, params)


@pytest.mark.parametrize("activation,name", [("batchtopk", "jumprelu"), ("topk", "topk")])
def test_matryoshka_exports_as_saelens_saves_it(tmp_path, activation, name):
    """As SAELens saves a trained Matryoshka SAE: the full dictionary as a JumpReLU with the
    BatchTopK threshold (or a TopK); the widths ride along in the metadata."""
    spec, params = random_dictionary(activation, seed=8)
    spec = dl.DictionarySpec(activation=activation, d_in=D_IN, d_sae=D_SAE, k=K,
                             matryoshka_widths=(D_SAE // 4, D_SAE // 2, D_SAE))
    x = raw_inputs(seed=9)
    out = export_saelens(tmp_path / "m", spec, params)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == name and cfg["metadata"]["matryoshka_widths"] == [D_SAE // 4, D_SAE // 2, D_SAE]
    ours = np.asarray(dl.reconstruct(spec, params, x))
    np.testing.assert_allclose(saelens_reconstruct(out, x), ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
