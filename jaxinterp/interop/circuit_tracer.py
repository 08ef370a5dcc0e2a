"""circuit-tracer's formats, both ways: cross-layer transcoders and per-layer transcoder sets.

A directory of

    config.yaml              model_kind: cross_layer_transcoder, model_name, feature_input_hook,
                             feature_output_hook (TransformerLens names relative to a block)
    W_enc_{i}.safetensors    W_enc_{i} [F, D], b_enc_{i} [F], b_dec_{i} [D], threshold_{i} [F] (JumpReLU)
    W_dec_{i}.safetensors    W_dec_{i} [F, L - i, D]: source layer i's writes to layers i .. L - 1

for every layer i of the model (circuit-tracer's `CrossLayerTranscoder` reads it: `h = x @ W_enc.T +
b_enc`, `a = h * (h > threshold)` (no threshold: relu), `y_j = sum_{i <= j} a_i @ W_dec_i[:, j - i] +
b_dec_j`; no input or output scaling). Ours keeps per-layer scales, so the export folds them in, as
the SAELens export does: with s_l the input's scale and t_j the target's,

    W_enc' = (s_l W_enc[l]).T      W_dec_l'[:, t] = W_dec_l[:, t] / t_{l+t}      b_dec_j' = b_dec[j] / t_j

and thresholds stay in pre-activation units. A CLT with a span writes zeros past its span (the file
holds the whole triangle); one read back is a full-span CLT with the same function. A relu CLT is
read as JumpReLU with zero thresholds (the same function). circuit-tracer has no TopK CLT and does
not store CLT skips, and it wants every layer of the model from layer 0: those are refused.

A transcoder set is one transcoder per layer, `layer_{i}.safetensors` with `W_enc [F, D]`, `W_dec
[F, D]`, `b_enc [F]`, `b_dec [D]`, `activation_function.threshold [F]` (JumpReLU; absent: relu) and
`W_skip [D, D]` (out, in: `x @ W_skip.T`), read as `h = x @ W_enc.T + b_enc`, `y = act(h) @ W_dec +
b_dec (+ x @ W_skip.T)`, and `config.yaml` with `model_kind: transcoder_set`. Our transcoders'
scales and input bias fold in as for SAELens (`saelens.folded_weights`).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml
from safetensors.numpy import load_file, save_file

from jaxinterp import dictionaries as dl
from jaxinterp.dictionaries import clt
from jaxinterp.errors import JaxinterpError, MissingFileError, ModelFileError

HOOKS = {"resid_mid": "hook_resid_mid", "mlp_in": "mlp.hook_in"}
"""Our input points and circuit-tracer's TransformerLens hook names for them (per block)."""
OUTPUT_HOOK = "hook_mlp_out"


class CircuitTracerError(JaxinterpError):
    """A CLT that circuit-tracer's format cannot hold, or a directory that is not in it."""


def _read_directory(directory, kind: str, prefix: str) -> tuple[Path, dict, str, list[int]]:
    """(directory, config, our input point, layer numbers of the `{prefix}_{i}.safetensors` files) of
    a circuit-tracer directory of `model_kind` `kind`, checked."""
    d = Path(directory)
    if not (d / "config.yaml").is_file():
        raise MissingFileError(f"{d}: no config.yaml; pass a circuit-tracer transcoder directory")
    config = yaml.safe_load((d / "config.yaml").read_text()) or {}
    if config.get("model_kind") != kind:
        raise CircuitTracerError(f"{d / 'config.yaml'}: model_kind {config.get('model_kind')!r}, expected {kind}")
    point = {v: k for k, v in HOOKS.items()}.get(config.get("feature_input_hook", "hook_resid_mid"))
    if point is None or config.get("feature_output_hook", OUTPUT_HOOK) != OUTPUT_HOOK:
        raise CircuitTracerError(f"{d}: hooks {config.get('feature_input_hook')!r} -> "
                                 f"{config.get('feature_output_hook')!r}; jaxinterp reads transcoders from "
                                 f"{sorted(HOOKS.values())} to {OUTPUT_HOOK!r}")
    layers = sorted(int(m.group(1)) for f in d.glob(f"{prefix}_*.safetensors")
                    if (m := re.fullmatch(rf"{prefix}_(\d+)\.safetensors", f.name)))
    if not layers or layers != list(range(len(layers))):
        raise ModelFileError(f"{d}: {prefix}_i.safetensors for layers {layers}; expected 0 .. L - 1 without gaps")
    return d, config, point, layers


def export_clt(directory: str | Path, spec: clt.CLTSpec, params: clt.Params, *, model_name: str = "") -> Path:
    """Write the CLT as circuit-tracer reads it; returns the directory."""
    if spec.activation != "jumprelu":
        raise CircuitTracerError(f"circuit-tracer's CLTs are JumpReLU or ReLU; a {spec.activation} CLT cannot be "
                                 "written in its format")
    if spec.skip:
        raise CircuitTracerError("circuit-tracer does not store a CLT's skip connections; train without skip "
                                 "to export")
    if spec.first_layer != 0:
        raise CircuitTracerError(f"the CLT starts at layer {spec.first_layer}; circuit-tracer wants every layer "
                                 "of the model from layer 0")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    n, s_in, t_out = spec.n_layers, p["norm_in"], p["norm_out"]
    for i in range(n):
        enc = {f"W_enc_{i}": np.ascontiguousarray((s_in[i] * p["W_enc"][i]).T), f"b_enc_{i}": p["b_enc"][i],
               f"b_dec_{i}": p["b_dec"][i] / t_out[i], f"threshold_{i}": p["threshold"][i]}
        dec = np.zeros((spec.d_sae, n - i, spec.d_model), np.float32)
        t = spec.targets(i)
        dec[:, :t] = p[f"W_dec_{i}"] / t_out[i : i + t][None, :, None]
        save_file({k: np.ascontiguousarray(v) for k, v in enc.items()}, str(out / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": dec}, str(out / f"W_dec_{i}.safetensors"))
    config = {"model_kind": "cross_layer_transcoder", "model_name": model_name,
              "feature_input_hook": HOOKS[spec.input_point], "feature_output_hook": OUTPUT_HOOK}
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def load_clt(directory: str | Path) -> tuple[clt.CLTSpec, clt.Params, dict]:
    """(spec, params, config) of a circuit-tracer CLT directory (scales one: the weights are in the
    model's units)."""
    d, config, point, layers = _read_directory(directory, "cross_layer_transcoder", "W_enc")
    n = len(layers)
    enc = [load_file(str(d / f"W_enc_{i}.safetensors")) for i in range(n)]
    decs = []
    for i in range(n):
        path = d / f"W_dec_{i}.safetensors"
        if not path.is_file():
            raise MissingFileError(f"{path} is missing; a CLT directory holds W_dec_i beside each W_enc_i")
        decs.append(load_file(str(path))[f"W_dec_{i}"])
    f, dm = enc[0]["W_enc_0"].shape
    for i, w in enumerate(decs):
        if w.shape != (f, n - i, dm):
            raise ModelFileError(f"{d}: W_dec_{i} has shape {w.shape}, expected {(f, n - i, dm)}")
    jump = "threshold_0" in enc[0]
    spec = clt.CLTSpec("jumprelu", n_layers=n, d_model=dm, d_sae=f, input_point=point)
    params = {"W_enc": jnp.asarray(np.stack([e[f"W_enc_{i}"].T for i, e in enumerate(enc)]), jnp.float32),
              "b_enc": jnp.asarray(np.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)]), jnp.float32),
              "b_dec": jnp.asarray(np.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)]), jnp.float32),
              "threshold": jnp.asarray(np.stack([e[f"threshold_{i}"] if jump else np.zeros(f, np.float32)
                                                 for i, e in enumerate(enc)]), jnp.float32),
              "norm_in": jnp.ones((n,), jnp.float32), "norm_out": jnp.ones((n,), jnp.float32)}
    params |= {f"W_dec_{i}": jnp.asarray(w, jnp.float32) for i, w in enumerate(decs)}
    return spec, params, config


SET_ACTIVATIONS = ("relu", "jumprelu")


def export_transcoder_set(directory: str | Path, dictionaries, *, model_name: str = "") -> Path:
    """Write per-layer transcoders (one `Dictionary` per model layer, in layer order, each reading
    `blocks.{i}.resid_mid` or `mlp_in` and writing `blocks.{i}.mlp_out`) as circuit-tracer's set."""
    from jaxinterp.interop.saelens import folded_weights

    if not dictionaries:
        raise CircuitTracerError("no transcoders given; pass one per model layer, layer 0 first")
    points = set()
    for i, d in enumerate(dictionaries):
        point = (d.site or "").rpartition(".")[2]
        if d.site != f"blocks.{i}.{point}" or point not in HOOKS or d.target_site != f"blocks.{i}.mlp_out":
            raise CircuitTracerError(f"transcoder {i} reads {d.site!r} and writes {d.target_site!r}; a set holds, "
                                     f"for each layer i from 0, one reading blocks.i.resid_mid or mlp_in and writing "
                                     "blocks.i.mlp_out")
        if d.spec.activation not in SET_ACTIVATIONS or not d.spec.arch.reads_target:
            raise CircuitTracerError(f"transcoder {i} is a {d.spec.activation} {d.spec.architecture}; circuit-tracer "
                                     f"reads {SET_ACTIVATIONS} transcoders from files")
        points.add(point)
    if len(points) > 1 or len({d.d_sae for d in dictionaries}) > 1 or len({d.spec.arch.skip for d in dictionaries}) > 1:
        raise CircuitTracerError("the transcoders differ in input site, d_sae or skip path; circuit-tracer's set "
                                 "needs them alike")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(dictionaries):
        w = folded_weights(d.spec, d.params)
        tensors = {"W_enc": w["W_enc"].T, "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
        if "threshold" in w:
            tensors["activation_function.threshold"] = w["threshold"]
        if "W_skip" in w:
            tensors["W_skip"] = w["W_skip"]
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(out / f"layer_{i}.safetensors"))
    config = {"model_kind": "transcoder_set", "model_name": model_name, "feature_input_hook": HOOKS[points.pop()],
              "feature_output_hook": OUTPUT_HOOK}
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def load_transcoder_set(directory: str | Path) -> list:
    """The per-layer transcoders of a circuit-tracer set, as `Dictionary` values (raw units)."""
    d, config, point, layers = _read_directory(directory, "transcoder_set", "layer")
    out = []
    for i in layers:
        z = load_file(str(d / f"layer_{i}.safetensors"))
        f_, dm = z["W_enc"].shape
        jump = "activation_function.threshold" in z
        spec = dl.DictionarySpec("jumprelu" if jump else "relu", dm, f_,
                                 architecture="skip_transcoder" if "W_skip" in z else "transcoder")
        params = {"W_enc": z["W_enc"].T, "W_dec": z["W_dec"], "b_enc": z["b_enc"], "b_dec": z["b_dec"],
                  "b_in": np.zeros(dm, np.float32), "norm_scale": np.ones((), np.float32),
                  spec.arch.target_scale: np.ones((), np.float32)}
        if jump:
            params["threshold"] = z["activation_function.threshold"]
        if "W_skip" in z:
            params["W_skip"] = z["W_skip"]
        out.append(dl.Dictionary(spec, {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in params.items()},
                                 site=f"blocks.{i}.{point}", target_site=f"blocks.{i}.mlp_out",
                                 model=config.get("model_name") or None))
    return out


def load_transcoder_set_as_clt(directory: str | Path) -> tuple[clt.CLTSpec, clt.Params, dict]:
    """(spec, params, config) of a circuit-tracer transcoder set as the CLT it equals: span 1 (each
    layer's features write to its own mlp_out only), with skips when the set has them."""
    d, config, point, layers = _read_directory(directory, "transcoder_set", "layer")
    files = [load_file(str(d / f"layer_{i}.safetensors")) for i in layers]
    f_, dm = files[0]["W_enc"].shape
    jump = ["activation_function.threshold" in z for z in files]
    skip = ["W_skip" in z for z in files]
    if len(set(jump)) > 1 or len(set(skip)) > 1 or any(z["W_enc"].shape != (f_, dm) for z in files):
        raise CircuitTracerError(f"{d}: the layers differ in width, threshold or skip; a set read as one CLT needs "
                                 "them alike (load_transcoder_set reads them one by one)")
    n = len(files)
    spec = clt.CLTSpec("jumprelu", n_layers=n, d_model=dm, d_sae=f_, span=1, skip=skip[0], input_point=point)
    stack = lambda key, fn=lambda a: a: jnp.asarray(np.stack([fn(np.asarray(z[key], np.float32)) for z in files]))  # noqa: E731
    params = {"W_enc": stack("W_enc", np.transpose), "b_enc": stack("b_enc"), "b_dec": stack("b_dec"),
              "threshold": stack("activation_function.threshold") if jump[0] else jnp.zeros((n, f_), jnp.float32),
              "norm_in": jnp.ones((n,), jnp.float32), "norm_out": jnp.ones((n,), jnp.float32)}
    params |= {f"W_dec_{i}": jnp.asarray(np.asarray(z["W_dec"], np.float32)[:, None, :]) for i, z in enumerate(files)}
    if skip[0]:
        params["W_skip"] = stack("W_skip", np.transpose)
    return spec, params, config
