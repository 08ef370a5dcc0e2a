"""Dictionary artifacts: `dictionaries.save` / `load_dictionary`, what a run writes, what they refuse."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxinterp
from jaxinterp import dictionaries as dl
from jaxinterp.dictionaries import DictionaryError
from jaxinterp.errors import JaxinterpError
from helpers import subprocess_env


@pytest.mark.parametrize("activation,arch", [("batchtopk", "sae"), ("gated", "sae"), ("topk", "skip_transcoder")])
def test_saved_dictionary_loads_with_its_kind_sites_and_weights(tmp_path, activation, arch):
    spec = dl.DictionarySpec(activation, 8, 32, k=4, architecture=arch, d_out=6 if arch != "sae" else None)
    params = {k: v + 0.01 * i for i, (k, v) in enumerate(dl.init(jax.random.key(1), spec).items())}
    saved = dl.Dictionary(spec, params, site="blocks.3.mlp_in", target_site="blocks.3.mlp_out" if arch != "sae" else None,
                          model="m.gguf", metadata={"note": "x"})
    dl.save(tmp_path / "d", saved)
    d = jaxinterp.load_dictionary(tmp_path / "d")
    assert (d.spec, d.site, d.target_site, d.model, d.metadata) == (spec, saved.site, saved.target_site, "m.gguf",
                                                                      {"note": "x"})
    for k in params:
        np.testing.assert_array_equal(np.asarray(d.params[k]), np.asarray(params[k]), err_msg=k)
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    f = d.encode(x)
    assert f.shape == (2, 5, 32) and d.decode(f).shape == (2, 5, spec.d_out)
    np.testing.assert_allclose(d.reconstruct(x).reshape(10, -1), dl.reconstruct(spec, params, x.reshape(10, 8)),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(DictionaryError, match=r"expected an array \[..., 8\], got shape \(3, 7\)"):
        d.encode(np.zeros((3, 7)))


def test_artifact_errors_name_the_problem(tmp_path):
    with pytest.raises(DictionaryError, match="not found"):
        dl.load_dictionary(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictionaryError, match="matches no dictionary format .* jaxinterp: jaxinterp_dictionary.json"):
        dl.load_dictionary(tmp_path / "empty")
    spec = dl.DictionarySpec("topk", 8, 32, k=4)
    d = dl.Dictionary(spec, dl.init(jax.random.key(0), spec), site="blocks.1.resid_post")
    with pytest.raises(DictionaryError, match="has d_in=8, d_out=8, but model 'x' has width 16"):
        d.check_model(16, 4, model="model 'x'")
    with pytest.raises(DictionaryError, match="reads 'blocks.9.mlp_in', a site model 'x' .4 layers. does not have"):
        dl.Dictionary(spec, d.params, site="blocks.9.mlp_in").check_model(8, 4, model="model 'x'")
    assert issubclass(DictionaryError, JaxinterpError)


def test_a_run_writes_its_artifact_and_a_fresh_process_steers_with_it_as_with_the_run(tmp_path, repo_root):
    pytest.importorskip("gguf")
    from helpers import tiny_config, write_corpus, write_tiny_gguf

    from jaxinterp.train import train

    write_tiny_gguf(tmp_path / "tiny.gguf")
    write_corpus(tmp_path / "corpus")
    site = "blocks.1.resid_post"
    cfg = tiny_config(tmp_path, data={"source": "model", "model": str(tmp_path / "tiny.gguf"), "site": site,
                                      "corpus": str(tmp_path / "corpus"), "context_length": 16, "chunk_contexts": 8,
                                      "eval_fraction": 0.2},
                      train={"tokens": 64 * 20, "batch_size": 64}, output={"ce_eval_contexts": 4})
    train(cfg, log=lambda s: None)
    moved = tmp_path / "elsewhere" / "dict"
    shutil.copytree(tmp_path / "run" / "dictionary", moved)

    def steer(dictionary: str) -> list[dict]:
        proc = subprocess.run([sys.executable, "launch/generate.py", "--model", str(tmp_path / "tiny.gguf"),
                               "--prompt", "the quick brown", "--prompt", "a lazy", "--max-new-tokens", "8",
                               "--dictionary", dictionary, "--steer", f"{site}:feature=5:add=40", "--json"],
                              cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in proc.stdout.splitlines()]

    from_run = steer(str(tmp_path / "run"))
    shutil.rmtree(tmp_path / "run")  # the artifact needs nothing of the run
    from_artifact = steer(str(moved))
    assert from_artifact == from_run
    assert any(r["steered"] != r["unsteered"] for r in from_run)
