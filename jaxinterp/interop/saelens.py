"""SAELens format: `cfg.json` + `sae_weights.safetensors`.

Exported weights reconstruct in the input's own units: the input normalisation (x -> s x) is folded
in, W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s, so that

  f = act((x - b_dec') @ W_enc' + b_enc)   and   x_hat = f @ W_dec' + b_dec'

equal our `encode`/`decode` with normalisation (thresholds live in pre-activation units, which the
fold leaves unchanged). BatchTopK is exported as the JumpReLU with its EMA threshold, as SAELens
runs it at inference. Gated keeps b_gate, b_mag, r_mag.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxinterp.errors import MissingFileError
from jaxinterp.errors import ModelFileError
from jaxinterp import dictionaries as dl

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


def folded_weights(spec: dl.DictionarySpec, params: dl.Params) -> dict[str, np.ndarray]:
    s = params["norm_scale"]
    out = {
        "W_enc": params["W_enc"] * s,
        "W_dec": params["W_dec"] / s,
        "b_dec": params["b_dec"] / s,
    }
    out |= {name: params[name] for name in spec.kind.feature_params}
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def export_saelens(
    out_dir: str | Path,
    spec: dl.DictionarySpec,
    params: dl.Params,
    *,
    hook_name: str = "unknown",
    model_name: str = "unknown",
    dtype: str = "float32",
    extra_metadata: dict | None = None,
) -> Path:
    """Write the dictionary in SAELens' on-disk format; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = folded_weights(spec, params)
    if dtype != "float32":
        import ml_dtypes

        np_dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
        weights = {k: v.astype(np_dtype) for k, v in weights.items()}
    save_file(weights, str(out / "sae_weights.safetensors"))
    cfg = {
        "architecture": spec.kind.saelens_architecture,
        "d_in": spec.d_in,
        "d_sae": spec.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
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
    kind = dl.from_saelens_architecture(arch)
    if kind is None:
        known = sorted({a.saelens_architecture for a in dl.ACTIVATIONS.values() if a.saelens_native})
        raise ModelFileError(f"{cfg_path}: architecture {arch!r} not supported; expected one of {known}")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ModelFileError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
                         "fold the normalisation into the weights first")
    weights = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in load_file(str(w_path)).items()}
    spec = dl.DictionarySpec(activation=kind.name, d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]),
                             k=int(cfg.get("k") or 1))
    params = dict(weights) | {"norm_scale": jnp.ones((), jnp.float32)}
    if not cfg.get("apply_b_dec_to_input", True):
        # Our encoder always subtracts b_dec; fold it back out of the encoder bias instead.
        params = kind.fold_input_shift(params, -params["b_dec"])
    return spec, params, cfg
