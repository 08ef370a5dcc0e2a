"""Run a harvest or a training job on a GKE TPU cluster through xpk:
`python launch/pod/xpk.py --cluster NAME --workload NAME --tpu-type v5litepod-64 --config configs/default.yaml
--output DIR [--set k=v ...] [--job train|harvest] [--num-slices N] [--dry-run]`.

Builds the workload's image from `--base-image` with this repository copied in (xpk's
`--base-docker-image` and `--script-dir`), and runs the job on every host with `--distributed
auto`. DIR must be storage every pod mounts at the same path. `--dry-run` prints the command.
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
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--workload", required=True, help="a name for this job (lower case, digits, -)")
    ap.add_argument("--tpu-type", required=True, help="e.g. v5litepod-64 (a v5e-64 slice)")
    ap.add_argument("--num-slices", type=int, default=1)
    ap.add_argument("--base-image", default="python:3.11-slim")
    ap.add_argument("--project")
    ap.add_argument("--zone")
    pod.add_job_arguments(ap)
    args = ap.parse_args()
    job = pod.job_from_args(args)
    cmd = pod.xpk_command(args.cluster, args.workload, args.tpu_type, job, num_slices=args.num_slices,
                          base_image=args.base_image, script_dir=str(REPO), project=args.project, zone=args.zone)
    pod.run_commands([cmd], dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    run_main(main)
