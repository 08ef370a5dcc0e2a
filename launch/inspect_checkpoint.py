"""Print what a run directory, a checkpoint or a dictionary artifact holds, without loading arrays or
the training code: `python launch/inspect_checkpoint.py PATH [--json]` (array names, shapes, dtypes
and saved shardings, the step, each process's data position, the config and the dictionary's
description). Not `inspect.py`: a file of that name in launch/ would stand in for the standard
library's `inspect` in every script of the folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path", help="a run directory, RUN/checkpoints/STEP, or a dictionary artifact directory")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    from jaxinterp.interop.contents import describe, format_human

    d = describe(args.path)
    print(json.dumps(d) if args.json else format_human(d))
    return 0


if __name__ == "__main__":
    run_main(main)
