"""`launch/train.py`: bad input gives one line on stderr and a non-zero exit; a good run prints its metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import subprocess_env

TINY = {
    "data": {"source": "synthetic", "synthetic": {"n_features": 32, "d_in": 8, "p_active": 0.1}},
    "dictionary": {"activation": "topk", "d_sae": 32, "k": 4},
    "train": {"tokens": 128 * 10, "batch_size": 128, "init_batches": 1, "lr_warmup_steps": 2},
    "output": {"log_every": 5, "checkpoint_every": 5, "eval_tokens": 256, "progress": False},
}


_env = subprocess_env


def run_cli(repo_root, *args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/train.py", *args], cwd=repo_root, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path, raw=None, **sections) -> str:
    raw = json.loads(json.dumps(raw or TINY))
    raw["output"]["dir"] = str(tmp_path / "run")
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_unknown_key_suggests_the_right_one(tmp_path, repo_root):
    raw = json.loads(json.dumps(TINY))
    raw["dictionary"]["activaton"] = raw["dictionary"].pop("activation")
    proc = run_cli(repo_root, "--config", write_config(tmp_path, raw))
    line = assert_one_line_error(proc, "dictionary.activaton", "unknown key", "did you mean")
    # the suggestion is the full key, ready to paste back
    assert "dictionary.activation" in line, line


def test_k_larger_than_d_sae(tmp_path, repo_root):
    proc = run_cli(repo_root, "--config", write_config(tmp_path, dictionary={"k": 64, "d_sae": 32}))
    assert_one_line_error(proc, "dictionary.k", "64", "d_sae=32")


def test_k_larger_than_d_sae_from_expansion(tmp_path, repo_root):
    # d_sae = d_in * expansion = 8 * 2 = 16 is only known once the data is open
    raw = json.loads(json.dumps(TINY))
    del raw["dictionary"]["d_sae"]
    raw["dictionary"].update(expansion=2, k=20)
    proc = run_cli(repo_root, "--config", write_config(tmp_path, raw))
    assert_one_line_error(proc, "k=20", "d_sae=16")


def test_negative_lr(tmp_path, repo_root):
    proc = run_cli(repo_root, "--config", write_config(tmp_path, train={"lr": -1e-3}))
    assert_one_line_error(proc, "train.lr", "must be > 0")


def test_bad_override_value(tmp_path, repo_root):
    proc = run_cli(repo_root, "--config", write_config(tmp_path), "--set", "train.lr=fast")
    assert_one_line_error(proc, "train.lr", "expected a number")


def test_missing_data_file(tmp_path, repo_root):
    missing = tmp_path / "no_such_acts.npy"
    proc = run_cli(repo_root, "--config", write_config(tmp_path, data={"source": "npy", "path": str(missing)}))
    assert_one_line_error(proc, "no_such_acts.npy", "not found")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_config_file(tmp_path, repo_root):
    proc = run_cli(repo_root, "--config", str(tmp_path / "nope.yaml"))
    assert_one_line_error(proc, "nope.yaml", "not found")


def test_successful_run_prints_final_metrics(tmp_path, repo_root):
    proc = run_cli(repo_root, "--config", write_config(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    final_lines = [l for l in proc.stdout.splitlines() if l.startswith("final:")]
    assert len(final_lines) == 1, proc.stdout
    fields = dict(kv.split("=") for kv in final_lines[0][len("final:"):].split())
    for key in ("explained_variance", "mse", "cossim", "l0", "frac_alive", "mmcs"):
        assert np.isfinite(float(fields[key])), key
    assert float(fields["l0"]) <= 4.0 + 1e-6
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["final"] is True
    assert float(fields["mse"]) == pytest.approx(last["mse"], rel=1e-3)
    assert (tmp_path / "run" / "export" / "saelens" / "sae_weights.safetensors").is_file()

    # the same directory again without --resume: one line pointing at --resume
    again = run_cli(repo_root, "--config", write_config(tmp_path))
    assert_one_line_error(again, "--resume")


def test_json_output(tmp_path, repo_root):
    proc = run_cli(repo_root, "--config", write_config(tmp_path), "--json", "--set", "dictionary.k=2")
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["final"] is True and final["step"] == 10
    assert final["l0"] <= 2.0 + 1e-6
