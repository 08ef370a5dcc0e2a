"""Hugging Face checkpoint directories: config.json + *.safetensors (with or without an index).

Llama-family architectures (`LlamaForCausalLM`, and Qwen2/Mistral-style checkpoints without biases)
load into `jaxinterp.models.llama.Llama` with the HF rotary layout (`half`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxinterp.models.llama import Llama, LlamaConfig, load_weights

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")


class CheckpointError(ValueError):
    """An unreadable or unsupported checkpoint; the message names the file and the fix."""


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; an HF checkpoint directory holds config.json and *.safetensors")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from None


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors in {directory}; save the model with safe_serialization=True")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in the index but missing; copy the whole checkpoint")
        try:
            tensors |= load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it") from None
    return tensors


def llama_config(hf: dict) -> LlamaConfig:
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise CheckpointError(f"architecture {arch!r} is not supported yet; supported: {', '.join(SUPPORTED)}")
    n_heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_layout="half",
        bos_id=hf.get("bos_token_id"),
        eos_id=hf.get("eos_token_id") if not isinstance(hf.get("eos_token_id"), list) else hf["eos_token_id"][0],
        pad_id=hf.get("pad_token_id"),
    )


def llama_weights(t: dict[str, np.ndarray], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """HF tensor names ([out, in] linears) -> our names ([in, out])."""
    w = {"embed": t["model.embed_tokens.weight"], "final_norm": t["model.norm.weight"]}
    if not cfg.tie_embeddings:
        w["lm_head"] = t["lm_head.weight"].T
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        w |= {
            f"layers.{i}.attn_norm": t[p + "input_layernorm.weight"],
            f"layers.{i}.wq": t[p + "self_attn.q_proj.weight"].T,
            f"layers.{i}.wk": t[p + "self_attn.k_proj.weight"].T,
            f"layers.{i}.wv": t[p + "self_attn.v_proj.weight"].T,
            f"layers.{i}.wo": t[p + "self_attn.o_proj.weight"].T,
            f"layers.{i}.mlp_norm": t[p + "post_attention_layernorm.weight"],
            f"layers.{i}.w_gate": t[p + "mlp.gate_proj.weight"].T,
            f"layers.{i}.w_up": t[p + "mlp.up_proj.weight"].T,
            f"layers.{i}.w_down": t[p + "mlp.down_proj.weight"].T,
        }
    return w


def load_hf(directory: str | Path, *, dtype=jnp.float32) -> Llama:
    """A Llama-family model from an HF checkpoint directory."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory; pass an HF checkpoint directory (config.json + *.safetensors)")
    cfg = llama_config(_read_config(d))
    tensors = _read_tensors(d)
    try:
        weights = llama_weights(tensors, cfg)
    except KeyError as e:
        raise CheckpointError(f"{d}: tensor {e.args[0]!r} missing; the checkpoint does not match its config.json") from None
    return load_weights(Llama(cfg, dtype=dtype), weights)
