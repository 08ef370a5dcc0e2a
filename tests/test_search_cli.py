"""`launch/search.py` and `launch/caa.py --feature` on a tiny GGUF model and a saved dictionary: the
printed figures equal the library's, and bad input is one line naming the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf")

SITE = "blocks.1.resid_post"
PAIRS = [("thou art more lovely", "you are nicer"), ("wherefore art thou", "why are you"),
         ("hark, what light", "look, a light"), ("prithee, good sir", "please, sir"),
         ("methinks the lady", "I think the lady")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, dictionary directory, pairs file) for a random tiny model and a TopK dictionary."""
    import jax
    import jax.numpy as jnp
    from helpers import write_tiny_gguf

    from jaxinterp import dictionaries as dl

    d = tmp_path_factory.mktemp("search")
    gguf_path = write_tiny_gguf(d / "tiny.gguf")
    spec = dl.DictionarySpec("topk", 32, 48, k=4)
    params = dl.init(jax.random.key(1), spec) | {"b_enc": 0.3 * jax.random.normal(jax.random.key(2), (48,)),
                                                 "norm_scale": jnp.float32(0.5)}
    dl.save(d / "dict", dl.Dictionary(spec, params, site=SITE))
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in PAIRS))
    return gguf_path, str(d / "dict"), str(pairs)


def _run(repo_root, script, *args):
    from helpers import subprocess_env

    return subprocess.run([sys.executable, f"launch/{script}", *args], cwd=repo_root, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def _library(tiny):
    from jaxinterp.dictionaries import load_dictionary
    from jaxinterp.models import load_model

    model, tok = load_model(tiny[0])
    return model, tok, load_dictionary(tiny[1])


def test_search_contrast_and_fires_print_the_library_figures(tiny, repo_root):
    from jaxinterp.features import contrast, fires_here

    gguf_path, dictionary_dir, pairs = tiny
    out = _run(repo_root, "search.py", "contrast", "--dictionary", dictionary_dir, "--model", gguf_path,
               "--pairs", pairs, "--held-out", "2", "--k", "3", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    model, tok, dictionary = _library(tiny)
    train = PAIRS[:-2]  # the held-out pairs take no part in the search
    want = contrast(model, dictionary, [tok.encode(p) for p, _ in train], [tok.encode(n) for _, n in train], k=3)
    assert got["train_pairs"] == 3 and got["held_out_pairs"] == 2 and got["site"] == SITE
    assert [r["id"] for r in got["features"]] == want.ids.tolist()
    for key, col in (("effect_size", want.effect_size), ("mean_a", want.mean_a), ("mean_b", want.mean_b),
                     ("max_act", want.max_act)):
        np.testing.assert_allclose([r[key] for r in got["features"]], col, rtol=1e-4, atol=1e-5)
    assert got["features"][0]["effect_size"] > 0 and got["features"][0]["mean_a"] > got["features"][0]["mean_b"]
    amount = round(4 * float(want.max_act[0]), 1)
    assert f"--steer {SITE}:feature={want.ids[0]}:add={amount:g} " in got["generate"]

    out = _run(repo_root, "search.py", "fires", "--dictionary", dictionary_dir, "--model", gguf_path,
               "--prompt", "thou art", "--k", "2", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["tokens"]
    here = fires_here(model, dictionary, tok.encode("thou art"), k=2)
    assert [r["position"] for r in rows] == list(range(1, len(here.ids)))
    for r in rows:
        t = r["position"]
        assert [f["id"] for f in r["features"]] == [int(i) for i in here.ids[t] if i >= 0]
        np.testing.assert_allclose([f["value"] for f in r["features"]], here.values[t][here.ids[t] >= 0], rtol=1e-5)

    bad = _run(repo_root, "search.py", "contrast", "--dictionary", dictionary_dir, "--model", gguf_path,
               "--pairs", pairs, "--held-out", "5")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--held-out 5: need between 1 and 4" in lines[0], bad.stderr


def test_caa_feature_auto_steers_the_top_contrast_feature(tiny, repo_root):
    from jaxinterp.features import contrast
    from jaxinterp.steering import DictionaryRegistry
    from jaxinterp.steering.caa import feature_steer, style_shift

    gguf_path, dictionary_dir, pairs = tiny
    out = _run(repo_root, "caa.py", "--model", gguf_path, "--dictionary", dictionary_dir, "--feature", "auto",
               "--pairs", pairs, "--held-out", "2", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    model, tok, dictionary = _library(tiny)
    train, held = PAIRS[:-2], PAIRS[-2:]
    top = contrast(model, dictionary, [tok.encode(p) for p, _ in train], [tok.encode(n) for _, n in train], k=1)
    assert got["feature"] == int(top.ids[0]) and got["rank"] == 0 and got["site"] == SITE
    peak = float(top.max_act[0])
    np.testing.assert_allclose(got["max_activation"], peak, rtol=1e-5)
    scales = [m * peak for m in (0, 1, 2, 4)]  # the default: multiples of the largest activation
    want = style_shift(model, tok, SITE, None, held, scales=scales, steer=feature_steer(SITE, got["feature"]),
                       dictionaries=DictionaryRegistry().add_dictionary(dictionary))
    for g, w in zip(got["shift"], want, strict=True):
        for key in ("scale", "logprob_positive", "logprob_negative", "margin"):
            np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-4)
    assert got["shift"][-1]["margin"] != pytest.approx(got["shift"][0]["margin"], abs=1e-3)

    bad = _run(repo_root, "caa.py", "--model", gguf_path, "--feature", "auto", "--pairs", pairs)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--dictionary and --feature go together" in lines[0], bad.stderr
