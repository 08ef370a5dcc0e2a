"""Write a model's activations at a site to an on-disk cache:
`python launch/harvest.py --config configs/cache.yaml --out runs/cache [--contexts N] [--dtype float16] [--force]`.

Reads the config's `data` section (model, corpus, site, context_length, chunk_contexts,
eval_fraction) and `train.seed`; for a CLT config (`dictionary.architecture: clt`), every covered
layer's input site and mlp_out, side by side in each row, from one forward. Re-running the same command continues after the last completed
chunk. Train on the result with `data.source: cache`, `data.path: DIR`.

On several processes run the same command on each with `--distributed auto` or `--coordinator
HOST:PORT --num-processes N --process-id I`: each computes its share of the chunks, and the files
are those of a one-process harvest (see the README's pod section).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp import distributed  # noqa: E402
from jaxinterp.cli import configure_host_devices, run_main  # noqa: E402

configure_host_devices()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="YAML config whose data section names model, corpus and site")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. data.site=blocks.6.resid_post")
    ap.add_argument("--out", required=True, help="cache directory (chunk_*.npy and manifest.json)")
    ap.add_argument("--contexts", type=int, help="train contexts to harvest (default: all of them)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="stored dtype")
    ap.add_argument("--force", action="store_true", help="delete a cache already in --out and start over")
    distributed.add_arguments(ap)
    args = ap.parse_args()
    distributed.initialize(distributed.requested(args))  # before any other JAX call

    from jaxinterp.config import load_config
    from jaxinterp.data.cache import harvest

    cfg = load_config(args.config, args.set)
    manifest = harvest(cfg, args.out, contexts=args.contexts, dtype=args.dtype, force=args.force)
    if not distributed.is_primary():
        return 0
    rows = sum(c["n_rows"] for c in manifest["chunks"])
    sites = manifest["sites"]
    sites = " -> ".join(sites) if len(sites) <= 2 else f"{len(sites)} sites ({sites[0]} ... {sites[-1]})"
    print(f"cache: {rows:,} rows x {manifest['d_model']} ({manifest['dtype']}) of {sites} in "
          f"{len(manifest['chunks'])} chunks at {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
