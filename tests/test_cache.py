"""The on-disk activation cache: `launch/harvest.py` writes it, `data.source: cache` trains on it.

A random two-layer llama GGUF with a byte-level tokenizer stands in for the language model, over a
corpus of five small documents (253 train contexts of 16 tokens), so a harvest takes about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

pytest.importorskip("gguf")

from jaxinterp.config import ConfigError, DataConfig, config_from_dict  # noqa: E402
from jaxinterp.data import DataError, make_source  # noqa: E402
from jaxinterp.data.activations import ModelSource, site_activations  # noqa: E402
from jaxinterp.data.cache import CacheSource, harvest, plan_chunks, read_manifest  # noqa: E402
from jaxinterp.models import load_model  # noqa: E402
from jaxinterp.train import train  # noqa: E402
from helpers import subprocess_env, write_corpus, write_tiny_gguf  # noqa: E402

SITE = "blocks.0.resid_post"
T = 16  # context length: 15 rows per context
N = 253  # train contexts of the corpus


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("assets")
    write_tiny_gguf(d / "tiny.gguf")
    write_corpus(d / "corpus")
    return d


@pytest.fixture(scope="module")
def lm(assets):
    return load_model(str(assets / "tiny.gguf"))


def _raw(assets: Path, tmp: Path, **data) -> dict:
    return {
        "data": {"source": "cache", "path": str(tmp / "cache"), "model": str(assets / "tiny.gguf"),
                 "corpus": str(assets / "corpus"), "site": SITE, "context_length": T, "chunk_contexts": 8,
                 "eval_fraction": 0.2, **data},
        "dictionary": {"activation": "topk", "d_sae": 64, "k": 4, "dead_tokens": 2048},
        "train": {"tokens": 64 * 30, "batch_size": 64, "lr": 1e-3, "lr_warmup_steps": 3, "init_batches": 1},
        "output": {"dir": str(tmp / "run"), "log_every": 5, "checkpoint_every": 10, "keep_checkpoints": 3,
                   "eval_tokens": 512, "ce_eval_contexts": 8, "progress": False},
    }


@pytest.fixture(scope="module")
def cache(assets, lm, tmp_path_factory) -> Path:
    """A complete float32 cache of all 253 train contexts, chunks of 8 (the last one of 5)."""
    tmp = tmp_path_factory.mktemp("cache")
    model, tok = lm
    harvest(config_from_dict(_raw(assets, tmp)), tmp / "cache", progress=False, model=model, tokenizer=tok)
    return tmp / "cache"


def _chunks(directory: Path) -> list[np.ndarray]:
    return [np.load(directory / c["file"]) for c in read_manifest(directory)["chunks"]]


def _sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


# (a) ------------------------------------------------------------------------------------------


def test_cache_rows_equal_the_live_pipeline(assets, lm, cache, tmp_path):
    model, tok = lm
    manifest = read_manifest(cache)
    cfg = DataConfig(source="model", site=SITE, model=manifest["model"], corpus=manifest["corpus"],
                     context_length=T, chunk_contexts=8, eval_fraction=0.2)
    live = ModelSource(cfg, batch_size=8 * (T - 1), seed=0, model=model, tokenizer=tok)
    n = len(live.train_contexts)
    assert (manifest["train_contexts"], manifest["contexts_planned"]) == (n, n) == (N, N)
    contexts = [i for c in manifest["chunks"] for i in c["contexts"]]
    assert sorted(contexts) == list(range(n))  # every train context once
    chunks = _chunks(cache)
    assert [len(c) for c in chunks] == [8 * (T - 1)] * (N // 8) + [N % 8 * (T - 1)]
    # Full chunks are the live source's first-epoch chunks, row order included: one batch = one chunk.
    for chunk in chunks[:-1]:
        np.testing.assert_array_equal(chunk, next(live))
    # Every chunk, the partial last one too, holds exactly its contexts' activations.
    for entry, chunk in zip(manifest["chunks"], chunks):
        want = site_activations(model, live.train_contexts[entry["contexts"]], SITE)
        np.testing.assert_array_equal(_sorted_rows(chunk), _sorted_rows(want))


def test_bfloat16_cache_reads_as_the_float32_rows_rounded(assets, lm, cache, tmp_path):
    model, tok = lm
    cfg = config_from_dict(_raw(assets, tmp_path))
    manifest = harvest(cfg, tmp_path / "bf16", contexts=20, dtype="bfloat16", progress=False, model=model,
                       tokenizer=tok)
    assert [len(c["contexts"]) for c in manifest["chunks"]] == [8, 8, 4]
    src = CacheSource(DataConfig(source="cache", path=str(tmp_path / "bf16"), shuffle=False), 20 * (T - 1), 0)
    got = next(src)
    assert got.dtype == np.float32 and got.shape == (20 * (T - 1), 32)
    full = np.concatenate(_chunks(cache)[:2])  # the same first 16 contexts, same row order
    np.testing.assert_allclose(got[: 16 * (T - 1)], full, rtol=2**-7, atol=1e-6)


# (b) ------------------------------------------------------------------------------------------


def _harvest_cmd(config: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "launch/harvest.py", "--config", config, "--out", str(out), *extra]


def _chunk_count(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["chunks"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow  # test_pod's harvest resumes from a manifest by default; this kills one mid-write
def test_killed_harvest_resumes_without_losing_or_repeating_a_context(assets, tmp_path, repo_root):
    config = tmp_path / "h.yaml"
    config.write_text(yaml.safe_dump(_raw(assets, tmp_path, chunk_contexts=2)))
    n_chunks = -(-N // 2)
    run = lambda *a: subprocess.run(_harvest_cmd(str(config), *a), cwd=repo_root, env=subprocess_env(),  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.strip() == f"cache: {N * (T - 1):,} rows x 32 (float32) of {SITE} in {n_chunks} chunks at " \
                                   f"{tmp_path / 'whole'}"

    out = tmp_path / "killed"
    proc = subprocess.Popen(_harvest_cmd(str(config), out), cwd=repo_root, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while _chunk_count(out) == 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the harvest wrote no chunk"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert 1 <= _chunk_count(out) < n_chunks, "killed too late; raise the number of chunks"

    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr
    manifest = read_manifest(out)
    contexts = [i for c in manifest["chunks"] for i in c["contexts"]]
    assert len(contexts) == len(set(contexts)) == N and set(contexts) == set(range(N))
    assert [c["contexts"] for c in manifest["chunks"]] == [p.tolist() for p in plan_chunks(N, N, 2, 0)]
    assert (out / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    for c in manifest["chunks"]:
        assert (out / c["file"]).read_bytes() == (tmp_path / "whole" / c["file"]).read_bytes(), c["file"]

    # The same directory with other settings: one line naming the key and the way out.
    other = run(out, "--set", "train.seed=1")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "seed=0" in other.stderr and "seed=1" in other.stderr and "--force" in other.stderr


# (c) ------------------------------------------------------------------------------------------


def test_cache_source_state_survives_json_and_epochs_reshuffle(cache):
    n_rows, batch = N * (T - 1), 115  # 3795 rows = 33 batches of 115
    cfg = DataConfig(source="cache", path=str(cache))
    src = CacheSource(cfg, batch, seed=3)
    assert (src.d_in, src.n_rows, src.host_side, src.true_directions) == (32, n_rows, True, None)
    epoch1 = np.concatenate([next(src) for _ in range(n_rows // batch)])
    np.testing.assert_array_equal(_sorted_rows(epoch1), _sorted_rows(np.concatenate(_chunks(cache))))
    state = json.loads(json.dumps(src.get_state()))
    want = [next(src) for _ in range(3)]
    assert not np.array_equal(want[0], epoch1[:batch])  # a new order in the second epoch
    again = CacheSource(cfg, batch, seed=3)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again), w)
    with pytest.raises(DataError, match=f"now holds {n_rows}"):
        again.set_state({**state, "cache_rows": 100})


def _weights(run: Path) -> dict:
    return load_file(str(run / "export" / "saelens" / "sae_weights.safetensors"))


def test_training_on_a_cache_resumes_to_the_same_result(assets, cache, tmp_path):
    quiet = lambda s: None  # noqa: E731
    raw = _raw(assets, tmp_path)
    raw["data"]["path"] = str(cache)
    cfg_a = config_from_dict({**raw, "output": {**raw["output"], "dir": str(tmp_path / "a")}})
    cfg_b = config_from_dict({**raw, "output": {**raw["output"], "dir": str(tmp_path / "b")}})
    final_a = train(cfg_a, log=quiet)
    assert {"ce_loss_score", "kl_div_score", "explained_variance"} <= set(final_a)  # the cache's model loaded
    meta = json.loads((tmp_path / "a" / "export" / "saelens" / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta["model_name"]) == ("blocks.0.hook_resid_post", cfg_a.data.model)

    # What a run killed after its step-10 checkpoint leaves: later checkpoints and the export gone.
    train(cfg_b, log=quiet)
    for p in (tmp_path / "b" / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > 10:
            shutil.rmtree(p)
    shutil.rmtree(tmp_path / "b" / "export")
    logs = []
    final_b = train(cfg_b, resume=True, log=logs.append)
    assert any("resumed from step 10" in line for line in logs)
    timing = ("seconds", "loop_tokens_per_s")  # wall-clock, differs between runs
    assert {k: v for k, v in final_b.items() if k not in timing} == {k: v for k, v in final_a.items() if k not in timing}
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)

    # launch/eval.py finds the model, site and corpus of a cache-trained run in the cache's manifest
    out = subprocess.run([sys.executable, "launch/eval.py", "--checkpoint", str(tmp_path / "a"), "--contexts", "2",
                          "--json"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["site"] == "blocks.0.resid_post" and np.isfinite(res["ce_loss_score"])


def test_without_its_model_a_cache_evaluates_on_its_last_chunk(cache, tmp_path):
    moved = tmp_path / "cache"
    shutil.copytree(cache, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "model": str(tmp_path / "gone.gguf")}))
    src = CacheSource(DataConfig(source="cache", path=str(moved)), 64, 0)
    with pytest.warns(UserWarning, match="last chunk"):
        batches = list(src.eval_batches(1000, 64))
    assert src.model is None and src.eval_contexts is None
    np.testing.assert_array_equal(np.concatenate(batches), np.load(moved / "chunk_000031.npy"))


# (d) ------------------------------------------------------------------------------------------


def _broken_cache(cache: Path, tmp_path: Path, how: str) -> Path:
    d = tmp_path / "broken"
    shutil.copytree(cache, d)
    manifest = json.loads((d / "manifest.json").read_text())
    if how == "no manifest":
        (d / "manifest.json").unlink()
    elif how == "corrupt manifest":
        (d / "manifest.json").write_text('{"format": 1, "chunks": [')
    elif how == "missing chunk":
        (d / "chunk_000004.npy").unlink()
    elif how == "wrong shape":
        np.save(d / "chunk_000002.npy", np.zeros((119, 32), np.float32))
    elif how == "empty":
        (d / "manifest.json").write_text(json.dumps({**manifest, "chunks": []}))
    elif how == "few rows":
        (d / "manifest.json").write_text(json.dumps({**manifest, "chunks": manifest["chunks"][:1]}))
    return d


@pytest.mark.parametrize("how, batch, message", [
    ("no manifest", 64, r"holds no manifest\.json; write one with python launch/harvest\.py"),
    ("corrupt manifest", 64, r"manifest\.json is not a readable cache manifest .*--force"),
    ("missing chunk", 64, r"chunk_000004\.npy is listed in the manifest but missing; re-harvest .*--force"),
    ("wrong shape", 64, r"chunk_000002\.npy holds float32 \(119, 32\), the manifest says float32 \(120, 32\)"),
    ("empty", 64, r"holds no completed chunks; run \(or finish\) python launch/harvest\.py"),
    ("few rows", 128, r"holds 120 rows, fewer than train\.batch_size=128; lower the batch size or harvest more"),
])
def test_bad_caches_are_one_line_errors(cache, tmp_path, how, batch, message):
    d = _broken_cache(cache, tmp_path, how)
    with pytest.raises(DataError, match=message) as e:
        CacheSource(DataConfig(source="cache", path=str(d)), batch, 0)
    assert "\n" not in str(e.value)


def test_config_and_site_errors(assets, cache, tmp_path):
    with pytest.raises(DataError, match="not found; write one with python launch/harvest.py"):
        CacheSource(DataConfig(source="cache", path=str(tmp_path / "nowhere")), 64, 0)
    with pytest.raises(ConfigError, match=r"data\.path: required when data\.source is 'cache'"):
        DataConfig(source="cache")
    raw = _raw(assets, tmp_path, path=str(cache), site="blocks.1.resid_post")
    with pytest.raises(DataError, match=r"data\.site is 'blocks\.1\.resid_post', but the cache .* holds 'blocks\.0"):
        make_source(config_from_dict(raw))
    with pytest.raises(DataError, match=f"--contexts 1000: the corpus has {N} train contexts"):
        harvest(config_from_dict(raw), tmp_path / "c", contexts=1000, progress=False)


def test_a_two_site_cache_trains_a_transcoder_as_the_live_pair_does(assets, lm, tmp_path):
    """`data.target_site`: one harvest writes both sites side by side, the manifest names the pair, a
    transcoder trains on it with the target's loss recovered, and `launch/eval.py` reads the pair
    back from the run's artifact."""
    model, tok = lm
    raw = _raw(assets, tmp_path, site="blocks.1.mlp_in", target_site="blocks.1.mlp_out")
    raw["dictionary"]["architecture"] = "skip_transcoder"
    cfg = config_from_dict(raw)
    manifest = harvest(cfg, tmp_path / "cache", contexts=40, progress=False, model=model, tokenizer=tok)
    assert (manifest["site"], manifest["target_site"]) == ("blocks.1.mlp_in", "blocks.1.mlp_out")
    first = np.load(tmp_path / "cache" / manifest["chunks"][0]["file"])
    ctx = ModelSource(DataConfig(source="model", site="blocks.1.mlp_in", model=manifest["model"],
                                 corpus=manifest["corpus"], context_length=T, chunk_contexts=8, eval_fraction=0.2),
                      batch_size=8, seed=0, model=model, tokenizer=tok).train_contexts[manifest["chunks"][0]["contexts"]]
    want = site_activations(model, ctx, ("blocks.1.mlp_in", "blocks.1.mlp_out"))
    assert first.shape == (8 * (T - 1), 64)
    np.testing.assert_array_equal(_sorted_rows(first), _sorted_rows(want))
    with pytest.raises(DataError, match="data.target_site is None, but the cache .* holds target site 'blocks.1.mlp_out'"):
        CacheSource(DataConfig(source="cache", path=str(tmp_path / "cache")), 64, 0)

    final = train(cfg, log=lambda s: None)
    assert {"ce_loss_score", "kl_div_score", "explained_variance"} <= set(final)
    out = subprocess.run([sys.executable, "launch/eval.py", "--checkpoint", str(tmp_path / "run" / "dictionary"),
                          "--corpus", str(assets / "corpus"), "--contexts", "2", "--json"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert (res["site"], res["target_site"]) == ("blocks.1.mlp_in", "blocks.1.mlp_out")
    assert np.isfinite(res["ce_loss_score"]) and np.isfinite(res["explained_variance"])
