"""The local dictionary index: names for folders on disk, usable wherever a dictionary path is."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest
from helpers import subprocess_env, write_tiny_gguf

import jaxinterp
from jaxinterp import dictionaries as dl
from jaxinterp.interop.index import DictionaryIndex, DictionaryIndexError
from jaxinterp.steering import DictionaryRegistry


def _saelens_folder(tmp_path, d_in=32, site="blocks.1.resid_post"):
    from jaxinterp.interop.convert import write

    spec = dl.DictionarySpec("relu", d_in, 64)
    params = dl.init(jax.random.key(0), spec)
    return write(jaxinterp.Dictionary(spec, params, site=site, model="tiny"), tmp_path / "release" / "sae", "saelens")


def test_names_resolve_wherever_a_path_does(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINTERP_DICTIONARIES", str(tmp_path / "index.yaml"))
    folder = _saelens_folder(tmp_path)
    index = DictionaryIndex()
    entry = index.add("tiny-res-1", folder, model="tiny-llama")
    assert entry == {"path": str(folder.absolute()), "format": "saelens", "model": "tiny-llama", "kind": "relu sae",
                     "d_sae": 64, "site": "blocks.1.resid_post", "target_site": None}
    assert DictionaryIndex(tmp_path / "index.yaml").names() == ["tiny-res-1"]
    d = jaxinterp.load_dictionary("tiny-res-1")
    assert (d.site, d.model, d.d_sae) == ("blocks.1.resid_post", "tiny-llama", 64)
    reg = DictionaryRegistry().add("tiny-res-1")  # steering's registry by name
    assert list(reg.entries) == ["blocks.1.resid_post"]
    with pytest.raises(jaxinterp.DictionaryError, match=r"not found; .* or a name of the dictionary index .*tiny-res-1"):
        jaxinterp.load_dictionary("tiny-res-2")
    with pytest.raises(jaxinterp.DictionaryError, match="matches no dictionary format"):
        index.add("empty", tmp_path)
    index.remove("tiny-res-1")
    assert index.names() == []
    with pytest.raises(DictionaryIndexError, match="no dictionary named 'tiny-res-1'"):
        index.get("tiny-res-1")
    (tmp_path / "index.yaml").write_text("a: [unclosed")
    with pytest.raises(DictionaryIndexError, match="not readable YAML"):
        index.names()


def test_generate_and_the_index_cli_take_names(tmp_path):
    env = subprocess_env() | {"JAXINTERP_DICTIONARIES": str(tmp_path / "index.json")}
    folder = _saelens_folder(tmp_path)
    r = subprocess.run([sys.executable, "launch/dictionaries.py", "add", "tiny-res-1", str(folder)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "saelens relu sae (d_sae 64) at blocks.1.resid_post" in r.stdout, r.stderr
    assert json.loads((tmp_path / "index.json").read_text())["tiny-res-1"]["format"] == "saelens"
    listed = subprocess.run([sys.executable, "launch/dictionaries.py", "list", "--json"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert list(json.loads(listed.stdout)) == ["tiny-res-1"]
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    cmd = [sys.executable, "launch/generate.py", "--model", gguf_path, "--prompt", "hello", "--dictionary", "tiny-res-1",
           "--steer", "blocks.1.resid_post:feature=3:add=300", "--max-new-tokens", "6", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.splitlines()[0])
    assert row["steered"] != row["unsteered"]
    bad = subprocess.run(cmd[:-7] + ["--dictionary", "no-such-name", "--steer", "blocks.1.resid_post:feature=3:add=3"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "tiny-res-1" in bad.stderr
