"""Print what a run directory, a checkpoint or a dictionary artifact holds, without loading arrays or
the training code: `python launch/inspect.py PATH [--json]` (array names, shapes, dtypes and saved
shardings, the step, each process's data position, the config and the dictionary's description)."""

from __future__ import annotations

import os
import sys

# This file's name is the standard library's `inspect`: its folder must leave the import path
# before anything imports that module.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402

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
