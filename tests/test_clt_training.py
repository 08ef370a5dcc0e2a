"""EleutherAI clt-training's cross-layer transcoders load with that repository's numerics.

`tests/data/clt_training/` holds a tiny CLT written by its own code (4 layers of SmolLM2-like
hookpoints `layers.N.mlp`, span 2, skips, `normalize_io`, the post-encoder with scales) and the
outputs its `CrossLayerRunner` computed; `make.py` there regenerates them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import jaxinterp
from jaxinterp.interop import formats

DATA = Path(__file__).parent / "data" / "clt_training"


def test_clt_training_run_loads_with_its_runner_numerics():
    ref = np.load(DATA / "reference.npz")
    d = jaxinterp.load_dictionary(DATA / "run")
    assert isinstance(d, jaxinterp.CLTDictionary) and formats.detect(DATA / "run") == "clt-training"
    spec = d.spec
    assert (spec.n_layers, spec.d_model, spec.d_sae, spec.k, spec.span, spec.skip, spec.input_point, spec.post_encoder) \
        == (4, 8, 16, 3, 2, True, "mlp_in", True)
    assert d.model == "HuggingFaceTB/SmolLM2-135M"
    x = np.moveaxis(ref["x"], 0, 1)  # [rows, layers, d]
    acts, y = np.asarray(d.encode(x)), np.asarray(d.reconstruct(x))
    np.testing.assert_allclose(acts, np.moveaxis(ref["acts"], 0, 1), rtol=1e-5, atol=1e-5 * np.abs(ref["acts"]).max())
    np.testing.assert_allclose(y, np.moveaxis(ref["y"], 0, 1), rtol=1e-5, atol=1e-5 * np.abs(ref["y"]).max())
    with pytest.raises(jaxinterp.DictionaryError, match="per-target offsets"):
        d.check_model(8, 4)


def test_clt_training_without_offsets_is_a_plain_clt_and_saves(tmp_path):
    """Zero offsets: an ordinary CLT (the replacement model takes it); saved and reloaded as ours."""
    from safetensors.numpy import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(DATA / "run", run)
    for folder in run.glob("layers.*"):
        t = load_file(str(folder / "sae.safetensors"))
        save_file({k: (np.zeros_like(v) if k.startswith("post_encs.") else v) for k, v in t.items()},
                  str(folder / "sae.safetensors"))
    d = jaxinterp.load_dictionary(run)
    assert not d.spec.post_encoder
    d.check_model(8, 4)
    from jaxinterp.dictionaries import save

    save(tmp_path / "ours", d)
    x = np.random.default_rng(0).normal(size=(5, 4, 8)).astype(np.float32)
    np.testing.assert_allclose(jaxinterp.load_dictionary(tmp_path / "ours").reconstruct(x), d.reconstruct(x), rtol=1e-6)


def test_clt_training_modes_it_cannot_express_are_refused(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(DATA / "run", run)
    with pytest.raises(jaxinterp.DictionaryError, match="one source layer of a clt-training"):
        jaxinterp.load_dictionary(run / "layers.1.mlp")
    cfg_path = run / "layers.2.mlp" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(cfg | {"coalesce_topk": "none"}))
    with pytest.raises(jaxinterp.DictionaryError, match="coalesce_topk='none'; .*coalesce_topk='concat'"):
        jaxinterp.load_dictionary(run)
    cfg_path.write_text(json.dumps(cfg))
    (run / "layers.3.mlp" / "sae.safetensors").unlink()
    with pytest.raises(jaxinterp.DictionaryError, match="layers.3.mlp/sae.safetensors is not readable"):
        jaxinterp.load_dictionary(run)
