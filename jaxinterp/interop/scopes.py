"""The released layouts of Gemma Scope 1 and 2 and Llama Scope, read as SAELens' loaders read them.

Gemma Scope 1 (`google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}`), one folder per SAE
(`layer_20/width_16k/average_l0_71/`):

    params.npz        W_enc [D, F], W_dec [F, D], b_enc [F], b_dec [D], threshold [F]

a JumpReLU SAE that subtracts nothing from its input. The repository name says what it reads (res:
resid_post, mlp: mlp_out, att: the attention's z, which no site holds) and the folder its layer; an
`embedding` SAE reads the embeddings before Gemma's sqrt(d_model) scaling (W_enc / sqrt(d),
W_dec x sqrt(d)).

Gemma Scope 2 (`google/gemma-scope-2-*`), one folder per dictionary:

    params.safetensors   w_enc [D, F], w_dec [F, O], b_enc [F], b_dec [O], threshold [F],
                         affine_skip_connection [D, O] (in, out) for the affine transcoders
    config.json          {"architecture": "jump_relu", "hf_hook_point_in", "hf_hook_point_out",
                          "model_name", "affine_connection", ...} (absent in some folders: inferred
                          from the folder's name)

Llama Scope (`fnlp/Llama3_1-8B-Base-L{layer}{R,A,M,TC}-{8,32}x`):

    hyperparams.json              {"d_model", "d_sae", "hook_point_in", "hook_point_out",
                                   "jump_relu_threshold", "dataset_average_activation_norm": {"in", "out"}}
    checkpoints/final.safetensors encoder.weight [F, D], encoder.bias, decoder.weight [D, F], decoder.bias

SAELens reads it with the input scaled by s = sqrt(d_model) / norm_in (folded into the weights) and
one threshold for every feature, `jump_relu_threshold x s`; so does this reader (norm_scale = s).
A Llama Scope transcoder (hook_point_out differs) scales its target by sqrt(d_model) / norm_out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxinterp import dictionaries as dl
from jaxinterp.errors import MissingFileError, ModelFileError
from jaxinterp.interop import hooks


def _jumprelu(d_in: int, d_sae: int, d_out: int, w: dict, *, skip: np.ndarray | None = None,
              transcoder: bool = False) -> tuple[dl.DictionarySpec, dl.Params]:
    """A JumpReLU dictionary that subtracts nothing from its input, from raw-unit arrays."""
    architecture = "skip_transcoder" if skip is not None else "transcoder" if transcoder else "sae"
    spec = dl.DictionarySpec(activation="jumprelu", d_in=d_in, d_sae=d_sae, architecture=architecture,
                             d_out=d_out if architecture != "sae" else None)
    one = jnp.ones((), jnp.float32)
    params = {k: jnp.asarray(np.asarray(w[k], np.float32)) for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    params["norm_scale"] = one
    if spec.arch.reads_target:
        params |= {"b_in": jnp.zeros((d_in,), jnp.float32), spec.arch.target_scale: one}
        if skip is not None:
            params["W_skip"] = jnp.asarray(np.asarray(skip, np.float32))
    else:
        params = spec.kind.fold_input_shift(params, -params["b_dec"])
    return spec, params


def _check(path: Path, w: dict, shapes: dict) -> None:
    missing = [k for k in shapes if k not in w]
    if missing:
        raise ModelFileError(f"{path}: missing {missing} (found {sorted(w)}); expected {sorted(shapes)}")
    for k, want in shapes.items():
        if tuple(w[k].shape) != want:
            raise ModelFileError(f"{path}: {k} has shape {tuple(w[k].shape)}, expected {want}")


def _scope_name(path: Path, pattern: str) -> re.Match | None:
    """The first component of `path` (innermost first), or of a Hugging Face cache folder
    (`models--google--gemma-scope-...`), that matches `pattern`."""
    for part in reversed(path.parts):
        m = re.search(pattern, part.replace("models--", "").replace("--", "/"))
        if m:
            return m
    return None


def load_gemma_scope_1(directory: str | Path) -> tuple[dl.DictionarySpec, dl.Params, dict]:
    """(spec, params, info) of a Gemma Scope 1 folder; info: site, model, hook."""
    d = Path(directory)
    path = d / "params.npz"
    if not path.is_file():
        raise MissingFileError(f"{path} not found; a Gemma Scope folder holds params.npz")
    try:
        with np.load(path) as data:
            w = {("W_" + k[2:] if k.startswith("w_") else k): np.asarray(data[k], np.float32) for k in data.files}
    except Exception as e:  # noqa: BLE001 - zip and npy errors alike
        raise ModelFileError(f"{path} is not a readable .npz file ({e})") from None
    if "W_enc" not in w:
        raise ModelFileError(f"{path}: no W_enc (found {sorted(w)}); Gemma Scope saves W_enc, W_dec, b_enc, b_dec, "
                             "threshold")
    d_in, d_sae = w["W_enc"].shape
    _check(path, w, {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                     "threshold": (d_sae,)})
    if "scaling_factor" in w:
        w["W_dec"] = w["W_dec"] * w.pop("scaling_factor")[:, None]
    repo = _scope_name(d.absolute(), r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)")
    layer = _scope_name(d.absolute(), r"^layer_(\d+)$")
    embedding = any("embedding" in part for part in d.absolute().parts)
    info: dict = {"format": "gemma-scope", "model": None, "site": None}
    if repo:
        info["model"] = f"google/gemma-2-{repo.group(1)}" + ("-it" if repo.group(2) == "it" else "")
        kind = repo.group(3)
        if kind == "att":
            info["hook"] = f"blocks.{layer.group(1) if layer else '?'}.attn.hook_z"
        elif kind == "res" and embedding:
            info["site"] = "embed"
        elif layer:
            info["site"] = f"blocks.{layer.group(1)}.{'resid_post' if kind == 'res' else 'mlp_out'}"
    if embedding:  # trained on the embeddings before the sqrt(d_model) scaling
        w["W_enc"], w["W_dec"] = w["W_enc"] / np.sqrt(d_in), w["W_dec"] * np.sqrt(d_in)
    spec, params = _jumprelu(d_in, d_sae, d_in, w)
    return spec, params, info


def _gemma_scope_2_config(d: Path) -> dict:
    """config.json, or the fields SAELens infers from the folder's name when there is none."""
    if (d / "config.json").is_file():
        try:
            return json.loads((d / "config.json").read_text())
        except ValueError as e:
            raise ModelFileError(f"{d / 'config.json'} is not readable JSON ({e})") from None
    layer = _scope_name(d.absolute(), r"layer_(\d+)")
    name = str(d.absolute())
    if layer is None:
        return {"architecture": "jump_relu"}
    i = layer.group(1)
    if "transcoder" in name:
        return {"architecture": "jump_relu", "affine_connection": "affine" in name,
                "hf_hook_point_in": f"model.layers.{i}.pre_feedforward_layernorm.output",
                "hf_hook_point_out": f"model.layers.{i}.post_feedforward_layernorm.output"}
    for key, hook in (("resid_post", f"model.layers.{i}.output"), ("attn_out", f"model.layers.{i}.self_attn.o_proj.input"),
                      ("mlp_out", f"model.layers.{i}.post_feedforward_layernorm.output")):
        if key in name:
            return {"architecture": "jump_relu", "hf_hook_point_in": hook}
    return {"architecture": "jump_relu"}


def load_gemma_scope_2(directory: str | Path) -> tuple[dl.DictionarySpec, dl.Params, dict]:
    """(spec, params, info) of a Gemma Scope 2 folder (an SAE, a transcoder or an affine one)."""
    from safetensors.numpy import load_file

    d = Path(directory)
    path = d / "params.safetensors"
    if not path.is_file():
        raise MissingFileError(f"{path} not found; a Gemma Scope 2 folder holds params.safetensors (+ config.json)")
    cfg = _gemma_scope_2_config(d)
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise ModelFileError(f"{d / 'config.json'}: architecture {cfg.get('architecture')!r}; Gemma Scope 2 "
                             "dictionaries are jump_relu")
    try:
        raw = {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    except Exception as e:  # noqa: BLE001
        raise ModelFileError(f"{path} is not a readable safetensors file ({e})") from None
    w = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    if "W_enc" not in w or "W_dec" not in w:
        raise ModelFileError(f"{path}: found {sorted(raw)}; Gemma Scope 2 saves w_enc, w_dec, b_enc, b_dec, threshold")
    d_in, d_sae = w["W_enc"].shape
    if w["W_dec"].ndim == 3:  # a CLT layer's decoders to every later layer: SAELens sums them
        w["W_dec"] = w["W_dec"].sum(axis=1)
    d_out = w["W_dec"].shape[-1]
    skip = w.get("affine_skip_connection")
    _check(path, w, {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
                     "threshold": (d_sae,), **({"affine_skip_connection": (d_in, d_out)} if skip is not None else {})})
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    transcoder = hook_out is not None or skip is not None or d_out != d_in
    info: dict = {"format": "gemma-scope-2", "model": cfg.get("model_name"), "site": None, "target_site": None,
                  "hook": hook_in}
    for key, hook in (("site", hook_in), ("target_site", hook_out)):
        if hook:
            try:
                info[key] = hooks.site_for_hook(hook)
            except hooks.HookNameError:
                pass
    spec, params = _jumprelu(d_in, d_sae, d_out, w, skip=None if skip is None else skip.T, transcoder=transcoder)
    return spec, params, info


def load_llama_scope(directory: str | Path) -> tuple[dl.DictionarySpec, dl.Params, dict]:
    """(spec, params, info) of a Llama Scope folder (hyperparams.json + checkpoints/final.safetensors)."""
    from safetensors.numpy import load_file

    d = Path(directory)
    hp_path, path = d / "hyperparams.json", d / "checkpoints" / "final.safetensors"
    for p in (hp_path, path):
        if not p.is_file():
            raise MissingFileError(f"{p} not found; a Llama Scope folder holds hyperparams.json and "
                                   "checkpoints/final.safetensors")
    try:
        hp = json.loads(hp_path.read_text())
        d_in, d_sae = int(hp["d_model"]), int(hp["d_sae"])
        norms = hp.get("dataset_average_activation_norm") or {}
        threshold = float(hp["jump_relu_threshold"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{hp_path} is not a Llama Scope config (d_model, d_sae, jump_relu_threshold: {e})") from None
    try:
        raw = {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    except Exception as e:  # noqa: BLE001
        raise ModelFileError(f"{path} is not a readable safetensors file ({e})") from None
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out") or hp.get("hook_point_in")
    transcoder = hook_out != hook_in
    d_out = raw["decoder.weight"].shape[0] if "decoder.weight" in raw else d_in
    _check(path, raw, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "decoder.weight": (d_out, d_sae),
                       "decoder.bias": (d_out,)})
    s_in = d_in**0.5 / float(norms["in"]) if norms.get("in") else 1.0
    s_out = d_out**0.5 / float(norms["out"]) if transcoder and norms.get("out") else s_in
    w = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"], "W_dec": raw["decoder.weight"].T,
         "b_dec": raw["decoder.bias"], "threshold": np.full((d_sae,), threshold * s_in, np.float32)}
    spec, params = _jumprelu(d_in, d_sae, d_out, w, transcoder=transcoder)
    params["norm_scale"] = jnp.float32(s_in)
    if transcoder:
        params[spec.arch.target_scale] = jnp.float32(s_out)
    info: dict = {"format": "llama-scope", "model": hp.get("model_name") or "meta-llama/Llama-3.1-8B", "hook": hook_in,
                  "site": None, "target_site": None}
    for key, hook in (("site", hook_in), ("target_site", hook_out if transcoder else None)):
        if hook:
            try:
                info[key] = hooks.site_for_hook(hook)
            except hooks.HookNameError:
                pass
    return spec, params, info
