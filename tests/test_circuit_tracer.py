"""circuit-tracer's CLT files: what they hold computed as circuit-tracer computes it (from the
files alone, in NumPy) equals our CLT's reconstruction, and they read back to the same function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from jaxinterp.dictionaries import clt
from jaxinterp.interop.circuit_tracer import CircuitTracerError, export_clt, load_clt


def _clt(span=2, point="resid_mid", seed=0):
    spec = clt.CLTSpec("jumprelu", n_layers=3, d_model=6, d_sae=5, span=span, input_point=point)
    rng = np.random.default_rng(seed)
    p = dict(clt.init(jax.random.key(seed), spec))
    p["W_enc"] = jnp.asarray(rng.normal(0, 0.6, p["W_enc"].shape), jnp.float32)
    p["b_enc"] = jnp.asarray(rng.normal(0, 0.2, p["b_enc"].shape), jnp.float32)
    p["b_dec"] = jnp.asarray(rng.normal(0, 0.2, p["b_dec"].shape), jnp.float32)
    p["threshold"] = jnp.asarray(rng.uniform(0.1, 0.5, p["threshold"].shape), jnp.float32)
    p["norm_in"] = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32)
    p["norm_out"] = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32)
    for l in range(3):
        p[f"W_dec_{l}"] = jnp.asarray(rng.normal(0, 0.5, p[f"W_dec_{l}"].shape), jnp.float32)
    return spec, p


def _as_circuit_tracer_computes(directory, x_bld):
    """y [B, L, D] from the files: h = x @ W_enc.T + b_enc, a = h * (h > threshold),
    y_j = sum_{i <= j} a_i @ W_dec_i[:, j - i] + b_dec_j."""
    n = x_bld.shape[1]
    enc = [load_file(str(directory / f"W_enc_{i}.safetensors")) for i in range(n)]
    dec = [load_file(str(directory / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(n)]
    y = np.stack([np.broadcast_to(enc[j][f"b_dec_{j}"], x_bld[:, 0].shape) for j in range(n)], 1).astype(np.float64)
    for i in range(n):
        h = x_bld[:, i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        thr = enc[i].get(f"threshold_{i}", np.zeros_like(h[0]))
        a = h * (h > thr)
        for j in range(i, n):
            y[:, j] += a @ dec[i][:, j - i]
    return y


def test_an_exported_clt_computes_in_circuit_tracer_as_here_and_reads_back(tmp_path):
    spec, p = _clt(span=2, point="mlp_in")
    out = export_clt(tmp_path / "ct", spec, p, model_name="smollm2-135m")
    names = sorted(f.name for f in out.iterdir())
    assert names == sorted(["config.yaml"] + [f"W_{w}_{i}.safetensors" for w in ("enc", "dec") for i in range(3)])
    assert yaml.safe_load((out / "config.yaml").read_text()) == {
        "model_kind": "cross_layer_transcoder", "model_name": "smollm2-135m", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out"}
    e0 = load_file(str(out / "W_enc_0.safetensors"))
    assert e0["W_enc_0"].shape == (5, 6) and e0["threshold_0"].shape == (5,) and e0["b_dec_0"].shape == (6,)
    assert [load_file(str(out / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"].shape for i in range(3)] == [
        (5, 3, 6), (5, 2, 6), (5, 1, 6)]
    # past the span: zeros (source 0 reaches layers 0 and 1 only)
    assert not load_file(str(out / "W_dec_0.safetensors"))["W_dec_0"][:, 2].any()

    x = np.random.default_rng(1).normal(0, 1.5, (20, 3, 6)).astype(np.float32)
    ours = np.asarray(clt.reconstruct(spec, p, jnp.asarray(x)))
    np.testing.assert_allclose(_as_circuit_tracer_computes(out, x), ours, rtol=1e-4, atol=1e-5)
    spec2, p2, config = load_clt(out)
    assert spec2.n_layers == 3 and spec2.d_sae == 5 and spec2.input_point == "mlp_in" and spec2.span is None
    np.testing.assert_allclose(np.asarray(clt.reconstruct(spec2, p2, jnp.asarray(x))), ours, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(clt.encode(spec2, p2, jnp.asarray(x))),
                               np.asarray(clt.encode(spec, p, jnp.asarray(x))), rtol=1e-4, atol=1e-5)
    assert config["model_name"] == "smollm2-135m"


def test_a_relu_clt_reads_as_jumprelu_at_zero_and_bad_input_is_named(tmp_path):
    spec, p = _clt(span=None)
    out = export_clt(tmp_path / "ct", spec, p)
    for i in range(3):  # circuit-tracer's ReLU CLT: no thresholds
        z = load_file(str(out / f"W_enc_{i}.safetensors"))
        del z[f"threshold_{i}"]
        save_file(z, str(out / f"W_enc_{i}.safetensors"))
    x = np.random.default_rng(2).normal(0, 1.5, (10, 3, 6)).astype(np.float32)
    spec2, p2, _ = load_clt(out)
    assert not np.asarray(p2["threshold"]).any()
    np.testing.assert_allclose(np.asarray(clt.reconstruct(spec2, p2, jnp.asarray(x))),
                               _as_circuit_tracer_computes(out, x), rtol=1e-4, atol=1e-5)

    topk = clt.CLTSpec("topk", 3, 6, 5, k=2)
    with pytest.raises(CircuitTracerError, match="a topk CLT cannot be written"):
        export_clt(tmp_path / "x", topk, clt.init(jax.random.key(0), topk))
    skip = clt.CLTSpec("jumprelu", 3, 6, 5, skip=True)
    with pytest.raises(CircuitTracerError, match="skip connections"):
        export_clt(tmp_path / "x", skip, clt.init(jax.random.key(0), skip))
    late = clt.CLTSpec("jumprelu", 3, 6, 5, first_layer=2)
    with pytest.raises(CircuitTracerError, match="starts at layer 2"):
        export_clt(tmp_path / "x", late, clt.init(jax.random.key(0), late))
    (out / "W_dec_1.safetensors").unlink()
    with pytest.raises(Exception, match="W_dec_1.safetensors is missing"):
        load_clt(out)
    (out / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(CircuitTracerError, match="expected cross_layer_transcoder"):
        load_clt(out)


@pytest.mark.parametrize("activation,architecture", [("jumprelu", "transcoder"), ("relu", "skip_transcoder")])
def test_a_transcoder_set_computes_in_circuit_tracer_as_here_and_reads_back(tmp_path, activation, architecture):
    from jaxinterp import dictionaries as dl
    from jaxinterp.interop.circuit_tracer import export_transcoder_set, load_transcoder_set

    rng = np.random.default_rng(0)
    ds = []
    for i in range(3):
        spec = dl.DictionarySpec(activation, 6, 5, architecture=architecture)
        p = dict(dl.init(jax.random.key(i), spec, threshold=0.2))
        for k in p:
            if k.startswith(("W_", "b_")):
                p[k] = jnp.asarray(rng.normal(0, 0.5, p[k].shape), jnp.float32)
        p["norm_scale"], p["norm_scale_out"] = jnp.float32(rng.uniform(0.5, 2)), jnp.float32(rng.uniform(0.5, 2))
        ds.append(dl.Dictionary(spec, p, site=f"blocks.{i}.resid_mid", target_site=f"blocks.{i}.mlp_out"))
    out = export_transcoder_set(tmp_path / "set", ds, model_name="m")
    assert yaml.safe_load((out / "config.yaml").read_text())["model_kind"] == "transcoder_set"
    x = rng.normal(0, 1.5, (12, 6)).astype(np.float32)
    back = load_transcoder_set(out)
    for i, d in enumerate(ds):
        z = load_file(str(out / f"layer_{i}.safetensors"))
        assert z["W_enc"].shape == (5, 6) and z["W_dec"].shape == (5, 6)
        h = x @ z["W_enc"].T + z["b_enc"]
        a = h * (h > z.get("activation_function.threshold", np.zeros(5, np.float32)))
        y = a @ z["W_dec"] + z["b_dec"] + (x @ z["W_skip"].T if "W_skip" in z else 0.0)
        ours = np.asarray(d.reconstruct(x))
        np.testing.assert_allclose(y, ours, rtol=1e-4, atol=1e-5)
        assert back[i].site == f"blocks.{i}.resid_mid" and back[i].target_site == f"blocks.{i}.mlp_out"
        np.testing.assert_allclose(np.asarray(back[i].reconstruct(x)), ours, rtol=1e-4, atol=1e-5)
    topk = dl.DictionarySpec("topk", 6, 5, k=2, architecture="transcoder")
    bad = [dl.Dictionary(topk, dl.init(jax.random.key(0), topk), site="blocks.0.resid_mid", target_site="blocks.0.mlp_out")]
    with pytest.raises(CircuitTracerError, match="topk transcoder"):
        export_transcoder_set(tmp_path / "x", bad)
    with pytest.raises(CircuitTracerError, match="for each layer i from 0"):
        export_transcoder_set(tmp_path / "x", ds[1:])


def test_a_clt_read_back_gives_the_replacement_models_logits(tmp_path):
    from helpers import TINY_DECODERS, tiny_model

    from jaxinterp.circuits import replacement_forward

    model = tiny_model(TINY_DECODERS["llama"])
    spec = clt.CLTSpec("jumprelu", n_layers=3, d_model=model.cfg.d_model, d_sae=10, span=2)
    p = dict(clt.init(jax.random.key(0), spec, threshold=0.05))
    p["b_enc"] = 0.2 * jax.random.normal(jax.random.key(1), p["b_enc"].shape)
    p["norm_in"] = jnp.asarray([0.7, 1.3, 2.0], jnp.float32)
    p["norm_out"] = jnp.asarray([1.5, 0.6, 1.1], jnp.float32)
    spec2, p2, _ = load_clt(export_clt(tmp_path / "ct", spec, p))
    tokens = np.random.default_rng(0).integers(1, model.cfg.vocab_size, size=(2, 7))
    want = replacement_forward(model, tokens, spec, p).logits
    np.testing.assert_allclose(np.asarray(replacement_forward(model, tokens, spec2, p2).logits), np.asarray(want),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder"])
def test_a_transcoder_set_reads_as_a_span_one_clt_with_the_same_replacement_model(tmp_path, architecture):
    """`load_dictionary` on a circuit-tracer set gives a CLT of span 1 (skips where the set has them);
    its replacement model writes, at each layer, what that layer's transcoder makes of this
    forward's own input there, and a CLT directory reads back to the same logits."""
    from helpers import TINY_DECODERS, tiny_model

    from jaxinterp import dictionaries as dl
    from jaxinterp.circuits import replacement_forward
    from jaxinterp.interop.circuit_tracer import export_transcoder_set

    model = tiny_model(TINY_DECODERS["llama"])
    d, n = model.cfg.d_model, model.cfg.n_layers
    rng = np.random.default_rng(3)
    ds = []
    for i in range(n):
        spec = dl.DictionarySpec("jumprelu", d, 7, architecture=architecture)
        p = dict(dl.init(jax.random.key(i), spec, threshold=0.1))
        for k in p:
            if k.startswith(("W_", "b_")):
                p[k] = jnp.asarray(rng.normal(0, 0.3, p[k].shape), jnp.float32)
        ds.append(dl.Dictionary(spec, p, site=f"blocks.{i}.resid_mid", target_site=f"blocks.{i}.mlp_out"))
    loaded = dl.load_dictionary(export_transcoder_set(tmp_path / "set", ds, model_name="tiny"))
    assert isinstance(loaded, dl.CLTDictionary) and loaded.spec.span == 1
    assert loaded.spec.skip == (architecture == "skip_transcoder") and loaded.model == "tiny"
    inputs, targets = loaded.sites
    tokens = np.random.default_rng(0).integers(1, model.cfg.vocab_size, size=(2, 8))
    res = replacement_forward(model, tokens, loaded.spec, loaded.params, capture=inputs + targets)
    for i, t in enumerate(ds):
        np.testing.assert_allclose(np.asarray(res.captured[targets[i]]), np.asarray(t.reconstruct(res.captured[inputs[i]])),
                                   rtol=2e-4, atol=2e-5)
    assert float(jnp.max(jnp.abs(res.logits - replacement_forward(model, tokens, loaded.spec, loaded.params,
                                                                  error_terms=True).logits))) > 1e-3

    spec, p = _clt(span=None)
    export_clt(tmp_path / "clt", spec, p, model_name="tiny")
    back = dl.load_dictionary(tmp_path / "clt")
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(back.reconstruct(x)), np.asarray(clt.reconstruct(spec, p, x)), rtol=1e-4,
                               atol=1e-5)
    (tmp_path / "clt" / "config.yaml").write_text("model_kind: sae\n")
    with pytest.raises(dl.DictionaryError, match="model_kind 'sae'"):
        dl.load_dictionary(tmp_path / "clt")
