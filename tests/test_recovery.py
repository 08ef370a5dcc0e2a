"""Ground-truth recovery: dictionaries trained on toy superposition find the true directions.

`mmcs` is the mean over true directions of the best cosine similarity with a decoder row. The true
directions here use `data.synthetic.seed: 1`, the parameters `train.seed: 0`: when the two seeds are
equal and d_sae >= n_features the initial decoder already holds the ground truth (see
`test_initial_dictionary_is_not_the_ground_truth`).

Figures seen on CPU (n_features 256, d_in 48, p_active 0.015, uniform magnitudes, batch 1024):
  topk       d_sae 512, k 4, 2000 steps:                     mmcs 0.9985 (npy via launch/train.py: 0.9985)
  batchtopk  d_sae 512, k 4, 2000 steps:                     mmcs 0.9974, l0 3.96 (0.9962 with a per-row
             warm-up of 0.8, 0.9933 with 0.5; 0.82-0.86 selecting across the batch from the first step)
  jumprelu   d_sae 512, l0_coefficient 1, 3000 steps:        mmcs 0.953-0.961
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from jaxinterp.config import SyntheticConfig, config_from_dict
from jaxinterp.data import make_source, write_npy
from jaxinterp.evals import mmcs
from jaxinterp.train import train
from jaxinterp.train.step import init_state, make_spec
from helpers import subprocess_env

TOY = {"n_features": 256, "d_in": 48, "p_active": 0.015, "seed": 1}


def _config(tmp_path, *, activation, steps, d_sae, synthetic=None, batch=1024, lr=1e-3, train=None, **dictionary):
    return config_from_dict({
        "data": {"source": "synthetic", "synthetic": synthetic or TOY},
        "dictionary": {"activation": activation, "d_sae": d_sae, "dead_tokens": 50_000, **dictionary},
        "train": {"tokens": batch * steps, "batch_size": batch, "lr": lr, "lr_warmup_steps": 20, "init_batches": 1,
                  **(train or {})},
        "output": {"dir": str(tmp_path / "run"), "log_every": 500, "checkpoint_every": 100_000, "eval_tokens": 8192,
                   "progress": False, "export_saelens": False},
    })


def _recover(tmp_path, **kw) -> dict:
    final = train(_config(tmp_path, **kw), log=lambda s: None)
    print(f"{kw['activation']}: mmcs={final['mmcs']:.4f} explained_variance={final['explained_variance']:.4f} "
          f"l0={final['l0']:.2f} frac_alive={final['frac_alive']:.3f}")
    return final


@pytest.mark.parametrize("d_sae", [256, 512])
def test_initial_dictionary_is_not_the_ground_truth(tmp_path, d_sae):
    """With every seed at its default, the untrained dictionary must not already hold the answer
    (d_sae 512 too: JAX's partitionable threefry makes normal(key, (512, D))[:256] equal
    normal(key, (256, D)), so a larger dictionary contains the true directions as well)."""
    cfg = config_from_dict({
        "data": {"source": "synthetic", "synthetic": {"n_features": 256, "d_in": 48}},
        "dictionary": {"activation": "topk", "d_sae": d_sae, "k": 4},
        "train": {"batch_size": 256, "tokens": 256, "init_batches": 1},
    })
    src = make_source(cfg)
    state = init_state(cfg, make_spec(cfg, src.d_in), [next(src)])
    # random unit vectors in 48 dimensions: best match among 256 is ~0.45 on average
    assert mmcs(src.true_directions, state.params["W_dec"]) < 0.7


def test_topk_recovers_small_toy(tmp_path):
    """The fast one: 128 directions in 32 dimensions."""
    final = _recover(tmp_path, activation="topk", steps=800, d_sae=256, k=3, batch=512, lr=3e-3,
                     synthetic={"n_features": 128, "d_in": 32, "p_active": 0.02, "seed": 1})
    assert final["mmcs"] >= 0.97  # 0.998 seen (0.995, 0.998 with train.seed 2, 3)
    assert final["explained_variance"] >= 0.8


@pytest.mark.slow
def test_topk_recovers_toy(tmp_path):
    final = _recover(tmp_path, activation="topk", steps=2000, d_sae=512, k=4)
    assert final["mmcs"] >= 0.99  # 0.9985 seen (also with train.seed 2)
    assert final["l0"] <= 4.0


@pytest.mark.slow
def test_batchtopk_recovers_toy(tmp_path):
    final = _recover(tmp_path, activation="batchtopk", steps=2000, d_sae=512, k=4)
    # 0.9974 (l0 3.96) seen with the default per-row warm-up over the first 90% of the steps
    assert final["mmcs"] >= 0.98
    assert final["l0"] == pytest.approx(4.0, rel=0.15)  # the inference threshold keeps the trained L0


@pytest.mark.slow
def test_jumprelu_recovers_toy(tmp_path):
    # JumpReLU's threshold gradients at l0_coefficient 1 need the clipping the project no longer
    # sets by default (issue 10's optimizer defaults): without it mmcs 0.699, with it 0.955
    final = _recover(tmp_path, activation="jumprelu", steps=3000, d_sae=512, l0_coefficient=1.0,
                     jumprelu_init_threshold=0.5, train={"grad_clip": 1.0})
    # 0.961 seen (0.953 with train.seed 2) with the earlier defaults; 0.955 with these
    assert final["mmcs"] >= 0.94
    assert final["l0"] < 6


_env = subprocess_env


@pytest.mark.slow
def test_acceptance_topk_recovers_hidden_directions_from_npy(tmp_path, repo_root):
    """The issue's acceptance path: an activation file with hidden ground truth, trained through
    `launch/train.py`, recovers the directions with mmcs >= 0.98."""
    acts, dirs = write_npy(str(tmp_path / "acts.npy"), SyntheticConfig(**TOY), 262_144, seed=5)
    raw = {
        "data": {"source": "npy", "path": acts, "true_directions": dirs, "eval_fraction": 0.03},
        "dictionary": {"activation": "topk", "d_sae": 512, "k": 4, "dead_tokens": 50_000},
        "train": {"tokens": 1024 * 2000, "batch_size": 1024, "lr": 1e-3, "lr_warmup_steps": 20},
        "output": {"dir": str(tmp_path / "run"), "log_every": 500, "checkpoint_every": 1000, "eval_tokens": 8192,
                   "progress": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(tmp_path / "cfg.yaml")],
                          cwd=repo_root, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "mmcs=" in proc.stdout
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"acceptance (npy, topk): mmcs={final['mmcs']:.4f} explained_variance={final['explained_variance']:.4f}")
    assert final["final"] is True
    assert final["mmcs"] >= 0.98
    assert np.isfinite(final["explained_variance"]) and final["explained_variance"] > 0.8
