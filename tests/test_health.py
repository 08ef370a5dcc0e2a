"""Bad data and divergence end the run at once with one line that names the cause."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from helpers import subprocess_env

from jaxinterp.config import DataConfig
from jaxinterp.data import NpySource
from jaxinterp.train import health

D, ROWS, BATCH = 8, 4096, 128


def _config(tmp_path, acts, **train):
    raw = {
        "data": {"source": "npy", "path": str(acts), "eval_fraction": 0.05},
        "dictionary": {"activation": "topk", "d_sae": 32, "k": 4},
        "train": {"tokens": BATCH * 20, "batch_size": BATCH, "init_batches": 1, **train},
        "output": {"dir": str(tmp_path / "run"), "log_every": 10, "checkpoint_every": 5, "eval_tokens": 128},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _acts(tmp_path, bad_rows=(), value=np.nan):
    x = np.random.default_rng(0).normal(size=(ROWS, D)).astype(np.float32)
    for r in bad_rows:
        x[r, 3] = value
    path = tmp_path / "acts.npy"
    np.save(path, x)
    return path


def _train(repo_root, config) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", config], cwd=repo_root,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    return proc.returncode, lines[0]


def _row_at_step(path, step: int, row: int = 5) -> int:
    """The file row that lands in the batch of training step `step` (1-based; one init batch first)."""
    src = NpySource(DataConfig(source="npy", path=str(path), eval_fraction=0.05), BATCH, seed=0)
    return int(src.rows(step)[row])


@pytest.mark.parametrize("value,word", [(np.nan, "NaN"), (np.inf, "an infinity"), (3e30, "too large for float32")])
def test_a_bad_row_stops_the_run_naming_file_row_and_step(tmp_path, repo_root, value, word):
    clean = _acts(tmp_path)
    bad = _row_at_step(clean, 7)
    acts = _acts(tmp_path, [bad], value)
    code, line = _train(repo_root, _config(tmp_path, acts))
    assert code == 2
    assert line.startswith("error: bad data, not the optimisation")
    assert f"{acts} row {bad} " in line and word in line and "step 7" in line
    # the fault at step 7 came before the checkpoint of step 10: only step 5's was written, and named
    assert "checkpoints/5" in line
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["5"]


def test_a_bad_row_in_the_first_batch_is_caught_before_training(tmp_path, repo_root):
    clean = _acts(tmp_path)
    bad = _row_at_step(clean, 0, row=9)  # batch 0 estimates the input norm and b_dec
    code, line = _train(repo_root, _config(tmp_path, _acts(tmp_path, [bad])))
    assert code == 2 and f"row {bad} " in line and "NaN" in line and "batch 0, row 9" in line
    assert not (tmp_path / "run" / "checkpoints" / "5").exists()


def test_a_bad_held_out_row_is_named(tmp_path, repo_root):
    held_out = ROWS - int(ROWS * 0.05) + 10  # within the first eval_tokens held-out rows
    code, line = _train(repo_root, _config(tmp_path, _acts(tmp_path, [held_out])))
    assert code == 2 and f"row {held_out} " in line and "held out" in line


def test_a_diverging_learning_rate_is_blamed_on_the_optimisation(tmp_path, repo_root):
    code, line = _train(repo_root, _config(tmp_path, _acts(tmp_path), lr=1e6))
    assert code == 2
    assert "optimisation failed, not the data" in line and "train.lr (now 1e+06)" in line
    assert "step 1:" in line or "step 2" in line or "step 1 " in line
    assert "last good checkpoint: none written yet" in line
    assert not any(p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_the_first_fault_is_kept():
    f = health.healthy()
    x = jnp.ones((4, 3)).at[2, 1].set(jnp.nan)
    one = jnp.float32(1.0)
    f = health.update_fault(f, jnp.int32(0), jnp.ones((4, 3)), one, one, one)
    assert health.read_fault(f) is None
    f = health.update_fault(f, jnp.int32(3), x, one, one, one)
    assert health.read_fault(f) == (3, health.NAN_INPUT, 2)
    f = health.update_fault(f, jnp.int32(4), jnp.ones((4, 3)), jnp.float32(jnp.inf), one, one)
    assert health.read_fault(f) == (3, health.NAN_INPUT, 2)
    g = health.update_fault(health.healthy(), jnp.int32(5), jnp.ones((4, 3)), one, jnp.float32(jnp.nan), one)
    assert health.read_fault(g) == (5, health.NONFINITE, 0)
    h = health.update_fault(health.healthy(), jnp.int32(6), jnp.ones((4, 3)), one, one, jnp.float32(1e9))
    assert health.read_fault(h) == (6, health.DIVERGED_CAUSE, 0)


def test_a_file_that_is_not_npy_is_named(tmp_path, repo_root):
    acts = tmp_path / "acts.npy"
    acts.write_text("0.1, 0.2, 0.3\n")
    code, line = _train(repo_root, _config(tmp_path, acts))
    assert code == 2 and str(acts) in line and "not a .npy file" in line and "numpy.save" in line


def test_an_overflowing_row_is_bad_input_on_the_device():
    one = jnp.float32(1.0)
    x = jnp.ones((4, 3)).at[1, 0].set(3e30)  # finite, but its square is not
    f = health.update_fault(health.healthy(), jnp.int32(2), x, one, one, one)
    assert health.read_fault(f) == (2, health.HUGE_INPUT, 1)
