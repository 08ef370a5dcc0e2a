"""launch/dashboard.py end to end on a tiny model: the pages' numbers against the model's own
activations, the site in headless Chromium, the Neuronpedia and delphi exports, a killed run resumed.

The Chromium test keeps its screenshot in `$JAXINTERP_TEST_ARTIFACTS` (default: test-artifacts/).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from helpers import chromium_or_skip, subprocess_env, write_corpus, write_tiny_gguf

D_SAE, K, T, TOKENS = 48, 4, 16, 600
SETTINGS = ["--tokens", str(TOKENS), "--context-length", str(T), "--top", "6", "--samples", "8", "--quantiles", "2",
            "--batch-contexts", "8"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import jax

    from jaxinterp import dictionaries as dl
    from jaxinterp.models import load_model

    root = tmp_path_factory.mktemp("dash")
    gguf = write_tiny_gguf(root / "tiny.gguf")
    corpus = write_corpus(root / "corpus", n_docs=4, words_per_doc=150)
    model, _ = load_model(gguf)
    spec = dl.DictionarySpec("topk", model.cfg.d_model, D_SAE, k=K)
    params = dl.init(jax.random.key(1), spec) | {"b_enc": 0.3 * jax.random.normal(jax.random.key(2), (D_SAE,))}
    dictionary = dl.Dictionary(spec, params, site="blocks.1.resid_post", model=gguf)
    dl.save(root / "dictionary", dictionary)
    cmd = [sys.executable, "launch/dashboard.py", "--dictionary", str(root / "dictionary"), "--corpus", corpus,
           "--out", str(root / "site"), "--neuronpedia", str(root / "np"), "--delphi", str(root / "delphi"),
           "--delphi-splits", "3", "--json", *SETTINGS]
    run = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    return {"root": root, "summary": summary, "corpus": corpus, "model": model, "dictionary": dictionary}


def _page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1)
    return json.loads(blob)


def _every_activation(built):
    """The dictionary's activations [N, T, F] on the contexts the run read (BOS rows zero)."""
    from jaxinterp.data.activations import site_activations
    from jaxinterp.features.dashboard import corpus_contexts
    from jaxinterp.models import load_model

    _, tok = load_model(built["dictionary"].model)
    contexts = corpus_contexts(built["corpus"], tok, TOKENS, T, 0)
    d = built["dictionary"]
    acts = np.asarray(d.encode(site_activations(built["model"], contexts, d.site))).reshape(len(contexts), T - 1, -1)
    return contexts, tok, np.concatenate([np.zeros_like(acts[:, :1]), acts], 1)


def test_feature_pages_hold_the_models_own_activations(built):
    """Every page's top examples are the feature's largest activations over the corpus read (ties
    to the earlier token), each window's tokens and values are the model's, and the statistics
    count every firing token."""
    contexts, tok, acts = _every_activation(built)
    summary = built["summary"]
    assert summary["tokens"] == len(contexts) * (T - 1) and summary["features"] == D_SAE
    flat = acts.reshape(-1, D_SAE)
    locs = np.arange(len(flat))
    checked = 0
    for f in range(D_SAE):
        data = _page_data(built["root"] / "site" / "f" / f"{f}.html")["feature"]
        col = flat[:, f]
        on = locs[col > 0]
        want = on[np.lexsort((on, -col[on]))][:6]
        assert data["count"] == len(on) and data["n_tokens"] == summary["tokens"]
        assert data["max"] == pytest.approx(col.max(), rel=1e-5)
        assert sum(data["hist"]) == len(on)
        assert len(data["top"]) == len(want)
        for ex, loc in zip(data["top"], want):
            c, p = divmod(int(loc), T)
            lo = max(1, p - 12)
            assert ex["focus"] == p - lo
            assert ex["tokens"] == [tok.decode([i]) for i in contexts[c, lo : min(T, p + 5)]]
            np.testing.assert_allclose(ex["values"], acts[c, lo : min(T, p + 5), f], rtol=1e-3, atol=1e-6)
            checked += 1
        sampled = [ex for _, _, _, exs in data["quantiles"] for ex in exs]
        assert len(sampled) == min(8, len(on))
        for ex in sampled:
            assert ex["values"][ex["focus"]] > 0
    assert checked > 100


def test_the_site_in_headless_chromium(built):
    """Index: every feature listed, search by token, sort by max; a feature page: highlighted
    contexts with each token's value on hover, its histogram and logit table; a screenshot kept."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    browser_path = chromium_or_skip()
    site = built["root"] / "site"
    data = {f: _page_data(site / "f" / f"{f}.html")["feature"] for f in range(D_SAE)}
    busiest = max(data, key=lambda f: data[f]["count"])

    def searchable(f):  # what the index lists per feature: 5 most frequent top tokens, 5 most promoted
        top = Counter(ex["tokens"][ex["focus"]] for ex in data[f]["top"]).most_common(5)
        return " ".join([t for t, _ in top] + [t for t, _ in data[f]["pos_logits"][:5]]).lower()

    def hits(q):
        return {f for f in data if q in searchable(f)}

    candidates = sorted({ex["tokens"][ex["focus"]].strip().lower() for ex in data[busiest]["top"]} - {""})
    query = min(candidates, key=lambda q: len(hits(q)))
    assert 0 < len(hits(query)) < D_SAE
    artifacts = Path(os.environ.get("JAXINTERP_TEST_ARTIFACTS", Path(REPO) / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "dashboard-feature.png"
    shot.unlink(missing_ok=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((site / "index.html").as_uri())
        assert page.locator("#rows tr").count() == D_SAE
        assert page.locator("#shown").inner_text() == f"{D_SAE} of {D_SAE} features"
        # sorted by firing count, then by max on a click
        page.click("th[data-key=max]")
        shown_max = [int(t) for t in page.locator("#rows tr td:first-child").all_inner_texts()]
        assert shown_max == sorted(range(D_SAE), key=lambda f: (-data[f]["max"], f))
        page.fill("#search", query)
        listed = {int(t) for t in page.locator("#rows tr td:first-child").all_inner_texts()}
        assert listed == hits(query) and busiest in listed
        page.fill("#search", str(busiest))
        assert page.locator("#rows tr").count() == 1
        page.click(f"#rows a[href='f/{busiest}.html']")
        page.wait_for_load_state()
        assert page.title() == f"Feature {busiest}"

        f = data[busiest]
        rows = page.locator("#top .ex")
        assert rows.count() == len(f["top"])
        first = f["top"][0]
        spans = rows.nth(0).locator(".tok")
        assert spans.count() == len(first["tokens"])
        focus = rows.nth(0).locator(".tok.focus")
        assert float(focus.get_attribute("title")) == pytest.approx(first["values"][first["focus"]], rel=0.02)
        shaded = [s.evaluate("e => e.style.background") for s in spans.all()]
        assert all(("rgb" in b) == (v > 0) for b, v in zip(shaded, first["values"]))
        focus.hover()
        tip = page.locator("#tip")
        assert tip.is_visible() and tip.inner_text().endswith(focus.get_attribute("title"))
        n_bins = len([h for h in f["hist"] if h]) and (max(i for i, h in enumerate(f["hist"]) if h)
                                                       - min(i for i, h in enumerate(f["hist"]) if h) + 1)
        assert page.locator("svg.hist").first.locator("rect").count() == n_bins
        assert page.locator("table.logits tr").count() == len(f["pos_logits"])
        assert f["correlated"] and page.locator("table.correlated tr").count() == len(f["correlated"]) + 1
        assert page.locator("table.correlated a").first.get_attribute("href") == f"{f['correlated'][0][0]}.html"
        assert f"feature={busiest}:add=" in page.locator("pre.cmd").first.inner_text()
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert not errors, errors
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 1200 and height > 1000  # the whole page, longer than the window


def test_neuronpedia_batches_and_the_delphi_cache(built):
    """The batches validate and hold every feature; the delphi split files hold every firing entry
    of the pass, latents relative to their file's first one."""
    from safetensors.numpy import load_file

    from jaxinterp.features.neuronpedia import validate_neuronpedia

    contexts, _, acts = _every_activation(built)
    root = built["root"]
    features = []
    for path in sorted((root / "np").glob("batch-*.json")):
        batch = json.loads(path.read_text())
        validate_neuronpedia(batch)
        features += batch["features"]
    assert sorted(x["feature_index"] for x in features) == list(range(D_SAE))
    for x in features:
        page = _page_data(root / "site" / "f" / f"{x['feature_index']}.html")["feature"]
        assert x["correlated_features_indices"] == [c[0] for c in page["correlated"]]
        assert x["correlated_features_pearson"] == pytest.approx([c[1] for c in page["correlated"]], rel=1e-5)
    assert json.loads((root / "np" / "skipped_indexes.json").read_text())["skipped_indexes"] == []

    files = sorted((root / "delphi" / "blocks.1.resid_post").glob("*.safetensors"),
                   key=lambda p: int(p.name.split("_")[0]))
    assert [p.name for p in files] == ["0_15.safetensors", "16_31.safetensors", "32_47.safetensors"]
    got = {}
    for p in files:
        start = int(p.name.split("_")[0])
        z = load_file(str(p))
        np.testing.assert_array_equal(z["tokens"], contexts)
        for (c, pos, latent), v in zip(z["locations"].astype(int), z["activations"]):
            got[(c, pos, latent + start)] = float(v)
    want = {tuple(int(i) for i in idx): float(acts[idx]) for idx in zip(*np.nonzero(acts))}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[key] for key in want], list(want.values()), rtol=1e-3)


def test_a_killed_run_resumes_to_the_same_site(built, tmp_path):
    """Killed after its first save, then run again: the same pages as the uninterrupted run."""
    from jaxinterp.features.dashboard import DashboardSettings, build_dashboard

    settings = DashboardSettings(corpus=built["corpus"], tokens=TOKENS, context_length=T, k=6, samples=8,
                                 n_quantiles=2, batch_contexts=8, save_every=16)

    class Killed(Exception):
        pass

    def kill_after_first_save(line):
        if line.strip().startswith("16 of"):
            raise Killed

    dictionary = str(built["root"] / "dictionary")
    with pytest.raises(Killed):
        build_dashboard(dictionary, tmp_path / "site", settings, log=kill_after_first_save)
    assert not (tmp_path / "site" / "index.html").exists()
    lines = []
    build_dashboard(dictionary, tmp_path / "site", settings, log=lines.append)
    assert lines[1] == "resuming the corpus pass at context 16 of 40"
    ref = built["root"] / "site"
    for page in ["index.html"] + [f"f/{f}.html" for f in range(D_SAE)]:
        assert (tmp_path / "site" / page).read_text() == (ref / page).read_text(), page


def test_search_by_token_over_a_dashboards_pass(built):
    """`launch/search.py token`: the features whose top contexts fire on the token (counted from
    the pages), or whose logit table promotes it, most first."""
    site = built["root"] / "site"
    pages = {f: _page_data(site / "f" / f"{f}.html")["feature"] for f in range(D_SAE)}
    word = " cats"
    cmd = [sys.executable, "launch/search.py", "token", "--dashboard", str(site), "--text", word, "--k", str(D_SAE),
           "--json"]
    run = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout)["features"]
    # the tiny byte-level tokenizer has one token per byte: " cats" matches no token, "s" does
    assert got == []
    cmd[cmd.index(word)] = "S"
    run = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    got = json.loads(run.stdout)["features"]
    want = {f: (sum(ex["tokens"][ex["focus"]].strip().lower() == "s" for ex in p["top"]),
                sum(t.strip().lower() == "s" for t, _ in p["pos_logits"])) for f, p in pages.items()}
    want = sorted(((f, a, b) for f, (a, b) in want.items() if a or b), key=lambda r: (-r[1], -r[2], r[0]))
    assert [(r["id"], r["in_top"], r["in_logits"]) for r in got] == want and len(want) > 3
    bad = subprocess.run([*cmd[:4], str(built["root"]), *cmd[5:]], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give the --out folder of a finished launch/dashboard.py run" in bad.stderr


def test_what_fires_here_with_the_contexts_each_feature_fires_most_on(built):
    """`launch/search.py fires --dashboard`: each feature listed on the prompt comes with its top
    contexts from the dashboard's pass, the same as its page's."""
    site = built["root"] / "site"
    cmd = [sys.executable, "launch/search.py", "fires", "--dictionary", str(built["root"] / "dictionary"),
           "--prompt", "the lazy cats sit", "--k", "3", "--dashboard", str(site), "--contexts", "2", "--json"]
    run = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout)
    listed = {f["id"] for r in res["tokens"] for f in r["features"]}
    assert listed and set(res["top_contexts"]) == {str(f) for f in listed}
    for f in listed:
        page = _page_data(site / "f" / f"{f}.html")["feature"]
        got = res["top_contexts"][str(f)]
        assert len(got) == min(2, len(page["top"]))
        for c, ex in zip(got, page["top"]):
            assert c["value"] == pytest.approx(ex["values"][ex["focus"]], rel=1e-3)
            assert f"[{ex['tokens'][ex['focus']]}]" in c["text"]
            assert c["text"].endswith("".join(ex["tokens"][ex["focus"] + 1 : ex["focus"] + 4]))


@pytest.mark.parametrize("activation,architecture,widths", [("relu", "sae", ()), ("topk", "transcoder", ()),
                                                            ("topk", "sae", (16, 48))])
def test_every_kind_gets_its_dashboard(built, tmp_path, activation, architecture, widths):
    """A ReLU SAE (dense activations), a transcoder (reads blocks.0.mlp_in, its logits are its write
    at blocks.0.mlp_out) and a Matryoshka TopK: every page's top values are the largest of the
    dictionary's own activations at its input site."""
    import jax

    from jaxinterp import dictionaries as dl
    from jaxinterp.data.activations import site_activations
    from jaxinterp.features.dashboard import DashboardSettings, build_dashboard, corpus_contexts

    model, gguf = built["model"], built["dictionary"].model
    d = model.cfg.d_model
    spec = dl.DictionarySpec(activation, d, D_SAE, k=K, architecture=architecture, matryoshka_widths=widths)
    params = dl.init(jax.random.key(3), spec) | {"b_enc": 0.3 * jax.random.normal(jax.random.key(4), (D_SAE,))}
    site, target = ("blocks.0.mlp_in", "blocks.0.mlp_out") if architecture == "transcoder" else ("blocks.1.resid_post", None)
    dictionary = dl.Dictionary(spec, params, site=site, target_site=target, model=gguf)
    dl.save(tmp_path / "dictionary", dictionary)
    settings = DashboardSettings(corpus=built["corpus"], tokens=300, context_length=T, k=4, samples=4, n_quantiles=2,
                                 batch_contexts=8)
    summary = build_dashboard(str(tmp_path / "dictionary"), tmp_path / "site", settings, log=lambda line: None)
    from jaxinterp.models import load_model

    _, tok = load_model(gguf)
    contexts = corpus_contexts(built["corpus"], tok, 300, T, 0)
    acts = np.asarray(dictionary.encode(site_activations(model, contexts, site)))
    assert summary["tokens"] == len(acts) and (acts > 0).sum() == summary["entries"]
    for f in range(D_SAE):
        data = _page_data(tmp_path / "site" / "f" / f"{f}.html")
        top = [ex["values"][ex["focus"]] for ex in data["feature"]["top"]]
        np.testing.assert_allclose(top, np.sort(acts[:, f][acts[:, f] > 0])[::-1][:4], rtol=1e-3)
        assert f"{site}:feature={f}:" in data["steer"][0]
