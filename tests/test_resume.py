"""Kill a training process with SIGKILL, `--resume` it, and get the uninterrupted run's weights.

Real subprocesses of `launch/train.py`. Both runs see the same single CPU device (XLA_FLAGS unset),
since the result of a run depends on its device count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxinterp.config import SyntheticConfig
from jaxinterp.data import write_npy
from jaxinterp.dictionaries import load_dictionary
from helpers import subprocess_env

STEPS = 400


_env = subprocess_env


def _config(tmp_path: Path, name: str, data: dict, steps: int = STEPS, **dictionary) -> str:
    raw = {
        "data": data,
        "dictionary": {"activation": "topk", "d_sae": 64, "k": 4, "dead_tokens": 2048, **dictionary},
        "train": {"tokens": 256 * steps, "batch_size": 256, "lr": 1e-3, "lr_warmup_steps": 10, "init_batches": 2},
        "output": {"dir": str(tmp_path / name), "log_every": 10, "checkpoint_every": 20, "eval_tokens": 1024,
                   "progress": False},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def _run(repo_root, config, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", config, *extra], cwd=repo_root,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _checkpoint_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())


def _kill_after_first_checkpoint(repo_root, config, run_dir: Path, delay: float) -> None:
    """Start a run, SIGKILL it `delay` s after its first finished checkpoint."""
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", config], cwd=repo_root, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not _checkpoint_steps(run_dir):
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run finished before it could be killed; raise STEPS"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    steps = _checkpoint_steps(run_dir)
    assert steps and steps[-1] < STEPS, steps  # killed part-way
    assert not (run_dir / "export").exists() and not (run_dir / "dictionary").exists()


def _metric_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for l in lines:
        for k in ("tokens_per_s", "loop_tokens_per_s", "seconds"):  # wall-clock, differs between runs
            l.pop(k, None)
    return lines


def _assert_same_run(a: Path, b: Path) -> None:
    da, db = load_dictionary(a), load_dictionary(b)  # the runs' artifacts
    assert da.spec == db.spec and da.params.keys() == db.params.keys()
    for k in da.params:
        assert np.array_equal(np.asarray(da.params[k]), np.asarray(db.params[k])), k
    if (a / "export" / "saelens").is_dir():
        wa = load_file(str(a / "export" / "saelens" / "sae_weights.safetensors"))
        wb = load_file(str(b / "export" / "saelens" / "sae_weights.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert np.array_equal(wa[k], wb[k]), k
    la, lb = _metric_lines(a), _metric_lines(b)
    assert la[-1]["final"] is True and la[-1]["step"] == STEPS
    assert lb[-1] == la[-1]  # the final evaluation, exactly
    assert lb == la  # and every training line, once, in order


def _resume_case(tmp_path, repo_root, data: dict, delay: float, **dictionary):
    cfg_a = _config(tmp_path, "a", data, **dictionary)
    cfg_b = _config(tmp_path, "b", data, **dictionary)
    _run(repo_root, cfg_a)
    _kill_after_first_checkpoint(repo_root, cfg_b, tmp_path / "b", delay)
    proc = _run(repo_root, cfg_b, "--resume")
    assert "resumed from step" in proc.stdout
    assert "final:" in proc.stdout
    _assert_same_run(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow  # slow: the npy case runs the same indexed-source resume in the default run
def test_sigkill_then_resume_matches_uninterrupted_synthetic(tmp_path, repo_root):
    data = {"source": "synthetic", "synthetic": {"n_features": 64, "d_in": 16, "p_active": 0.05, "seed": 7}}
    _resume_case(tmp_path, repo_root, data, delay=0.4)


def test_sigkill_then_resume_matches_uninterrupted_npy(tmp_path, repo_root):
    # 8000 rows, 2% held out: 7840 train rows = 30.6 batches per epoch, so 400 steps cross 13 epochs
    # and the kill lands mid-epoch; resuming must restore grain's position and the epoch's order.
    acts, dirs = write_npy(str(tmp_path / "acts.npy"), SyntheticConfig(n_features=64, d_in=16, p_active=0.05, seed=3),
                           8000, seed=1)
    data = {"source": "npy", "path": acts, "true_directions": dirs}
    _resume_case(tmp_path, repo_root, data, delay=0.25)
    assert "mmcs" in _metric_lines(tmp_path / "b")[-1]


@pytest.mark.slow  # slow: the npy and CLT cases run in the default suite
def test_sigkill_then_resume_matches_uninterrupted_skip_transcoder(tmp_path, repo_root):
    # input and target rows from two files; the resumed run's skip transcoder equals the other's
    x, _ = write_npy(str(tmp_path / "x.npy"), SyntheticConfig(n_features=64, d_in=16, p_active=0.05, seed=3), 8000,
                     seed=1)
    xs = np.load(x)
    np.save(tmp_path / "y.npy", (np.tanh(xs[:, :12]) + 0.1 * xs[:, 4:]).astype(np.float32))
    data = {"source": "npy", "path": x, "target_path": str(tmp_path / "y.npy")}
    _resume_case(tmp_path, repo_root, data, delay=0.25, architecture="skip_transcoder")
    d = load_dictionary(tmp_path / "b")
    assert (d.d_in, d.d_out) == (16, 12) and np.abs(np.asarray(d.params["W_skip"])).max() > 0


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, repo_root):
    data = {"source": "synthetic", "synthetic": {"n_features": 32, "d_in": 8, "p_active": 0.1}}
    cfg = _config(tmp_path, "c", data, steps=60)
    proc = _run(repo_root, cfg, "--resume")
    assert "no checkpoint" in proc.stdout and "starting from scratch" in proc.stdout
    assert _checkpoint_steps(tmp_path / "c")[-1] == 60
    last = _metric_lines(tmp_path / "c")[-1]
    assert last["final"] is True and last["step"] == 60
    assert (tmp_path / "c" / "export" / "saelens" / "sae_weights.safetensors").is_file()
    # a second --resume of the finished run: nothing left to train, same final result
    proc = _run(repo_root, cfg, "--resume")
    assert _metric_lines(tmp_path / "c")[-1] == last
    assert len([l for l in _metric_lines(tmp_path / "c") if l.get("final")]) == 1


@pytest.mark.slow  # the npy SIGKILL resume runs by default; this repeats it for a CLT
def test_sigkill_then_resume_matches_uninterrupted_clt(tmp_path, repo_root):
    """A cross-layer transcoder on live activations of a tiny 3-layer model: the killed and resumed
    run ends with the uninterrupted run's CLT, metrics and final evaluation."""
    from helpers import write_corpus, write_tiny_gguf

    pytest.importorskip("gguf")
    write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=3)
    write_corpus(tmp_path / "corpus")
    raw = yaml.safe_load((Path(repo_root) / "configs" / "clt_tiny.yaml").read_text())
    raw["data"] |= {"model": str(tmp_path / "tiny.gguf"), "corpus": str(tmp_path / "corpus")}
    raw["train"]["tokens"] = 64 * STEPS
    raw["output"] |= {"log_every": 10, "checkpoint_every": 20}
    configs = []
    for name in ("a", "b"):
        raw["output"]["dir"] = str(tmp_path / name)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        configs.append(str(tmp_path / f"{name}.yaml"))
    _run(repo_root, configs[0])
    _kill_after_first_checkpoint(repo_root, configs[1], tmp_path / "b", 0.5)
    proc = _run(repo_root, configs[1], "--resume")
    assert "resumed from step" in proc.stdout
    _assert_same_run(tmp_path / "a", tmp_path / "b")


def test_a_checkpoint_from_a_4x2_mesh_resumes_on_one_device_and_on_2x4(tmp_path):
    """The checkpoint holds the arrays, not the mesh: restored onto another mesh's shardings (an
    explicit sharded target), the run ends with the weights the (4, 2) run ends with."""
    import shutil

    from jaxinterp.config import config_from_dict
    from jaxinterp.train import train

    def raw(name: str, data: int, model: int) -> dict:
        return {"data": {"source": "synthetic", "synthetic": {"n_features": 128, "d_in": 16}},
                "dictionary": {"activation": "topk", "d_sae": 64, "k": 4, "dead_tokens": 4096},
                "train": {"tokens": 64 * 20, "batch_size": 64, "lr": 1e-3, "lr_warmup_steps": 2},
                "mesh": {"data": data, "model": model},
                "output": {"dir": str(tmp_path / name), "log_every": 5, "checkpoint_every": 10, "eval_tokens": 256,
                           "progress": False}}

    train(config_from_dict(raw("whole", 4, 2)), log=lambda s: None)
    want = load_dictionary(tmp_path / "whole").params
    for name, (data, model) in {"one": (1, 1), "other": (2, 4)}.items():
        shutil.copytree(tmp_path / "whole", tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "20")
        shutil.rmtree(tmp_path / name / "dictionary")
        final = train(config_from_dict(raw(name, data, model)), resume=True, log=lambda s: None)
        assert final["step"] == 20
        got = load_dictionary(tmp_path / name).params
        for k in want:
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5,
                                       atol=1e-6 * float(np.abs(np.asarray(want[k])).max()), err_msg=f"{name} {k}")
