"""Small builders shared by the tests."""

from __future__ import annotations

import os

import numpy as np

from jaxinterp.config import Config, config_from_dict


def tiny_config(tmp_path, **sections) -> Config:
    """A fast synthetic config; `sections` override nested keys, e.g. dictionary={"activation": "relu"}."""
    raw = {
        "data": {"source": "synthetic", "synthetic": {"n_features": 64, "d_in": 16, "p_active": 0.05}},
        "dictionary": {"activation": "topk", "d_sae": 64, "k": 4, "dead_tokens": 4096},
        "train": {"tokens": 256 * 40, "batch_size": 256, "lr": 1e-3, "lr_warmup_steps": 5, "init_batches": 1},
        "output": {"dir": str(tmp_path / "run"), "log_every": 10, "checkpoint_every": 10, "eval_tokens": 1024,
                   "progress": False},
    }
    for section, values in sections.items():
        node = raw.setdefault(section, {})
        for k, v in values.items():
            if isinstance(v, dict):
                node.setdefault(k, {}).update(v)
            else:
                node[k] = v
    return config_from_dict(raw)


def subprocess_env() -> dict:
    """Environment for `launch/*.py` subprocesses: CPU, and the launch scripts' own device count
    (XLA_FLAGS from the test process dropped), so interrupted and uninterrupted runs match."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def write_tiny_gguf(path, *, d_model: int = 32, n_layers: int = 2, n_heads: int = 2, d_ff: int = 64,
                    seed: int = 0) -> str:
    """A random llama-architecture GGUF with a byte-level tokenizer (BOS, EOS and the 256 byte symbols,
    no merges), loadable by `load_model(path)`: a stand-in language model that loads and runs in ~1 s."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<s>", "</s>", *alphabet]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(256)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * len(alphabet))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def dense(name: str, n_out: int, n_in: int) -> None:  # stored [out, in], as GGUF does
        w.add_tensor(name, (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32))

    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), d_model)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(d_model, np.float32))
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d_model, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d_model, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            dense(p + name + ".weight", d_model, d_model)
        dense(p + "ffn_gate.weight", d_ff, d_model)
        dense(p + "ffn_up.weight", d_ff, d_model)
        dense(p + "ffn_down.weight", d_model, d_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def write_corpus(directory, n_docs: int = 5, words_per_doc: int = 200, seed: int = 0) -> str:
    """A folder of `n_docs` .txt files of random words (a corpus for `data.corpus`)."""
    import random
    from pathlib import Path

    words = "the quick brown fox jumps over a lazy dog while cats sit on mats and birds sing".split()
    rnd = random.Random(seed)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (d / f"doc{i}.txt").write_text(" ".join(rnd.choice(words) for _ in range(words_per_doc)))
    return str(d)


def _tiny_decoders():
    from jaxinterp.models import DecoderConfig

    return {
        "llama": DecoderConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                               eos_id=1, pad_id=0),
        "gemma-like": DecoderConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                                    activation="gelu_tanh", post_norms=True, embed_scale=32**0.5, attn_softcap=5.0,
                                    final_softcap=4.0, windows=(3, None, 3), eos_id=1, pad_id=0),
        "gpt2-like": DecoderConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=64,
                                   norm="layer", positions="learned", max_positions=64, qkv_bias=True, out_bias=True,
                                   mlp="plain", activation="gelu_tanh", eos_id=1),
    }


TINY_DECODERS = _tiny_decoders()
"""Small decoders of three families for generation and steering tests."""


def tiny_model(cfg, seed: int = 0):
    """A Decoder with random weights (norm weights near 1)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxinterp.models import Decoder
    from jaxinterp.models.decoder import param_names

    model = Decoder(cfg)
    rng = np.random.default_rng(seed)
    for name, p in param_names(model):
        shape = p[...].shape
        base = 1.0 if name.endswith("norm.weight") or name.endswith("norm_weight") else 0.0
        p[...] = jnp.asarray(base + rng.normal(0, 0.3 if base == 0 else 0.1, shape), jnp.float32)
    return model


def batch_topk_reference(r: np.ndarray, k: int, cap: int | None) -> tuple[np.ndarray, float]:
    """BatchTopK of non-negative pre-activations r [B, F]: the k x B largest entries, chosen among
    each row's top `cap` (None: every entry). Returns (activations, threshold)."""
    cand = r if cap is None else np.take_along_axis(r, np.argsort(-r, -1)[:, :cap], -1)
    kth = np.sort(cand.ravel())[-k * r.shape[0]]
    keep = r >= kth
    if cap is not None:
        rank = np.argsort(np.argsort(-r, -1), -1)
        keep &= rank < cap
    return np.where(keep, r, 0.0), kth


def chromium_or_skip() -> str:
    """Debian's chromium for the page tests: skipped where it is missing, a failure on CI (which
    installs it)."""
    import os
    import shutil

    import pytest

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_GLOO = __import__("re").compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected "
                                 r"peer ranks is : \d+")


def drop_gloo(text: str) -> str:
    """A multi-process CPU run's stdout without gloo's connection lines, which its C++ side writes to
    the same stream at any moment (mid-line when the processes are slow)."""
    text = _GLOO.sub("\n", text)
    return "\n".join(ln for ln in text.splitlines() if ln.strip() and not ln.startswith("[Gloo]")
                     and "peer ranks" not in ln)


def unit_row_dictionary(d_in: int = 32, d_sae: int = 64, seed: int = 0):
    """(spec, params) of a ReLU SAE whose encoder is its decoder's transpose (unit rows) and whose
    encoder bias is -0.1: steering a feature moves its pre-activation by the amount added."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinterp.dictionaries import sae as dl

    spec = dl.DictionarySpec(activation="relu", d_in=d_in, d_sae=d_sae, k=4)
    params = dict(dl.init(jax.random.key(seed), spec))
    w = np.random.default_rng(seed).normal(size=(d_sae, d_in)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    params |= {"W_dec": jnp.asarray(w), "W_enc": jnp.asarray(w.T), "b_dec": jnp.zeros(d_in), "b_enc": jnp.full((d_sae,), -0.1)}
    return spec, params
