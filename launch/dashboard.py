"""Feature dashboards of a trained dictionary, as a static site that opens from disk:

    python launch/dashboard.py --dictionary runs/default --corpus shakespeare --tokens 100000 --out dash/ \
        [--features 0-99,512] [--neuronpedia np/] [--delphi latents/] [--json]

Reads `--tokens` corpus tokens through the model up to the dictionary's site, keeps every feature's
top contexts, a random sample per activation band, its firing density and histogram, and writes
`dash/index.html` (every feature, sortable, searchable) and `dash/f/{id}.html` (a page per feature,
with its logit effects and the `launch/generate.py` lines that steer with it). A killed run resumes
where it was (`dash/pass/`). `--neuronpedia DIR` also writes the batch JSON files Neuronpedia
imports; `--delphi DIR` the sparse activation cache in delphi's layout (DIR/{site}/*.safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import run_main  # noqa: E402


def main() -> int:
    from jaxinterp.features.dashboard import DashboardSettings

    d = DashboardSettings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dictionary", required=True, help="a run directory or a dictionary directory")
    ap.add_argument("--out", required=True, help="the site's folder")
    ap.add_argument("--corpus", default=d.corpus, help="shakespeare, a folder of .txt files or a .jsonl")
    ap.add_argument("--tokens", type=int, default=d.tokens)
    ap.add_argument("--context-length", type=int, default=d.context_length)
    ap.add_argument("--features", default="all", help="all, or ids and ranges: 0-99,512")
    ap.add_argument("--model", help="the model (default: the one the dictionary was trained on)")
    ap.add_argument("--top", type=int, default=d.k, help="top contexts per feature")
    ap.add_argument("--samples", type=int, default=d.samples, help="random firing tokens per feature")
    ap.add_argument("--quantiles", type=int, default=d.n_quantiles, help="activation bands of the samples")
    ap.add_argument("--batch-contexts", type=int, default=d.batch_contexts)
    ap.add_argument("--max-active", type=int, default=d.max_active)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--no-cofiring", action="store_true", help="skip the table of features each fires with")
    ap.add_argument("--neuronpedia", help="also write Neuronpedia batch files into this folder")
    ap.add_argument("--delphi", help="also write delphi's activation cache into this folder")
    ap.add_argument("--delphi-splits", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print the run's summary as one JSON object")
    args = ap.parse_args()

    from jaxinterp.errors import UsageError
    from jaxinterp.features.dashboard import build_dashboard, describe

    for name in ("tokens", "context_length", "top", "samples", "quantiles", "batch_contexts", "max_active"):
        if getattr(args, name) < (2 if name == "context_length" else 1):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: give a positive number")
    settings = DashboardSettings(corpus=args.corpus, tokens=args.tokens, context_length=args.context_length,
                                 seed=args.seed, k=args.top, samples=args.samples, n_quantiles=args.quantiles,
                                 batch_contexts=args.batch_contexts, max_active=args.max_active,
                                 cofiring=not args.no_cofiring)
    log = (lambda s: None) if args.json else (lambda s: print(s, flush=True))
    summary = build_dashboard(args.dictionary, args.out, settings, features=args.features, model_name=args.model,
                              neuronpedia=args.neuronpedia, delphi=args.delphi, delphi_splits=args.delphi_splits,
                              log=log)
    print(json.dumps(summary) if args.json else "\n".join(describe(summary)))
    return 0


if __name__ == "__main__":
    run_main(main)
