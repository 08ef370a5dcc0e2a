"""Small builders shared by the tests."""

from __future__ import annotations

import os

from jaxinterp.config import Config, config_from_dict


def tiny_config(tmp_path, **sections) -> Config:
    """A fast synthetic config; `sections` override nested keys, e.g. dictionary={"activation": "relu"}."""
    raw = {
        "data": {"source": "synthetic", "synthetic": {"n_features": 64, "d_in": 16, "p_active": 0.05}},
        "dictionary": {"activation": "topk", "d_sae": 64, "k": 4, "dead_tokens": 4096},
        "train": {"tokens": 256 * 40, "batch_size": 256, "lr": 1e-3, "lr_warmup_steps": 5, "init_batches": 1},
        "output": {"dir": str(tmp_path / "run"), "log_every": 10, "checkpoint_every": 10, "eval_tokens": 1024,
                   "progress": False},
    }
    for section, values in sections.items():
        node = raw.setdefault(section, {})
        for k, v in values.items():
            if isinstance(v, dict):
                node.setdefault(k, {}).update(v)
            else:
                node[k] = v
    return config_from_dict(raw)


def subprocess_env() -> dict:
    """Environment for `launch/*.py` subprocesses: CPU, and the launch scripts' own device count
    (XLA_FLAGS from the test process dropped), so interrupted and uninterrupted runs match."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONWARNINGS"] = "ignore"
    return env
