"""Steering vectors in llama.cpp's control-vector GGUF layout (as repeng writes it) and in plain
`{site: vector}` files: round trips, the names llama.cpp expects, and the same steering here."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402
from helpers import write_tiny_gguf  # noqa: E402

from jaxinterp.generation import generate  # noqa: E402
from jaxinterp.models import Plan, forward, load_model  # noqa: E402
from jaxinterp.steering import control_vectors as cv  # noqa: E402
from jaxinterp.steering.spec import SteeringError  # noqa: E402


def _vectors(d: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"blocks.1.resid_post": rng.normal(size=d).astype(np.float32),
            "blocks.3.resid_post": rng.normal(size=d).astype(np.float32)}


def test_a_control_vector_round_trips_and_names_its_layers_as_llama_cpp_expects(tmp_path):
    vectors = _vectors()
    path = cv.write_gguf(tmp_path / "cv.gguf", vectors, model_hint="llama")
    reader = gguf.GGUFReader(str(path), "r")  # the gguf package's own reader
    field = lambda key: reader.fields[key].parts[reader.fields[key].data[0]]  # noqa: E731
    assert bytes(field("general.architecture")).decode() == "controlvector"
    assert bytes(field("controlvector.model_hint")).decode() == "llama"
    assert int(field("controlvector.layer_count")[0]) == 2
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.3"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [32] for t in reader.tensors)
    back = cv.read_gguf(path)
    assert back.keys() == vectors.keys()
    for site in vectors:
        np.testing.assert_array_equal(back[site], vectors[site])
    for suffix in (".safetensors", ".npz"):
        got = cv.read_vectors(cv.write_vectors(tmp_path / f"v{suffix}", vectors))
        assert all(np.array_equal(got[s], vectors[s]) for s in vectors)


def test_what_llama_cpp_cannot_hold_is_refused_in_one_line(tmp_path):
    v = np.ones(8, np.float32)
    with pytest.raises(SteeringError, match="no control vector for block 0"):
        cv.write_gguf(tmp_path / "a.gguf", {"blocks.0.resid_post": v})
    with pytest.raises(SteeringError, match="not blocks.K.resid_post"):
        cv.write_gguf(tmp_path / "a.gguf", {"blocks.2.mlp_out": v})
    with pytest.raises(SteeringError, match="share one width"):
        cv.write_gguf(tmp_path / "a.gguf", {"blocks.1.resid_post": v, "blocks.2.resid_post": np.ones(4)})
    write_tiny_gguf(tmp_path / "model.gguf")
    with pytest.raises(SteeringError, match="architecture 'llama', not a control vector"):
        cv.read_gguf(tmp_path / "model.gguf")
    with pytest.raises(SteeringError, match="write steering vectors as .gguf .llama.cpp control vector., .safetensors"):
        cv.write_vectors(tmp_path / "v.pt", {"blocks.1.resid_post": v})


def test_a_control_vector_steers_here_as_llama_cpp_applies_it(tmp_path):
    """direction.K is added to block K's output: the steered forward equals one whose blocks.K.resid_post
    edit adds the vector (scale S: S times it, llama.cpp's --control-vector-scaled)."""
    write_tiny_gguf(tmp_path / "model.gguf")
    model, tok = load_model(str(tmp_path / "model.gguf"))
    vectors = {"blocks.1.resid_post": np.random.default_rng(1).normal(size=32).astype(np.float32) * 3}
    loaded = cv.read_vectors(cv.write_gguf(tmp_path / "cv.gguf", vectors))
    prompt = tok.encode("the quick brown fox")
    out = generate(model, [prompt], max_new_tokens=4, steering=cv.steering(loaded, scale=2.0), return_logits=True)
    plain = generate(model, [prompt], max_new_tokens=4, return_logits=True)
    assert not np.allclose(out.logits, plain.logits)
    v = jnp.asarray(vectors["blocks.1.resid_post"])
    tokens = jnp.asarray([prompt + list(out.tokens[0][:3])])
    edit = Plan(edits=(("blocks.1.resid_post", lambda x, p, pos: x + 2.0 * p),))
    ref = forward(model, tokens, plan=edit, edit_params={"blocks.1.resid_post": v}).logits
    np.testing.assert_allclose(out.logits[0], np.asarray(ref)[0, len(prompt) - 1:], atol=1e-4)


@pytest.mark.slow  # slow: two generation processes; the steering itself is tested above
def test_the_cli_steers_with_a_control_vector_file_as_with_the_npy_vector(tmp_path):
    import json
    import subprocess
    import sys

    from helpers import subprocess_env

    from conftest import REPO

    write_tiny_gguf(tmp_path / "model.gguf")
    v = np.random.default_rng(2).normal(size=32).astype(np.float32) * 4
    np.save(tmp_path / "v.npy", v)
    cv.write_gguf(tmp_path / "cv.gguf", {"blocks.1.resid_post": v})

    def run(*steer: str) -> list[dict]:
        out = subprocess.run([sys.executable, "launch/generate.py", "--model", str(tmp_path / "model.gguf"), "--prompt",
                              "the quick brown", "--max-new-tokens", "6", "--json", *steer], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    by_gguf = run("--control-vector", f"{tmp_path / 'cv.gguf'}:2")
    by_npy = run("--steer", f"blocks.1.resid_post:vector={tmp_path / 'v.npy'}:scale=2")
    assert by_gguf == by_npy and by_gguf[0]["steered"] != by_gguf[0]["unsteered"]
