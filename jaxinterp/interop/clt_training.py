"""EleutherAI clt-training's cross-layer transcoders (its fork of sparsify): a run folder with one
sparsify-style folder per source layer.

    config.json                 the run: model, hookpoints, cross_layer, hookpoints_in, sae settings
    layers.{p}.mlp/cfg.json     SparseCoderConfig + d_in: k, num_latents, transcode, skip_connection,
                                n_targets (the layers p writes to, itself first), normalize_io,
                                post_encoder_scale, coalesce_topk, ...
    layers.{p}.mlp/sae.safetensors
                                encoder.weight [F, D], encoder.bias [F], W_dec [F, D], b_dec [D],
                                W_skip [D, D] (out, in), in_norm [1], out_norm [1],
                                post_encs.{o} [F], post_enc_scales.{o} [F] for o < n_targets

With `coalesce_topk: concat` (the mode its training scripts use) the repository's runner computes,
for source layer p with x^_p = x_p sqrt(D) / in_norm_p (or x_p without `normalize_io`),

    a_p = topk_k(relu(x^_p @ encoder.weight_p.T + encoder.bias_p))
    y_j = out_norm_j / sqrt(D) [ sum_{p <= j < p + n_targets_p} sum_m a'_{p,j-p,m} W_dec_j[m]
                                 + b_dec_j + x^_j @ W_skip_j.T ]
    a'_{p,o,m} = (a_{p,m} + post_encs_p.{o}[m] [a_{p,m} > 0]) post_enc_scales_p.{o}[m]

Every source's latent m is decoded by the target's row m, scaled per (source, offset). As our CLT
that is norm_in = sqrt(D) / in_norm, norm_out = sqrt(D) / out_norm, W_dec_p[m, o] =
post_enc_scales_p.{o}[m] W_dec_{p+o}[m], W_skip[j] = W_skip_j.T, and the offsets as `post_enc_p`
[F, T] (`CLTSpec.post_encoder`; a run whose offsets are all zero reads as a plain CLT). The other
modes (`none`, `per-layer`, `group`), coalesced top-k, tied decoders and groupmax / batchtopk
activations are refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxinterp.dictionaries import clt
from jaxinterp.errors import JaxinterpError, ModelFileError
from jaxinterp.interop import hooks

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


class CLTTrainingError(JaxinterpError):
    """A clt-training run this reader cannot express, or an incomplete one."""


def layer_folders(root: Path) -> list[Path]:
    """The source-layer folders of a clt-training run (cfg.json with `n_targets` > 0), layer order."""
    out = []
    for c in root.iterdir() if root.is_dir() else ():
        if c.is_dir() and (c / CFG).is_file():
            try:
                cfg = json.loads((c / CFG).read_text())
            except ValueError:
                continue
            if isinstance(cfg, dict) and int(cfg.get("n_targets") or 0) > 0:
                out.append(c)
    return sorted(out, key=_layer)


def _layer(folder: Path) -> int:
    m = re.search(r"(?:layers|h)[._](\d+)", folder.name)
    if not m:
        raise CLTTrainingError(f"{folder}: no layer number in the hookpoint name (expected layers.N.mlp)")
    return int(m.group(1))


def load(root: str | Path) -> tuple[clt.CLTSpec, clt.Params, dict]:
    """(spec, params, run config) of a clt-training run folder."""
    from safetensors.numpy import load_file

    root = Path(root)
    folders = layer_folders(root)
    if not folders:
        raise CLTTrainingError(f"{root}: no layer folder with cfg.json naming n_targets > 0")
    run = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else {}
    layers = [_layer(f) for f in folders]
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise CLTTrainingError(f"{root}: layers {layers}; a CLT covers consecutive layers")
    cfgs = [json.loads((f / CFG).read_text()) for f in folders]
    for f, c in zip(folders, cfgs):
        bad = {"activation": (c.get("activation", "topk"), "topk"), "coalesce_topk": (c.get("coalesce_topk", "none"), "concat"),
               "topk_coalesced": (bool(c.get("topk_coalesced")), False), "transcode": (bool(c.get("transcode")), True),
               "per_source_tied": (bool(c.get("per_source_tied")), False),
               "secondary_target_tied": (bool(c.get("secondary_target_tied")), False)}
        for key, (have, want) in bad.items():
            if have != want:
                raise CLTTrainingError(f"{f / CFG}: {key}={have!r}; jaxinterp reads clt-training CLTs with "
                                       f"{key}={want!r} (the mode of its training scripts)")
    n, d = len(folders), int(cfgs[0]["d_in"])
    ks = {int(c.get("k", 32)) for c in cfgs}
    if len(ks) > 1:
        raise CLTTrainingError(f"{root}: the layers keep different k {sorted(ks)}; a CLT here keeps one k per layer")
    f_ = int(cfgs[0].get("num_latents") or 0) or d * int(cfgs[0].get("expansion_factor", 32))
    targets = [int(c["n_targets"]) for c in cfgs]
    span = targets[0] if targets[0] < n else None
    spec_targets = [min(span or n, n - p) for p in range(n)]
    if targets != spec_targets:
        raise CLTTrainingError(f"{root}: n_targets {targets}; expected {spec_targets} (one cross_layer span)")
    w = []
    for folder in folders:
        try:
            w.append({k: np.asarray(v, np.float32) for k, v in load_file(str(folder / WEIGHTS)).items()})
        except Exception as e:  # noqa: BLE001 - missing or corrupt: one line
            raise ModelFileError(f"{folder / WEIGHTS} is not readable ({e})") from None
    skip = bool(cfgs[0].get("skip_connection"))
    if any(bool(c.get("skip_connection")) != skip for c in cfgs):
        raise CLTTrainingError(f"{root}: some layers have a skip connection and some not; a CLT has both or neither")
    scaled = [bool(c.get("post_encoder_scale")) for c in cfgs]
    norm_io = [bool(c.get("normalize_io")) for c in cfgs]
    for p, (folder, t) in enumerate(zip(folders, w)):
        need = ["encoder.weight", "encoder.bias", "W_dec", "b_dec", *(["W_skip"] if skip else []),
                *(["in_norm", "out_norm"] if norm_io[p] else []), *(f"post_encs.{o}" for o in range(targets[p])),
                *(f"post_enc_scales.{o}" for o in range(targets[p]) if scaled[p])]
        missing = [k for k in need if k not in t]
        if missing:
            raise ModelFileError(f"{folder / WEIGHTS}: missing {missing} (found {sorted(t)})")
        if t["encoder.weight"].shape != (f_, d) or t["W_dec"].shape != (f_, d):
            raise ModelFileError(f"{folder / WEIGHTS}: encoder.weight {t['encoder.weight'].shape}, W_dec "
                                 f"{t['W_dec'].shape}; cfg.json wants ({f_}, {d})")
    norm_in = [d**0.5 / float(t["in_norm"].reshape(-1)[0]) if io else 1.0 for t, io in zip(w, norm_io)]
    norm_out = [d**0.5 / float(t["out_norm"].reshape(-1)[0]) if io else 1.0 for t, io in zip(w, norm_io)]
    offsets = [np.stack([t[f"post_encs.{o}"] for o in range(targets[p])], axis=1) for p, t in enumerate(w)]
    point = "mlp_in"
    hooks_in = run.get("hookpoints_in") or []
    if hooks_in:
        try:
            point = "resid_mid" if all(h.endswith("post_attention_layernorm") for h in hooks_in) else None
        except AttributeError:
            point = None
        if point is None:
            raise CLTTrainingError(f"{root / 'config.json'}: hookpoints_in {hooks_in!r}; jaxinterp reads CLTs on the "
                                   "MLP's input (the default) or on layers.N.post_attention_layernorm's input")
    spec = clt.CLTSpec("topk", n_layers=n, d_model=d, d_sae=f_, k=ks.pop(), span=span, skip=skip,
                       first_layer=layers[0], input_point=point, post_encoder=any(np.any(o) for o in offsets))
    params = {"W_enc": jnp.asarray(np.stack([t["encoder.weight"].T for t in w])),
              "b_enc": jnp.asarray(np.stack([t["encoder.bias"] for t in w])),
              "b_dec": jnp.asarray(np.stack([t["b_dec"] for t in w])),
              "norm_in": jnp.asarray(norm_in, jnp.float32), "norm_out": jnp.asarray(norm_out, jnp.float32)}
    for p in range(n):
        dec = np.stack([w[p + o]["W_dec"] * (w[p][f"post_enc_scales.{o}"][:, None] if scaled[p] else 1.0)
                        for o in range(targets[p])], axis=1)
        params[f"W_dec_{p}"] = jnp.asarray(dec)
        if spec.post_encoder:
            params[f"post_enc_{p}"] = jnp.asarray(offsets[p])
    if skip:
        params["W_skip"] = jnp.asarray(np.stack([t["W_skip"].T for t in w]))
    try:  # the sites the folders name must be the CLT's (layers.N.mlp: mlp_in -> mlp_out)
        hooks.site_for_hook(folders[0].name, reads_input=True)
    except hooks.HookNameError as e:
        raise CLTTrainingError(f"{folders[0]}: {e}") from None
    return spec, params, run
