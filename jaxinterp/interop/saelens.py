"""SAELens format: `cfg.json` + `sae_weights.safetensors`.

Exported weights reconstruct in the input's own units: the input normalisation (x -> s x) is folded
in, W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s, so that

  f = act((x - b_dec') @ W_enc' + b_enc)   and   x_hat = f @ W_dec' + b_dec'

equal our `encode`/`decode` with normalisation (thresholds live in pre-activation units, which the
fold leaves unchanged). BatchTopK is exported as the JumpReLU with its EMA threshold, as SAELens
runs it at inference. Gated keeps b_gate, b_mag, r_mag.

Transcoders (SAELens' `transcoder`, `skip_transcoder`, `jumprelu_transcoder`) subtract nothing
from their input and scale input and output separately: with s the input's scale and t the
target's, W_enc' = s W_enc, b_enc' = b_enc - b_in @ W_enc, W_dec' = W_dec / t, b_dec' = b_dec / t,
W_skip' = W_skip s / t, so that SAELens' `decode(encode(x)) + x @ W_skip'.T` is our `reconstruct`.
SAELens has no TopK transcoder and no JumpReLU skip transcoder: those are refused with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxinterp import dictionaries as dl
from jaxinterp.errors import JaxinterpError, MissingFileError, ModelFileError

def hook_name_for_site(site: str | None) -> str:
    """`blocks.8.resid_post` -> TransformerLens' `blocks.8.hook_resid_post`."""
    if not site:
        return "unknown"
    parts = site.split(".")
    if len(parts) == 3 and parts[0] == "blocks":
        return f"blocks.{parts[1]}.hook_{parts[2]}"
    if site == "embed":
        return "hook_embed"
    if site == "final":
        return "ln_final.hook_normalized"
    return site


class ExportError(JaxinterpError):
    """A dictionary that SAELens' format cannot hold."""


def saelens_architecture(spec: dl.DictionarySpec) -> str:
    """SAELens' name for the dictionary; raises `ExportError` when SAELens has none."""
    name = dl.saelens_name(spec.kind, spec.arch)
    if name is None:
        raise ExportError(f"SAELens has no {spec.activation} {spec.architecture}; export a relu or jumprelu one, "
                          "or use the dictionary directory (jaxinterp.load_dictionary)")
    return name


def folded_weights(spec: dl.DictionarySpec, params: dl.Params) -> dict[str, np.ndarray]:
    s, t = params["norm_scale"], dl.target_scale(spec, params)
    if spec.arch.reads_target:  # SAELens' transcoders subtract nothing before the encoder
        params = spec.kind.fold_input_shift(params, params[spec.arch.pre_bias])
    out = {
        "W_enc": params["W_enc"] * s,
        "W_dec": params["W_dec"] / t,
        "b_dec": params["b_dec"] / t,
    }
    if spec.arch.skip:
        out["W_skip"] = params["W_skip"] * (s / t)
    out |= {name: params[name] for name in spec.kind.feature_params}
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def export_saelens(
    out_dir: str | Path,
    spec: dl.DictionarySpec,
    params: dl.Params,
    *,
    hook_name: str = "unknown",
    hook_name_out: str | None = None,
    model_name: str = "unknown",
    dtype: str = "float32",
    extra_metadata: dict | None = None,
) -> Path:
    """Write the dictionary in SAELens' on-disk format; returns the directory. `hook_name_out`:
    the hook a transcoder writes."""
    architecture = saelens_architecture(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = folded_weights(spec, params)
    if dtype != "float32":
        import ml_dtypes

        np_dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
        weights = {k: v.astype(np_dtype) for k, v in weights.items()}
    save_file(weights, str(out / "sae_weights.safetensors"))
    cfg = {
        "architecture": architecture,
        "d_in": spec.d_in,
        "d_sae": spec.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": not spec.arch.reads_target,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "sae_lens_training_version": None,
            "trained_with": "jaxinterp",
            "original_activation": spec.activation,
            **(extra_metadata or {}),
        },
    }
    if spec.kind.saelens_k:
        cfg["k"] = spec.k
    if spec.matryoshka_widths:  # SAELens runs the full dictionary; the nesting is kept for the record
        cfg["metadata"]["matryoshka_widths"] = list(spec.matryoshka_widths)
    if spec.arch.reads_target:
        cfg["d_out"] = spec.d_out
        cfg["metadata"]["hook_name_out"] = hook_name_out or "unknown"
        # the SAELens 6 config layout (an older or missing version makes SAELens convert it)
        cfg["metadata"]["sae_lens_version"] = "6.18.0"
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_saelens(directory: str | Path) -> tuple[dl.DictionarySpec, dl.Params, dict]:
    """Read a SAELens directory back as (spec, params, cfg); params carry norm_scale = 1."""
    d = Path(directory)
    cfg_path, w_path = d / "cfg.json", d / "sae_weights.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise MissingFileError(f"{p} not found; a SAELens directory holds cfg.json and sae_weights.safetensors")
    cfg = json.loads(cfg_path.read_text())
    arch = cfg.get("architecture", "standard")
    pair = dl.from_saelens_architecture(arch)
    if pair is None:
        known = sorted({n for ar in dl.ARCHITECTURES.values() for a in dl.ACTIVATIONS.values() if a.saelens_native
                        for n in [dl.saelens_name(a, ar)] if n})
        raise ModelFileError(f"{cfg_path}: architecture {arch!r} not supported; expected one of {known}")
    kind, architecture = pair
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ModelFileError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
                         "fold the normalisation into the weights first")
    weights = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in load_file(str(w_path)).items()}
    spec = dl.DictionarySpec(activation=kind.name, d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]),
                             k=int(cfg.get("k") or 1), architecture=architecture.name, d_out=cfg.get("d_out"))
    params = dict(weights) | {"norm_scale": jnp.ones((), jnp.float32)}
    if architecture.reads_target:  # no input shift, no scales: the weights are in raw units
        params |= {"b_in": jnp.zeros((spec.d_in,), jnp.float32), architecture.target_scale: jnp.ones((), jnp.float32)}
    elif not cfg.get("apply_b_dec_to_input", True):
        # Our encoder always subtracts b_dec; fold it back out of the encoder bias instead.
        params = kind.fold_input_shift(params, -params["b_dec"])
    return spec, params, cfg
