"""The training loop end to end, beside the step alone and beside sparsify's training call.

`launch/bench.py train --loop` writes (or reuses) a synthetic activation file with known
directions, then in one run:

1. times the jitted train step alone on a batch already on the device (`train_throughput`);
2. runs `launch/train.py` on the file as a user would (project defaults, `data.source: npy`) in a
   subprocess, and reads the loop's tokens/s (steps after the first, data reading and
   checkpoints included) and the seconds of each phase from its final metrics line; the process's
   wall time gives the whole-process tokens/s;
3. with `--compare sparsify`, runs sparsify's `Trainer.fit` on the same file, visiting the same
   rows batch for batch (`sparsify_baseline.fit_npy`), and evaluates its SAE on the same held-out
   rows with the same code, so speed and quality sit side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import yaml

from jaxinterp.errors import UsageError
from jaxinterp import dictionaries as dl
from jaxinterp import evals
from jaxinterp.benchmarks import sparsify_baseline
from jaxinterp.benchmarks.train_throughput import Case, time_case
from jaxinterp.config import DataConfig, SyntheticConfig
from jaxinterp.data import NpySource, write_npy

REPO = Path(__file__).resolve().parents[2]


def activation_file(directory: Path, syn: SyntheticConfig, rows: int) -> tuple[Path, Path]:
    """The synthetic activation file [rows, d_in] and its directions, written once per settings."""
    tag = f"d{syn.d_in}_n{syn.n_features}_p{syn.p_active:g}_{syn.magnitude}_s{syn.seed}_{rows}"
    path = directory / f"acts_{tag}.npy"
    dirs = directory / f"acts_{tag}.directions.npy"
    if not (path.is_file() and dirs.is_file()):
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"tmp_{tag}.npy"
        _, tmp_dirs = write_npy(str(tmp), syn, rows, seed=syn.seed)
        os.replace(tmp_dirs, dirs)
        os.replace(tmp, path)
    return path, dirs


def cache_from_npy(acts: Path, directory: Path, chunk_rows: int = 65536) -> Path:
    """The rows of `acts` as an activation cache (chunk files and a manifest), written once. Its
    manifest names no loadable model, so a run on it evaluates on its last chunk."""
    from jaxinterp.data.cache import FORMAT, chunk_name, write_manifest

    if (directory / "manifest.json").is_file():
        return directory
    x = np.load(acts, mmap_mode="r")
    directory.mkdir(parents=True, exist_ok=True)
    chunks = []
    for i, start in enumerate(range(0, len(x), chunk_rows)):
        np.save(directory / chunk_name(i), np.asarray(x[start : start + chunk_rows]))
        chunks.append({"file": chunk_name(i), "n_rows": int(min(chunk_rows, len(x) - start)), "contexts": [i]})
    write_manifest(directory, {
        "format": FORMAT, "model": "synthetic (no model)", "site": "synthetic", "corpus": "none",
        "context_length": 1, "eval_fraction": 0.0, "seed": 0, "chunk_contexts": 1, "dtype": "float32",
        "train_contexts": len(chunks), "contexts_digest": "", "contexts_planned": len(chunks),
        "d_model": int(x.shape[1]), "chunks": chunks})
    return directory


def run_train_process(config: dict, run_dir: Path, python: str = sys.executable) -> dict:
    """`launch/train.py` on `config` in a fresh process; its final metrics and its wall seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.in.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    out = subprocess.run([python, str(REPO / "launch" / "train.py"), "--config", str(cfg_path), "--json"],
                         capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        (run_dir / "stderr.txt").write_text(out.stderr)
        lines = [l for l in out.stderr.strip().splitlines() if not l.lstrip().startswith("@ ")]
        raise RuntimeError(f"launch/train.py failed ({out.returncode}): {lines[-3:]} (all of stderr: "
                           f"{run_dir / 'stderr.txt'})")
    final = json.loads(out.stdout.strip().splitlines()[0])
    return {**final, "process_seconds": wall}


def sparsify_fit(acts: Path, source: NpySource, steps: int, d_sae: int, k: int, batch_size: int, work: Path,
                 python: str | None) -> dict | None:
    """sparsify's `Trainer.fit` on the first `steps` batches of `source` (in-process when sparsify
    is importable, else through `python`); None when neither is possible."""
    if python is None and not sparsify_baseline.available():
        return None
    work.mkdir(parents=True, exist_ok=True)
    order = work / "sparsify_order.npy"
    np.save(order, np.concatenate([source.rows(i) for i in range(steps)]))
    out_dir = work / "sparsify"
    if python is None and sparsify_baseline.available():
        return sparsify_baseline.fit_npy(str(acts), str(order), str(out_dir), d_sae, k, batch_size)
    res = subprocess.run([python, "-m", "jaxinterp.benchmarks.sparsify_baseline", "--fit-npy", str(acts), "--order",
                          str(order), "--out", str(out_dir), "--d-sae", str(d_sae), "--k", str(k), "--batch-size",
                          str(batch_size)], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"sparsify failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def evaluate_sparsify(weights: str, source: NpySource, k: int, eval_tokens: int, batch_size: int) -> dict:
    """mmcs and reconstruction metrics of a sparsify TopK SAE on `source`'s held-out rows."""
    from safetensors.numpy import load_file

    w = load_file(weights)
    d_sae, d_in = w["W_dec"].shape
    spec = dl.DictionarySpec(activation="topk", d_in=d_in, d_sae=d_sae, k=k)
    params = {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"],
              "norm_scale": np.ones((), np.float32)}
    return evals.evaluate(spec, params, source.eval_batches(eval_tokens, batch_size),
                          true_directions=source.true_directions)


def run(*, d_in: int = 256, d_sae: int = 2048, k: int = 32, batch_size: int = 4096, steps: int = 512,
        n_features: int = 1024, p_active: float = 0.01, compare: str | None = None,
        sparsify_python: str | None = None, work_dir: str | None = None, step_repeats: int = 50,
        overrides: dict | None = None, sources: tuple[str, ...] = ("npy",)) -> dict:
    rows = steps * batch_size
    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "jaxinterp-bench-loop"
    syn = SyntheticConfig(n_features=n_features, d_in=d_in, p_active=p_active, seed=1)
    acts, dirs = activation_file(work / "data", syn, rows)

    data = {
        "npy": {"source": "npy", "path": str(acts), "true_directions": str(dirs)},
        "cache": {"source": "cache", "path": str(cache_from_npy(acts, work / "data" / f"cache_{acts.stem}"))
                  if "cache" in sources else None},
        "synthetic": {"source": "synthetic", "synthetic": {"n_features": n_features, "d_in": d_in,
                                                           "p_active": p_active, "seed": 1}},
    }
    unknown = set(sources) - set(data)
    if unknown:
        raise UsageError(f"unknown source(s) {sorted(unknown)}; choose from {sorted(data)}")

    step_s = time_case(Case(d_in, d_sae, k, batch_size), step_repeats)
    step_aux_s = time_case(Case(d_in, d_sae, k, batch_size, aux_active=True), step_repeats)
    runs = {}
    for src in sources:
        config = {
            "data": data[src],
            "dictionary": {"activation": "topk", "d_sae": d_sae, "k": k},
            "train": {"batch_size": batch_size, "tokens": rows, **(overrides or {})},
            "output": {"dir": str(work / f"run_{src}"), "progress": False},
        }
        run_dir = work / f"run_{src}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        runs[src] = run_train_process(config, run_dir)
    ours = runs[sources[0]]
    out = {
        "benchmark": "train_loop",
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "n_devices": jax.device_count(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jax": jax.__version__,
        "task": {"d_in": d_in, "d_sae": d_sae, "k": k, "batch_size": batch_size, "steps": steps,
                 "n_features": n_features, "p_active": p_active, "rows": rows, "file": str(acts)},
        "step_tokens_per_s": batch_size / step_s,
        "step_aux_tokens_per_s": batch_size / step_aux_s,
        "loop_tokens_per_s": ours["loop_tokens_per_s"],
        "process_tokens_per_s": rows / ours["process_seconds"],
        "process_seconds": ours["process_seconds"],
        "seconds": {**ours["seconds"],
                    # imports, backend start, process exit: the wall time outside `train()`'s phases
                    "start_and_exit": ours["process_seconds"] - sum(ours["seconds"].values())},
        "mmcs": ours.get("mmcs"),
        "explained_variance": ours["explained_variance"],
        "dead_fraction": ours["dead_fraction"],
    }
    out["loop_vs_step"] = out["loop_tokens_per_s"] / out["step_tokens_per_s"]
    out["source"] = sources[0]
    out["by_source"] = {src: {"loop_tokens_per_s": r["loop_tokens_per_s"],
                              "loop_vs_step": r["loop_tokens_per_s"] / out["step_tokens_per_s"],
                              "process_tokens_per_s": rows / r["process_seconds"]} for src, r in runs.items()}
    if compare == "sparsify":
        source = NpySource(DataConfig(source="npy", path=str(acts), true_directions=str(dirs)), batch_size, 0)
        sp = sparsify_fit(acts, source, steps, d_sae, k, batch_size, work, sparsify_python)
        if sp is None:
            out["sparsify"] = "not installed: pip install torch==2.13.0 eai-sparsify, or pass --sparsify-python"
        else:
            q = evaluate_sparsify(sp["weights"], source, k, 65536, batch_size)
            out |= {
                "sparsify_tokens_per_s": sp["tokens_per_s"],
                "sparsify_fit_seconds": sp["fit_seconds"],
                "ratio_vs_sparsify": out["process_tokens_per_s"] / sp["tokens_per_s"],
                "loop_ratio_vs_sparsify": out["loop_tokens_per_s"] / sp["tokens_per_s"],
                "sparsify_mmcs": q.get("mmcs"),
                "sparsify_explained_variance": q["explained_variance"],
            }
    return out


def format_human(res: dict) -> str:
    t = res["task"]
    lines = [f"train loop on {res['device']} ({res['platform']}, {res['n_devices']} device(s), {res['cpu_cores']} cores, "
             f"jax {res['jax']}): topk d_in={t['d_in']} d_sae={t['d_sae']} k={t['k']} batch={t['batch_size']}, "
             f"{t['steps']} steps on {t['rows']:,} rows",
             f"  step alone:     {res['step_tokens_per_s']:,.0f} tokens/s while no latent is dead, "
             f"{res['step_aux_tokens_per_s']:,.0f} once aux-k runs (some latent dead)",
             *(f"  training loop ({src}): {r['loop_tokens_per_s']:,.0f} tokens/s = {r['loop_vs_step']:.2f}x the step; "
               f"whole process {r['process_tokens_per_s']:,.0f} tokens/s" for src, r in res["by_source"].items()),
             f"  whole process ({res['source']}): {res['process_tokens_per_s']:,.0f} tokens/s "
             f"({res['process_seconds']:.1f} s)",
             "  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in res["seconds"].items()),
             f"  quality: mmcs {res['mmcs']:.4f}, explained variance {res['explained_variance']:.4f}, "
             f"dead {res['dead_fraction']:.3f}"]
    if "sparsify_tokens_per_s" in res:
        lines += [f"  sparsify Trainer.fit: {res['sparsify_tokens_per_s']:,.0f} tokens/s -> whole process "
                  f"{res['ratio_vs_sparsify']:.2f}x, loop {res['loop_ratio_vs_sparsify']:.2f}x",
                  f"  sparsify quality: mmcs {res['sparsify_mmcs']:.4f}, explained variance "
                  f"{res['sparsify_explained_variance']:.4f}"]
    elif "sparsify" in res:
        lines.append(f"  sparsify: {res['sparsify']}")
    return "\n".join(lines)
