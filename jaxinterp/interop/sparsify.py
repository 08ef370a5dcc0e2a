"""sparsify's format (EleutherAI): one folder per hookpoint with `cfg.json` + `sae.safetensors`.

    cfg.json          {"activation": "topk" | "groupmax", "k", "num_latents" (0: d_in x
                       expansion_factor), "expansion_factor", "transcode", "skip_connection",
                       "normalize_decoder", "multi_topk", "d_in"}
    sae.safetensors   encoder.weight [F, D], encoder.bias [F], W_dec [F, D], b_dec [D],
                      W_skip [D, D] (out, in) with a skip connection

sparsify runs `f = topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))` (no `- b_dec` when
`transcode`), `y = f @ W_dec + b_dec (+ x @ W_skip.T)`. A folder is named after the module it hooks
(`layers.6`, `layers.6.mlp`): an SAE reads the module's output; a transcoder reads its input and
predicts its output. An SAE with a skip connection reads as our skip transcoder whose input bias is
b_dec. Exports fold our scales in as the SAELens export does; sparsify runs top-k only, so other
activations are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxinterp import dictionaries as dl
from jaxinterp.errors import MissingFileError, ModelFileError
from jaxinterp.interop import hooks
from jaxinterp.interop.saelens import ExportError, folded_weights

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def hook_sites(hookpoint: str, *, transcode: bool) -> tuple[str | None, str | None]:
    """(site read, site written) for a sparsify hookpoint; None where no site holds it."""
    try:
        out = hooks.site_for_hook(hookpoint)
        read = hooks.site_for_hook(hookpoint, reads_input=True) if transcode else out
    except hooks.HookNameError:
        return None, None
    return read, out


def load_sparsify(directory: str | Path) -> tuple[dl.DictionarySpec, dl.Params, dict]:
    """(spec, params, cfg) of a sparsify hookpoint folder, with sparsify's numerics."""
    d = Path(directory)
    cfg_path, w_path = d / CFG, d / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise MissingFileError(f"{p} not found; a sparsify folder holds cfg.json and sae.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
        d_in = int(cfg["d_in"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{cfg_path} is not a sparsify config with d_in ({e})") from None
    if cfg.get("activation", "topk") != "topk":
        raise ModelFileError(f"{cfg_path}: activation {cfg.get('activation')!r}; jaxinterp runs sparsify's topk "
                             "coders (groupmax has no counterpart)")
    try:
        w = {k: np.asarray(v, np.float32) for k, v in load_file(str(w_path)).items()}
    except Exception as e:  # noqa: BLE001 - a corrupt file raises safetensors' own errors
        raise ModelFileError(f"{w_path} is not a readable safetensors file ({e})") from None
    need = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if cfg.get("skip_connection") else [])
    missing = [n for n in need if n not in w]
    if missing:
        raise ModelFileError(f"{w_path}: missing {missing} (found {sorted(w)}); sparsify saves {need}")
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    if w["encoder.weight"].shape != (d_sae, d_in) or w["W_dec"].shape != (d_sae, d_in):
        raise ModelFileError(f"{w_path}: encoder.weight {w['encoder.weight'].shape} and W_dec {w['W_dec'].shape}, "
                             f"cfg.json wants ({d_sae}, {d_in}) each")
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    architecture = "skip_transcoder" if skip else "transcoder" if transcode else "sae"
    spec = dl.DictionarySpec(activation="topk", d_in=d_in, d_sae=d_sae, k=int(cfg.get("k", 32)),
                             architecture=architecture, d_out=d_in)
    one = jnp.ones((), jnp.float32)
    params = {"W_enc": jnp.asarray(w["encoder.weight"].T), "b_enc": jnp.asarray(w["encoder.bias"]),
              "W_dec": jnp.asarray(w["W_dec"]), "b_dec": jnp.asarray(w["b_dec"]), "norm_scale": one}
    if spec.arch.reads_target:
        params |= {"b_in": jnp.asarray(np.zeros(d_in, np.float32) if transcode else w["b_dec"]),
                   spec.arch.target_scale: one}
    if skip:
        params["W_skip"] = jnp.asarray(w["W_skip"])
    return spec, params, cfg


def export_sparsify(out_dir: str | Path, spec: dl.DictionarySpec, params: dl.Params, *,
                    hookpoint: str = "unknown") -> Path:
    """Write a top-k dictionary as sparsify's folder `out_dir/<hookpoint>`; returns that folder."""
    if not spec.kind.row_topk:
        raise ExportError(f"sparsify runs top-k coders only; this dictionary is {spec.activation} (export it to "
                          "SAELens or circuit-tracer, or keep the jaxinterp directory)")
    if spec.d_out != spec.d_in:
        raise ExportError(f"sparsify's transcoders predict an output as wide as their input; this one maps "
                          f"{spec.d_in} -> {spec.d_out}")
    weights = folded_weights(spec, params)  # SAELens' fold: raw units, transcoders without an input shift
    out = Path(out_dir) / hookpoint
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": weights["W_enc"].T.copy(), "encoder.bias": weights["b_enc"],
               "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}
    if spec.arch.skip:
        tensors["W_skip"] = weights["W_skip"]
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(out / WEIGHTS))
    cfg = {"activation": "topk", "expansion_factor": max(1, spec.d_sae // spec.d_in), "normalize_decoder": True,
           "num_latents": spec.d_sae, "k": spec.k, "multi_topk": False, "skip_connection": spec.arch.skip,
           "transcode": spec.arch.reads_target, "d_in": spec.d_in}
    (out / CFG).write_text(json.dumps(cfg) + "\n")
    return out
