"""Do the defaults converge? A TopK SAE (d_sae 2048, k 32, batch 4096) trained on synthetic
activation files with known sparse directions, three ways on the same rows in the same order:

- `before`: the trainer's earlier defaults (Adam at lr 4e-4, 100 warm-up steps, linear decay over
  the last 20%, gradient clipping at 1.0);
- `after`: the project's defaults (nothing set but the size of the run);
- `sparsify`: EleutherAI's sparsify `Trainer.fit` with its defaults (signum, schedule-free,
  lr 5e-3 / sqrt(d_sae / 2^14)), evaluated with the same code on the same held-out rows.

The tasks vary the ratio of true features to dimensions (2 to 8), the firing probability
(0.005 to 0.05), the magnitude distribution, d_in (64 to 768) and the steps (256 to 1024).
`python launch/bench.py convergence [--tasks NAME ...] [--set KEY=VALUE ...] [--sparsify-python PY] [--json]`
(`--set` changes the train settings of the `after` column, e.g. `--set optimizer=signum`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax

from jaxinterp.errors import UsageError
from jaxinterp.benchmarks.train_loop import activation_file, evaluate_sparsify, sparsify_fit
from jaxinterp.config import DataConfig, SyntheticConfig, config_from_dict
from jaxinterp.data import NpySource

BEFORE = {"lr": 4e-4, "lr_warmup_steps": 100, "lr_schedule": "linear", "lr_decay_fraction": 0.2, "grad_clip": 1.0,
          "optimizer": "adam"}
"""The train settings that were the defaults before the defaults were chosen by these tasks."""


@dataclass(frozen=True)
class Task:
    name: str
    d_in: int
    n_features: int
    p_active: float
    magnitude: str
    steps: int


TASKS = (
    Task("d64-r4", 64, 256, 0.02, "uniform", 512),
    Task("d256-r4", 256, 1024, 0.01, "uniform", 512),
    Task("d256-r8", 256, 2048, 0.005, "uniform", 512),
    Task("d384-r2-dense", 384, 768, 0.05, "exponential", 256),
    Task("d768-r2.7", 768, 2048, 0.005, "exponential", 256),
    Task("d128-r4-long", 128, 512, 0.02, "uniform", 1024),
)
D_SAE, K, BATCH = 2048, 32, 4096
EVAL_ROWS = 65536
"""Held-out rows for explained variance and the dead fraction (features that never fire on them)."""


def _ours(task: Task, acts: Path, dirs: Path, train_overrides: dict, out: Path) -> dict:
    from jaxinterp.train.loop import train

    shutil.rmtree(out, ignore_errors=True)
    cfg = config_from_dict({
        "data": {"source": "npy", "path": str(acts), "true_directions": str(dirs)},
        "dictionary": {"activation": "topk", "d_sae": D_SAE, "k": K},
        "train": {"batch_size": BATCH, "tokens": task.steps * BATCH, **train_overrides},
        "output": {"dir": str(out), "progress": False, "eval_tokens": EVAL_ROWS},
    })
    start = time.perf_counter()
    final = train(cfg, log=lambda s: None)
    return {"mmcs": final["mmcs"], "explained_variance": final["explained_variance"],
            "dead_fraction": 1 - final["frac_alive"], "lr": final["lr"], "seconds": time.perf_counter() - start}


def run_task(task: Task, work: Path, sparsify_python: str | None, after: dict | None = None) -> dict:
    syn = SyntheticConfig(n_features=task.n_features, d_in=task.d_in, p_active=task.p_active,
                          magnitude=task.magnitude, seed=1)
    acts, dirs = activation_file(work / "data", syn, task.steps * BATCH)
    row = {"task": asdict(task),
           "before": _ours(task, acts, dirs, BEFORE, work / f"{task.name}-before"),
           "after": _ours(task, acts, dirs, after or {}, work / f"{task.name}-after")}
    source = NpySource(DataConfig(source="npy", path=str(acts), true_directions=str(dirs)), BATCH, 0)
    sp = sparsify_fit(acts, source, task.steps, D_SAE, K, BATCH, work / f"{task.name}-sparsify", sparsify_python)
    if sp is None:
        row["sparsify"] = None
    else:
        q = evaluate_sparsify(sp["weights"], source, K, EVAL_ROWS, BATCH)
        row["sparsify"] = {"mmcs": q["mmcs"], "explained_variance": q["explained_variance"],
                           "dead_fraction": 1 - q["frac_alive"], "seconds": sp["fit_seconds"]}
    return row


def run(tasks: list[str] | None = None, sparsify_python: str | None = None, work_dir: str | None = None,
        log=print, after: dict | None = None) -> dict:
    """`after`: train settings that replace the project defaults in the `after` column."""
    chosen = [t for t in TASKS if not tasks or t.name in tasks]
    unknown = set(tasks or ()) - {t.name for t in TASKS}
    if unknown:
        raise UsageError(f"unknown task(s) {sorted(unknown)}; choose from {[t.name for t in TASKS]}")
    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "jaxinterp-bench-convergence"
    rows = []
    for t in chosen:
        rows.append(run_task(t, work, sparsify_python, after))
        log(format_row(rows[-1]))
    return {"benchmark": "convergence", "device": jax.devices()[0].device_kind,
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "jax": jax.__version__, "d_sae": D_SAE, "k": K, "batch_size": BATCH, "before": BEFORE, "after": after or {},
            "rows": rows}


def _cell(r: dict | None, key: str) -> str:
    return "n/a" if r is None else f"{r[key]:.3f}"


def format_row(row: dict) -> str:
    t = row["task"]
    name = (f"{t['name']} (d_in {t['d_in']}, {t['n_features']} features, p {t['p_active']:g}, {t['magnitude']}, "
            f"{t['steps']} steps)")
    cells = [" / ".join(_cell(row[w], key) for w in ("before", "after", "sparsify"))
             for key in ("mmcs", "explained_variance", "dead_fraction")]
    return f"| {name} | " + " | ".join(cells) + " |"


def format_human(res: dict) -> str:
    head = [f"convergence on {res['device']} ({res['cpu_cores']} cores, jax {res['jax']}): topk d_sae {res['d_sae']}, "
            f"k {res['k']}, batch {res['batch_size']}; each cell before / after / sparsify; dead: never fired "
            f"on {EVAL_ROWS:,} held-out rows" + (f"; after = defaults with {res['after']}" if res.get("after") else ""),
            "| task | mmcs | explained variance | dead fraction |", "|---|---|---|---|"]
    return "\n".join(head + [format_row(r) for r in res["rows"]])
