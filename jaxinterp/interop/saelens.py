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
SAELens has no TopK or gated transcoder: those are refused with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxinterp import dictionaries as dl
from jaxinterp.errors import JaxinterpError, MissingFileError, ModelFileError
from jaxinterp.interop.hooks import hook_for_site

def hook_name_for_site(site: str | None) -> str:
    """`blocks.8.resid_post` -> TransformerLens' `blocks.8.hook_resid_post` (`hooks.hook_for_site`)."""
    return hook_for_site(site)


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
        "normalize_activations": spec.row_norm,  # "none" unless read from a row-normalising SAELens folder
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "sae_lens_training_version": None,
            "trained_with": "jaxinterp",
            "original_activation": spec.activation,
            # the SAELens 6 config layout (an older or missing version makes SAELens convert it)
            "sae_lens_version": "6.54.0",
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
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


SAELENS_ROW_NORMS = {"layer_norm": "layer_norm", "constant_norm_rescale": "constant_norm_rescale"}
"""SAELens' run-time normalisations that depend on each row (kept as `DictionarySpec.row_norm`); its
other settings (`expected_average_only_in`, `covariance_whitening`) are folded into the weights
before saving and are the identity when SAELens loads a folder."""
_OTHER_ARCHITECTURES = ("abstopk", "temporal", "matching_pursuit")
_TRAINING_ONLY = {"batchtopk": "batchtopk", "matryoshka_batchtopk": "batchtopk"}
"""SAELens training architectures (checkpoints written by `save_model`) and the activation their
inference form (the JumpReLU `save_inference_model` writes) is here."""


def _version_before_6(cfg: dict) -> bool:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return True
    try:
        return int(str(version).split(".")[0]) < 6
    except ValueError:
        return True


def normalise_config(cfg: dict) -> dict:
    """A SAELens cfg.json as SAELens 6 reads it: configs of SAELens < 6 (no `sae_lens_version`)
    renamed (hook_point -> hook_name, activation_fn_str -> activation_fn), defaulted
    (apply_b_dec_to_input true, architecture standard), top-k from `activation_fn_kwargs`, a boolean
    normalize_activations as expected_average_only_in / none; the hook fields gathered in `metadata`."""
    cfg = dict(cfg)
    meta = dict(cfg.get("metadata") or {})
    if _version_before_6(cfg):
        renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                   "activation_fn_str": "activation_fn"}
        cfg = {renames.get(k, k): v for k, v in cfg.items()}
        cfg.setdefault("apply_b_dec_to_input", True)
        cfg.setdefault("architecture", "standard")
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
            cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
        for key in ("model_name", "hook_name", "hook_name_out", "hook_head_index", "prepend_bos", "context_size",
                    "dataset_path", "neuronpedia_id"):
            if key in cfg and key not in meta:
                meta[key] = cfg[key]
    if cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "none"
    cfg["metadata"] = meta
    return cfg


def _need(cfg_path: Path, weights: dict, names, what: str) -> None:
    missing = [n for n in names if n not in weights]
    if missing:
        raise ModelFileError(f"{cfg_path.parent / 'sae_weights.safetensors'}: a {what} needs tensors {missing}; "
                             f"found {sorted(weights)} (an incomplete or foreign file)")


def load_saelens(directory: str | Path) -> tuple[dl.DictionarySpec, dl.Params, dict]:
    """Read a SAELens directory (`cfg.json` + `sae_weights.safetensors`, SAELens 3 to 6) as (spec,
    params, cfg), with SAELens' inference numerics: every architecture that is one of our kinds
    (standard, gated, topk, jumprelu, the four transcoders; the training checkpoints of topk,
    jumprelu, batchtopk and matryoshka_batchtopk as their inference form), `apply_b_dec_to_input`,
    `rescale_acts_by_decoder_norm` and a pre-6 `scaling_factor` folded into the weights, the
    row-wise normalisations kept as `row_norm`. `cfg` is the config as SAELens 6 reads it."""
    d = Path(directory)
    cfg_path, w_path = d / "cfg.json", d / "sae_weights.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise MissingFileError(f"{p} not found; a SAELens directory holds cfg.json and sae_weights.safetensors")
    try:
        raw = json.loads(cfg_path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ModelFileError(f"{cfg_path} is not a readable SAELens config ({e})") from None
    cfg = normalise_config(raw)
    try:
        weights = {k: np.asarray(v, np.float32) for k, v in load_file(str(w_path)).items()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on a corrupt file
        raise ModelFileError(f"{w_path} is not a readable safetensors file ({e})") from None
    arch = cfg.get("architecture", "standard")
    if arch in _OTHER_ARCHITECTURES:
        raise ModelFileError(f"{cfg_path}: SAELens architecture {arch!r} is not a kind jaxinterp runs; it reads "
                             "standard, gated, topk, jumprelu, batchtopk, matryoshka_batchtopk and the transcoders")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ModelFileError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} (an attention z SAE, "
                             "per head before the output projection): no site holds that activation here")
    norm = cfg["normalize_activations"]
    known_norms = ("none", "expected_average_only_in", "covariance_whitening", *SAELENS_ROW_NORMS)
    if norm not in known_norms:
        raise ModelFileError(f"{cfg_path}: normalize_activations={norm!r}; SAELens writes one of {list(known_norms)}")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise ModelFileError(f"{cfg_path}: {key} missing or not an integer ({cfg.get(key)!r})")
    k = 1
    extra: dict = {}
    if arch in _TRAINING_ONLY:
        _need(cfg_path, weights, ("W_enc", "W_dec", "b_enc", "b_dec", "topk_threshold"), f"{arch} checkpoint")
        weights["threshold"] = np.full((cfg["d_sae"],), float(np.asarray(weights.pop("topk_threshold")).reshape(-1)[0]),
                                       np.float32)
        kind, architecture, k = dl.ACTIVATIONS[_TRAINING_ONLY[arch]], dl.ARCHITECTURES["sae"], int(cfg.get("k") or 1)
        if arch == "matryoshka_batchtopk":
            widths = [int(w) for w in cfg.get("matryoshka_widths") or []]
            extra["matryoshka_widths"] = tuple(w for w in widths if w < cfg["d_sae"]) + (cfg["d_sae"],)
    else:
        pair = dl.from_saelens_architecture(arch)
        if pair is None:
            known = sorted({n for ar in dl.ARCHITECTURES.values() for a in dl.ACTIVATIONS.values() if a.saelens_native
                            for n in [dl.saelens_name(a, ar)] if n} | set(_TRAINING_ONLY))
            raise ModelFileError(f"{cfg_path}: architecture {arch!r} not supported; expected one of {known}")
        kind, architecture = pair
        if kind.saelens_k:
            k = int(cfg.get("k") or 1)
    if "log_threshold" in weights:  # JumpReLU checkpoints of SAELens < 6.5
        weights["threshold"] = np.exp(weights.pop("log_threshold"))
    if "scaling_factor" in weights:  # SAELens < 4: f * scaling_factor is what the decoder reads
        scale = weights.pop("scaling_factor")
        weights["W_dec"] = weights.get("W_dec", np.zeros(0)) * scale[:, None]
    if "finetuning_scaling_factor" in weights:
        weights["W_dec"] = weights["W_dec"] * weights.pop("finetuning_scaling_factor")[:, None]
    need = ("W_enc", "W_dec", "b_dec", *kind.feature_params, *(("W_skip",) if architecture.skip else ()))
    _need(cfg_path, weights, need, f"{arch} dictionary")
    d_out = int(cfg.get("d_out") or cfg["d_in"]) if architecture.reads_target else cfg["d_in"]
    want = {"W_enc": (cfg["d_in"], cfg["d_sae"]), "W_dec": (cfg["d_sae"], d_out), "b_dec": (d_out,),
            **{n: (cfg["d_sae"],) for n in kind.feature_params}, "W_skip": (d_out, cfg["d_in"])}
    for name in need:
        if weights[name].shape != want[name]:
            raise ModelFileError(f"{w_path}: {name} has shape {weights[name].shape}, cfg.json (d_in={cfg['d_in']}, "
                                 f"d_sae={cfg['d_sae']}, d_out={d_out}) wants {want[name]}")
    if cfg.get("rescale_acts_by_decoder_norm"):  # topk kinds: fold the decoder norms into the encoder
        n = np.linalg.norm(weights["W_dec"], axis=1)
        weights["W_enc"], weights["b_enc"] = weights["W_enc"] * n, weights["b_enc"] * n
        weights["W_dec"] = weights["W_dec"] / n[:, None]
    if architecture.reads_target and cfg.get("apply_b_dec_to_input"):
        raise ModelFileError(f"{cfg_path}: apply_b_dec_to_input is true for a transcoder (SAELens refuses it too)")
    spec = dl.DictionarySpec(activation=kind.name, d_in=cfg["d_in"], d_sae=cfg["d_sae"], k=k,
                             architecture=architecture.name, d_out=d_out if architecture.reads_target else None,
                             row_norm=SAELENS_ROW_NORMS.get(norm, "none"), **extra)
    params = {name: jnp.asarray(weights[name]) for name in need} | {"norm_scale": jnp.ones((), jnp.float32)}
    if architecture.reads_target:  # no input shift, no scales: the weights are in raw units
        params |= {"b_in": jnp.zeros((spec.d_in,), jnp.float32), architecture.target_scale: jnp.ones((), jnp.float32)}
    elif not cfg.get("apply_b_dec_to_input", True):
        # Our encoder always subtracts b_dec; fold it back out of the encoder bias instead.
        params = kind.fold_input_shift(params, -params["b_dec"])
    return spec, params, cfg
