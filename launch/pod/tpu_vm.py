"""Run a harvest or a training job on every worker of a Cloud TPU VM slice:
`python launch/pod/tpu_vm.py --tpu NAME --zone ZONE --config configs/default.yaml --output DIR [--set k=v ...]
[--job train|harvest] [--resume] [--dry-run]`.

Packs this repository, copies it to every worker (`gcloud compute tpus tpu-vm scp --worker=all`),
then on all workers at once installs it and runs the job with `--distributed auto`
(`gcloud compute tpus tpu-vm ssh --worker=all --command ...`). DIR must be storage every worker
mounts at the same path (Filestore, or a bucket mounted with gcsfuse). `--dry-run` prints the
commands instead of running them.
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
    ap.add_argument("--tpu", required=True, help="the TPU VM's name (gcloud compute tpus tpu-vm list)")
    ap.add_argument("--zone", required=True)
    ap.add_argument("--project")
    ap.add_argument("--no-install", action="store_true", help="the workers already have the packages")
    pod.add_job_arguments(ap)
    args = ap.parse_args()
    job = pod.job_from_args(args)
    cmds = pod.tpu_vm_commands(args.tpu, args.zone, job, project=args.project, install=not args.no_install,
                               repo=str(REPO))
    pod.run_commands(cmds, dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    run_main(main)
