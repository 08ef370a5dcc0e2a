"""Train a sparse dictionary: `python launch/train.py --config configs/toy.yaml [--set k=v ...] [--resume]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import configure_host_devices, run_main  # noqa: E402

configure_host_devices()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-3")
    ap.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    ap.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    args = ap.parse_args()

    from jaxinterp.config import load_config
    from jaxinterp.train import summary_line, train

    cfg = load_config(args.config, args.set)
    # stderr carries only a failure's one line; progress lines go to stdout unless it holds JSON.
    final = train(cfg, resume=args.resume, log=(lambda s: None) if args.json else (lambda s: print(s, flush=True)))
    if args.json:
        print(json.dumps(final))
    else:
        print(summary_line(final))
        print(f"run directory: {cfg.output.dir} (metrics.jsonl, checkpoints/, dictionary/, export/)")
    return 0


if __name__ == "__main__":
    run_main(main)
