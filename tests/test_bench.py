"""The benchmark entry points run and print the JSON keys their figures are quoted under."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

from conftest import REPO

from jaxinterp.benchmarks import kernels
from jaxinterp.benchmarks.timing import interleaved_medians, median_seconds


def test_drift_bench_json_keys():
    cmd = [sys.executable, "launch/bench.py", "drift", "--d-sae", "256", "--tokens", "64", "--k", "4",
           "--no-generation", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert {"refresh_hz", "python_loop_refresh_hz", "speedup_vs_python_loop"} <= set(res)
    assert res["refresh_hz"] > 0 and res["speedup_vs_python_loop"] > 1


def test_kernel_decode_grid_rows():
    rows = kernels.decode_grid([(512, 4, 8), (300, 3, 5)], d_model=64, repeats=2)
    assert [(r["d_sae"], r["k"], r["batch"]) for r in rows] == [(512, 4, 8), (300, 3, 5)]
    for r in rows:
        assert r["sparse_loop_us"] > 0 and r["xla_gather_us"] > 0 and r["dense_us"] > 0
        assert 0 < r["sparse_loop_bandwidth_fraction"] and r["speedup_vs_dense"] > 0
    text = kernels.format_human({"device": "cpu", "platform": "cpu", "peak_bandwidth_gb_s": 1.0, "peak_source": "x",
                                 "decode": rows})
    assert "512" in text and "vs dense" in text


def test_timing_helpers_count_calls():
    calls = []
    assert median_seconds(lambda: calls.append(1), 3) >= 0 and len(calls) == 4
    seen = []
    med = interleaved_medians({"a": 1, "b": 2}, seen.append, 2)
    assert set(med) == {"a", "b"} and seen == [1, 2, 1, 2, 1, 2]


@pytest.mark.slow  # slow: a whole benchmark round through launch/train.py
def test_train_loop_bench_runs_launch_train_and_prints_its_keys(tmp_path):
    cmd = [sys.executable, "launch/bench.py", "train", "--loop", "--d-in", "16", "--d-sae", "64", "--k", "4",
           "--batch-size", "256", "--train-steps", "12", "--n-features", "32", "--p-active", "0.05", "--steps", "2",
           "--work-dir", str(tmp_path), "--source", "npy", "cache", "synthetic", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert {"loop_tokens_per_s", "process_tokens_per_s", "step_tokens_per_s", "step_aux_tokens_per_s", "loop_vs_step",
            "seconds"} <= set(res)
    assert res["task"]["rows"] == 12 * 256 and res["process_tokens_per_s"] < res["loop_tokens_per_s"]
    assert {"setup", "compile", "loop", "eval", "export", "start_and_exit"} <= set(res["seconds"])
    assert 0 < res["mmcs"] <= 1 and "sparsify_tokens_per_s" not in res  # no --compare
    assert set(res["by_source"]) == {"npy", "cache", "synthetic"}
    assert all(r["loop_tokens_per_s"] > 0 and r["loop_vs_step"] > 0 for r in res["by_source"].values())


def test_convergence_bench_row_trains_before_and_after_on_one_file(tmp_path):
    from jaxinterp.benchmarks import convergence

    task = convergence.Task("tiny", 16, 32, 0.05, "uniform", 6)
    row = convergence.run_task(task, tmp_path, sparsify_python=None)
    assert row["before"]["lr"] == convergence.BEFORE["lr"] and row["after"]["lr"] != row["before"]["lr"]
    for side in ("before", "after"):
        assert 0 < row[side]["mmcs"] <= 1 and 0 <= row[side]["dead_fraction"] <= 1
    assert len(list((tmp_path / "data").glob("acts_*.npy"))) == 2  # one file (and its directions) for both runs
    line = convergence.format_row(row)
    assert line.startswith("| tiny (d_in 16") and line.count("|") == 5
    with pytest.raises(ValueError, match="unknown task"):
        convergence.run(tasks=["nope"])


@pytest.mark.slow  # slow: a whole benchmark round on SmolLM2
def test_features_bench_prints_its_keys(tmp_path):
    from helpers import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cmd = [sys.executable, "launch/bench.py", "features", "--model", gguf, "--site", "blocks.1.resid_post",
           "--d-sae", "64", "16384", "--k", "4", "--contexts", "2", "--repeats", "1", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert [c["d_sae"] for c in res["cases"]] == [64, 16384]
    assert [c["contexts_per_batch"] for c in res["cases"]] == [2, 2]
    for c in res["cases"]:
        assert c["forward_tokens_per_s"] > 0 and c["stats_tokens_per_s"] > 0 and c["stats_and_entries_tokens_per_s"] > 0
        assert c["stats_cost_vs_forward"] == pytest.approx(c["forward_tokens_per_s"] / c["stats_tokens_per_s"] - 1)


@pytest.mark.slow  # attribution's CLI test runs the same graphs by default; this times several lengths
def test_attribute_bench_runs_each_length_in_its_own_process_and_fits_exponents():
    from jaxinterp.benchmarks import attribute

    ref = Path(REPO) / "tests" / "data" / "circuit_tracer_graphs"
    res = attribute.run(model=str(ref / "model"), dictionary=str(ref / "clt"), lengths=(6, 12), max_feature_nodes=8,
                        reference=(6, 16), random_tokens=True)
    assert [c["length"] for c in res["cases"]] == [6, 12] and res["reference"]["feature_rows"] == 16
    for c in res["cases"]:
        assert c["feature_rows"] == 8 and c["peak_rss_bytes"] >= c["baseline_rss_bytes"] > 0
        assert c["s_per_feature_row"] > 0 and c["first_s"] >= c["warm_s"] > 0
    assert set(res["exponents"]) == {"warm_s", "peak_rss", "attribution_rss"}
    assert all(isinstance(v, float) for v in res["exponents"].values())
    assert "growth exponents" in attribute.format_human(res)


def test_scaling_model_counts_what_the_library_counts_and_adds_up():
    from jaxinterp.benchmarks import scaling
    from jaxinterp.dictionaries import clt

    sae, wide, smol = scaling.WORKLOADS
    assert sae.params == 2 * 576 * 4608 + 4608 + 576
    assert smol.params == clt.CLTSpec(n_layers=30, d_model=576, d_sae=4608, k=32, span=None,
                                      activation="topk").n_weights == 1_313_988_480
    v5e64 = next(h for h in scaling.HARDWARE if h.name == "v5e-64")
    r = scaling.predict(sae, v5e64, model=1, tokens_per_device=4096, live=False)
    assert r["mesh"] == "64x1" and r["global_batch"] == 64 * 4096
    assert r["grad_bytes_per_device"] == 4 * sae.params and r["topk_bytes_per_device"] == 0
    assert r["seconds"]["gradients"] == pytest.approx(2 * 63 / 64 * 4 * sae.params / 100e9)
    assert r["step_s"] == pytest.approx(sum(r["seconds"].values()))
    assert r["tokens_per_s"] == pytest.approx(64 * 4096 / r["step_s"])
    # split over model=4, the gradients shrink 4x and the top-k merges appear; a live source adds the forward
    r4 = scaling.predict(wide, v5e64, model=4, tokens_per_device=4096, live=True)
    assert r4["mesh"] == "16x4" and r4["grad_bytes_per_device"] == pytest.approx(4 * wide.params / 4)
    assert r4["topk_bytes_per_device"] == pytest.approx(4 * 4096 * (8 * 32 * 3 + 8 * 576 * 3 / 4))
    assert r4["seconds"]["forward"] > 0
    # below the crossover the communication outweighs the compute, above it not
    t = scaling.crossover_tokens(sae, v5e64, model=1)
    lo = scaling.predict(sae, v5e64, model=1, tokens_per_device=int(t * 0.9), live=False)["seconds"]
    hi = scaling.predict(sae, v5e64, model=1, tokens_per_device=int(t * 1.1), live=False)["seconds"]
    assert lo["gradients"] > lo["compute"] and hi["gradients"] < hi["compute"]
    assert not scaling.predict(smol, v5e64, model=1, tokens_per_device=4096, live=False)["fits"]  # 21 GB on 16 GB
    res = scaling.run(measured=False)
    assert "communication outweighs compute" in scaling.format_human(res) and len(res["best"]) == 24


@pytest.mark.slow  # slow: a load test through the HTTP server (the server's own tests run by default)
def test_serve_bench_reports_every_level_and_the_ratios(tmp_path):
    from helpers import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cmd = [sys.executable, "launch/bench.py", "serve", "--model", gguf, "--site", "blocks.1.resid_post", "--d-sae", "64",
           "--clients", "1,2", "--requests-per-client", "1", "--max-tokens", "4", "--overhead-clients", "2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert set(res["levels"]) == {"1", "2"} and all(lv["tokens"] == lv["requests"] * 4 for lv in res["levels"].values())
    assert res["steering_overhead"]["unsteered_tokens_per_s"] > 0 and res["static_batch"]["served_over_static"] > 0
    m = res["memory_bytes"]
    assert m["dictionaries"] > 0 and m["steering_slots"] > 0 and 0 < m["overhead_ratio"] < 10
