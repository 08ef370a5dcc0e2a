"""Hugging Face checkpoint directories: config.json + *.safetensors (with or without an index).

Architectures: Llama (`LlamaForCausalLM`, `MistralForCausalLM`; Llama 3's `llama3` RoPE scaling),
Qwen2 (`Qwen2ForCausalLM`), Qwen3 (`Qwen3ForCausalLM`), Gemma 2 (`Gemma2ForCausalLM`), Gemma 3
(`Gemma3ForCausalLM`) and GPT-2 (`GPT2LMHeadModel`), all loaded into
`jaxinterp.models.decoder.Decoder` with the HF rotary layout (`half`). Linear weights are transposed
to [in, out]; GPT-2's Conv1D weights already are; its fused c_attn is split into q, k, v; Gemma's
RMSNorm weights w are stored as 1 + w (Gemma normalises by (1 + w)).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxinterp.errors import JaxinterpError
from jaxinterp.models import decoder
from jaxinterp.models.decoder import Decoder, DecoderConfig, load_weights


class CheckpointError(JaxinterpError):
    """An unreadable or unsupported checkpoint; the message names the file and the fix."""


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; an HF checkpoint directory holds config.json and *.safetensors")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from None


GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    "tie_word_embeddings": True, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
}
"""Gemma 3's text settings where a multimodal checkpoint's `text_config` leaves them out (the hub's
configs hold only what differs from these, transformers' Gemma3TextConfig defaults)."""

CONDITIONAL = {"Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM", GEMMA3_TEXT_DEFAULTS)}
"""Multimodal checkpoints whose language model loads alone: architecture -> (the text model's
architecture, defaults of its text_config)."""


def text_config(hf: dict) -> dict:
    """The language model's config of a checkpoint: itself, or a multimodal one's `text_config`
    completed with its defaults (the vision tower is not loaded)."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in CONDITIONAL:
        return hf
    text_arch, defaults = CONDITIONAL[arch]
    given = hf.get("text_config") or {}
    out = defaults | {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
                      if k in hf} | given
    if "rope_parameters" in given:  # transformers 5 names each layer type's RoPE itself
        out.pop("rope_local_base_freq", None)
    return out | {"architectures": [text_arch]}


def text_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A multimodal checkpoint's language-model tensors under a text model's names
    (`language_model.model.*` and `model.language_model.*` -> `model.*`, `language_model.lm_head`
    -> `lm_head`); other checkpoints' as they are."""
    prefixes = (("language_model.model.", "model."), ("model.language_model.", "model."),
                ("language_model.lm_head.", "lm_head."))
    if not any(k.startswith(p) for k in tensors for p, _ in prefixes):
        return tensors
    out = {}
    for k, v in tensors.items():
        for old, new in prefixes:
            if k.startswith(old):
                out[new + k[len(old):]] = v
    return out


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


def _first(x):
    return x[0] if isinstance(x, list) else x


def _windows(hf: dict) -> tuple[int | None, ...] | None:
    types, window = hf.get("layer_types"), hf.get("sliding_window")
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
    if not types and pattern and window is not None:  # Gemma 3 configs before layer_types: every pattern-th is full
        types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention"
                 for i in range(hf["num_hidden_layers"])]
    if not types or window is None or "sliding_attention" not in types:
        return None
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


ROPE_TYPES = ("default", "linear", "llama3")
"""The RoPE variants read from a config's `rope_parameters` (transformers 5) or `rope_scaling`."""


def _rope(hf: dict, head_dim: int) -> dict:
    """rope_theta and rope_freq_factors of a config: `rope_parameters` (transformers 5; per layer
    type for Gemma 3) or the older `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`)."""
    nested = hf.get("rope_parameters") or {}
    if "full_attention" in nested or "sliding_attention" in nested:  # per layer type
        full = _rope_one(nested.get("full_attention") or {}, None, head_dim)
        local = _rope_one(nested.get("sliding_attention") or {}, None, head_dim)
        out = dict(rope_theta=full[0], rope_freq_factors=full[1])
        if local != full:
            out |= dict(rope_local_theta=local[0], rope_local_freq_factors=local[1])
        return {k: v for k, v in out.items() if v is not None}
    theta, factors = _rope_one({**(hf.get("rope_scaling") or {}), **nested}, hf.get("rope_theta"), head_dim)
    out = dict(rope_theta=theta, rope_freq_factors=factors)
    if hf.get("rope_local_base_freq") is not None:  # Gemma 3 before transformers 5: local layers unscaled
        out |= dict(rope_local_theta=float(hf["rope_local_base_freq"]))
    return {k: v for k, v in out.items() if v is not None}


def _rope_one(params: dict, theta: float | None, head_dim: int) -> tuple[float, tuple[float, ...] | None]:
    theta = float(params.get("rope_theta") or theta or 10000.0)
    scaling = params.get("rope_type") or params.get("type") or "default"
    if scaling == "default":
        return theta, None
    if scaling == "linear":
        return theta, (float(params["factor"]),) * (head_dim // 2)
    if scaling == "llama3":
        try:
            factors = decoder.llama3_freq_factors(
                head_dim, theta, factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_positions=int(params["original_max_position_embeddings"]))
        except KeyError as e:
            raise CheckpointError(f"llama3 RoPE scaling without {e.args[0]!r} in {params}; the config is incomplete; "
                                  "re-save it with transformers") from None
        return theta, factors
    raise CheckpointError(f"RoPE type {scaling!r} is not supported (supported: {', '.join(ROPE_TYPES)}); use a "
                          "checkpoint with one of those")


def _common(hf: dict) -> dict:
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim, d_ff=hf["intermediate_size"], **_rope(hf, head_dim),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), bos_id=_first(hf.get("bos_token_id")),
        eos_id=_first(hf.get("eos_token_id")), pad_id=hf.get("pad_token_id"), windows=_windows(hf),
    )


def _llama(hf: dict) -> DecoderConfig:
    if hf.get("mlp_bias") or hf.get("attention_bias"):
        raise CheckpointError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    return DecoderConfig(**_common(hf), family="llama", tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _qwen2(hf: dict) -> DecoderConfig:
    return DecoderConfig(**_common(hf), family="qwen2", qkv_bias=True,
                         tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _qwen3(hf: dict) -> DecoderConfig:
    return DecoderConfig(**_common(hf), family="qwen3", qk_norm=True, qkv_bias=bool(hf.get("attention_bias", False)),
                         tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _gemma2(hf: dict) -> DecoderConfig:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu"):
        raise CheckpointError(f"Gemma 2 activation {act!r} is not supported; expected gelu_pytorch_tanh")
    return DecoderConfig(
        **_common(hf), family="gemma2", activation="gelu" if act == "gelu" else "gelu_tanh", post_norms=True,
        embed_scale=float(hf["hidden_size"]) ** 0.5, attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _gemma3(hf: dict) -> DecoderConfig:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise CheckpointError(f"Gemma 3 activation {act!r} is not supported; expected gelu_pytorch_tanh")
    return DecoderConfig(
        **_common(hf), family="gemma3", activation="gelu_tanh", post_norms=True, qk_norm=True,
        embed_scale=float(hf["hidden_size"]) ** 0.5, attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _gpt2(hf: dict) -> DecoderConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise CheckpointError(f"GPT-2 activation {act!r} is not supported; expected gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise CheckpointError("GPT-2 checkpoints with non-standard attention scaling are not supported")
    d, h = hf["n_embd"], hf["n_head"]
    return DecoderConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=h, n_kv_heads=h, head_dim=d // h,
        d_ff=hf.get("n_inner") or 4 * d, family="gpt2", norm="layer", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        positions="learned", max_positions=hf["n_positions"], qkv_bias=True, out_bias=True, mlp="plain",
        activation="gelu" if act == "gelu" else "gelu_tanh", tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"), pad_id=hf.get("pad_token_id"),
    )


def _rope_family_weights(t: dict[str, np.ndarray], cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """Llama / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 tensor names ([out, in] linears) -> ours ([in, out])."""
    norm = (lambda w: w.astype(np.float32) + 1.0) if cfg.family in ("gemma2", "gemma3") else (lambda w: w)
    w = {"embed": t["model.embed_tokens.weight"], "final_norm.weight": norm(t["model.norm.weight"])}
    if not cfg.tie_embeddings:
        w["lm_head"] = t["lm_head.weight"].T
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        w |= {
            o + "wq": t[p + "self_attn.q_proj.weight"].T,
            o + "wk": t[p + "self_attn.k_proj.weight"].T,
            o + "wv": t[p + "self_attn.v_proj.weight"].T,
            o + "wo": t[p + "self_attn.o_proj.weight"].T,
            o + "w_gate": t[p + "mlp.gate_proj.weight"].T,
            o + "w_up": t[p + "mlp.up_proj.weight"].T,
            o + "w_down": t[p + "mlp.down_proj.weight"].T,
            o + "attn_norm.weight": norm(t[p + "input_layernorm.weight"]),
        }
        if cfg.qkv_bias:
            w |= {o + "bq": t[p + "self_attn.q_proj.bias"], o + "bk": t[p + "self_attn.k_proj.bias"],
                  o + "bv": t[p + "self_attn.v_proj.bias"]}
        if cfg.qk_norm:
            w |= {o + "q_norm": norm(t[p + "self_attn.q_norm.weight"]),
                  o + "k_norm": norm(t[p + "self_attn.k_norm.weight"])}
        if cfg.post_norms:
            w |= {o + "post_attn_norm.weight": norm(t[p + "post_attention_layernorm.weight"]),
                  o + "mlp_norm.weight": norm(t[p + "pre_feedforward_layernorm.weight"]),
                  o + "post_mlp_norm.weight": norm(t[p + "post_feedforward_layernorm.weight"])}
        else:
            w[o + "mlp_norm.weight"] = t[p + "post_attention_layernorm.weight"]
    return w


def _gpt2_weights(t: dict[str, np.ndarray], cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """GPT-2 names (Conv1D weights already [in, out]; fused c_attn) -> ours."""
    pre = "transformer." if "transformer.wte.weight" in t else ""
    d = cfg.d_model
    w = {"embed": t[pre + "wte.weight"], "pos_embed": t[pre + "wpe.weight"],
         "final_norm.weight": t[pre + "ln_f.weight"], "final_norm.bias": t[pre + "ln_f.bias"]}
    if not cfg.tie_embeddings:
        w["lm_head"] = t["lm_head.weight"].T
    for i in range(cfg.n_layers):
        p, o = f"{pre}h.{i}.", f"layers.{i}."
        qkv_w, qkv_b = t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"]
        w |= {
            o + "wq": qkv_w[:, :d], o + "wk": qkv_w[:, d : 2 * d], o + "wv": qkv_w[:, 2 * d :],
            o + "bq": qkv_b[:d], o + "bk": qkv_b[d : 2 * d], o + "bv": qkv_b[2 * d :],
            o + "wo": t[p + "attn.c_proj.weight"], o + "bo": t[p + "attn.c_proj.bias"],
            o + "w_up": t[p + "mlp.c_fc.weight"], o + "b_up": t[p + "mlp.c_fc.bias"],
            o + "w_down": t[p + "mlp.c_proj.weight"], o + "b_down": t[p + "mlp.c_proj.bias"],
            o + "attn_norm.weight": t[p + "ln_1.weight"], o + "attn_norm.bias": t[p + "ln_1.bias"],
            o + "mlp_norm.weight": t[p + "ln_2.weight"], o + "mlp_norm.bias": t[p + "ln_2.bias"],
        }
    return w


ARCHITECTURES = {
    "LlamaForCausalLM": (_llama, _rope_family_weights),
    "MistralForCausalLM": (_llama, _rope_family_weights),
    "Qwen2ForCausalLM": (_qwen2, _rope_family_weights),
    "Qwen3ForCausalLM": (_qwen3, _rope_family_weights),
    "Gemma2ForCausalLM": (_gemma2, _rope_family_weights),
    "Gemma3ForCausalLM": (_gemma3, _rope_family_weights),
    "GPT2LMHeadModel": (_gpt2, _gpt2_weights),
}


def hf_config(hf: dict) -> DecoderConfig:
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch][0](hf)
    except KeyError as e:
        raise CheckpointError(f"config.json lacks {e.args[0]!r}, which {arch} needs; re-save the checkpoint") from None


def load_hf_tokenizer(directory: str | Path, cfg: DecoderConfig):
    """The checkpoint's `tokenizer.json` as a `Tokenizer` (BOS/EOS from config.json), or None."""
    from tokenizers import Tokenizer as HFTokenizer

    from jaxinterp.models.gguf import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package raises a bare Exception on bad JSON
        raise CheckpointError(f"{path} is not a readable tokenizer.json ({e}); re-save the tokenizer") from None
    bos = cfg.bos_id if cfg.bos_id is not None else cfg.eos_id
    out = Tokenizer(tok, bos_id=bos, eos_id=cfg.eos_id, pad_id=cfg.pad_id, vocab_size=tok.get_vocab_size(),
                    post_process=True, chat_template=_chat_template(Path(directory)))
    out.declared_special = _declared_special(Path(directory), tok)
    return out


def _chat_template(directory: Path) -> str | None:
    """The checkpoint's chat template: tokenizer_config.json's `chat_template` (a string, or a list of
    named templates: the `default` one), or a chat_template.jinja file beside it."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    try:
        t = json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def _declared_special(directory: Path, tok) -> dict[str, int | None]:
    """{bos, pad, eos: id or None} as the tokenizer's own files name them (tokenizer_config.json,
    special_tokens_map.json), which is what transformers' tokenizer reports."""
    names: dict = {}
    for f in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            names |= {k: v for k, v in json.loads((directory / f).read_text()).items() if k.endswith("_token") and v}
        except (OSError, json.JSONDecodeError):
            continue
    out = {}
    for key in ("bos", "pad", "eos"):
        v = names.get(f"{key}_token")
        v = v.get("content") if isinstance(v, dict) else v
        out[key] = tok.token_to_id(v) if isinstance(v, str) else None
    return out


def load_hf(directory: str | Path, *, dtype=jnp.float32) -> Decoder:
    """A model from an HF checkpoint directory."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory; pass an HF checkpoint directory (config.json + *.safetensors)")
    hf = text_config(_read_config(d))
    cfg = hf_config(hf)
    tensors = text_tensors(_read_tensors(d))
    try:
        weights = ARCHITECTURES[hf["architectures"][0]][1](tensors, cfg)
    except KeyError as e:
        raise CheckpointError(f"{d}: tensor {e.args[0]!r} missing; the checkpoint does not match its config.json") from None
    try:
        return load_weights(Decoder(cfg, dtype=dtype), weights)
    except ValueError as e:
        raise CheckpointError(f"{d}: {e}") from None
