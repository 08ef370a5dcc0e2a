"""Run a harvest or a training job on a Slurm GPU cluster, one process per GPU:
`python launch/pod/slurm.py --nodes 2 --gpus-per-node 8 --config configs/default.yaml --output DIR
[--set k=v ...] [--job train|harvest] [--setup "source ~/venv/bin/activate"] [--dry-run]`.

Writes a batch script (`--script`, default `jaxinterp-JOB.sbatch`) whose `srun` starts one task per
GPU, each a JAX process that `--distributed auto` binds to its GPU, and submits it with `sbatch`.
DIR must be storage every node mounts at the same path. `--dry-run` prints the script and the
`sbatch` command instead of writing and submitting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from jaxinterp import pod  # noqa: E402
from jaxinterp.cli import run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--cpus-per-task", type=int, default=8)
    ap.add_argument("--time", default="04:00:00", help="the job's time limit, HH:MM:SS")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--setup", help="a shell line run first on each node, e.g. 'source ~/venv/bin/activate'")
    ap.add_argument("--script", help="where to write the batch script (default jaxinterp-JOB.sbatch)")
    pod.add_job_arguments(ap)
    args = ap.parse_args()
    job = pod.job_from_args(args)
    text = pod.slurm_script(job, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                            time=args.time, partition=args.partition, account=args.account, setup=args.setup,
                            workdir=str(REPO), name=f"jaxinterp-{args.job}")
    script = args.script or f"jaxinterp-{args.job}.sbatch"
    submit = ["sbatch", script]
    if args.dry_run:
        print(text, end="")
        print(pod.shell(submit))
        return 0
    Path(script).write_text(text)
    print(f"wrote {script}", flush=True)
    pod.run_commands([submit], dry_run=False)
    return 0


if __name__ == "__main__":
    run_main(main)
