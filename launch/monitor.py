"""Feature drift of a trained dictionary's site over text, against a baseline:

    python launch/monitor.py baseline --dictionary RUN_DIR [--corpus shakespeare] [--contexts 64] --out BASE_DIR
    python launch/monitor.py report --baseline BASE_DIR --dictionary RUN_DIR --corpus python-docs [--contexts 16]
        [--json] [--metrics-port PORT]

`baseline` folds the dictionary's features over the train split of a corpus into statistics saved
with Orbax. `report` computes the same statistics over other text (the held-out split when it is the
baseline's own corpus) and prints the drift report per site: frequency KL against the baseline,
shifted, dead, newly dead and newly active features, the most frequent features. The model, site
and context length come from the run's config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.errors import UsageError  # noqa: E402
from jaxinterp.cli import run_main  # noqa: E402


def _contexts(corpus: str, tokenizer, context_length: int, eval_fraction: float, split: str, n: int, seed: int):
    import numpy as np

    from jaxinterp.data.corpus import corpus_documents, held_out_contexts, split_documents, token_contexts

    train, held = split_documents(corpus_documents(corpus), eval_fraction)
    if split == "train":
        ctx = token_contexts(train, tokenizer, context_length)
        ctx = ctx[np.random.default_rng(seed).permutation(len(ctx))]
    elif split == "held_out":
        ctx = held_out_contexts(train, held, tokenizer, context_length)
    else:
        ctx = token_contexts(train + held, tokenizer, context_length)
    return ctx[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("baseline", help="feature statistics over a corpus, saved as a baseline")
    r = sub.add_parser("report", help="drift of other text against a baseline")
    for p in (b, r):
        p.add_argument("--dictionary", required=True,
                       help="a run directory written by launch/train.py, or a dictionary directory")
        p.add_argument("--corpus", default=None, help="shakespeare, python-docs, a folder of .txt, or a .jsonl")
        p.add_argument("--contexts", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    r.add_argument("--baseline", required=True)
    r.add_argument("--json", action="store_true")
    r.add_argument("--shift-threshold", type=float, default=3.0)
    r.add_argument("--metrics-port", type=int, default=None, help="also publish the report as Prometheus metrics")
    args = ap.parse_args()

    from jaxinterp.config import load_config
    from jaxinterp.models import load_model
    from jaxinterp.monitor import drift
    from jaxinterp.monitor.baseline import corpus_stats, load_baseline, save_baseline
    from jaxinterp.config import Config, DataConfig
    from jaxinterp.dictionaries import DictionaryError, load_site_dictionary

    run = Path(args.dictionary)
    d = load_site_dictionary(run, use="monitoring")
    cfg = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else Config(
        data=DataConfig(source="model", model=d.model or "smollm2-135m", site=d.site))
    site = d.site
    if site is None:
        raise DictionaryError(f"{run}: the dictionary names no model site; drift needs one")
    spec, params = d.spec, d.params
    model_name = d.model or cfg.data.model
    model, tok = load_model(model_name)
    d.check_model(model.cfg.d_model, model.cfg.n_layers, model=f"model {model_name!r}")
    if args.cmd == "baseline":
        corpus = args.corpus or cfg.data.corpus
        ctx = _contexts(corpus, tok, cfg.data.context_length, cfg.data.eval_fraction, "train", args.contexts or 64,
                        args.seed)
        s = corpus_stats(model, spec, params, site, ctx)
        out = save_baseline(args.out, s, {"site": site, "model": model_name, "corpus": corpus,
                                          "dictionary": str(run.resolve()), "contexts": len(ctx)})
        print(f"baseline: {int(s.tokens):,} tokens of {corpus!r} at {site} -> {out}")
        return 0

    base, meta = load_baseline(args.baseline)
    if meta["site"] != site or meta["d_sae"] != spec.d_sae:
        raise UsageError(f"baseline {args.baseline} is for {meta['site']} (d_sae {meta['d_sae']}); the dictionary is "
                         f"at {site} (d_sae {spec.d_sae}); build a baseline with this dictionary")
    corpus = args.corpus or meta["corpus"]
    split = "held_out" if corpus == meta["corpus"] else "all"
    ctx = _contexts(corpus, tok, cfg.data.context_length, cfg.data.eval_fraction, split, args.contexts or 16, args.seed)
    current = corpus_stats(model, spec, params, site, ctx)
    state = drift.init(base, spec.d_sae)._replace(total=current)
    report = drift.drift_report({site: state}, shift_threshold=args.shift_threshold)
    report[site] |= {"corpus": corpus, "split": split, "baseline_corpus": meta["corpus"],
                     "baseline_tokens": int(meta["tokens"])}
    if args.metrics_port is not None:
        from jaxinterp.monitor import MetricsExporter

        exporter = MetricsExporter()
        exporter.observe_report(report, fires={site: float(current.count.sum())})
        server = exporter.serve(args.metrics_port)
        print(f"metrics at {server.url} (Ctrl-C to stop)", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    else:
        rep = report[site]
        print(f"{site}: {rep['tokens']:,} tokens of {corpus!r} ({split}) against {meta['tokens']:,.0f} of "
              f"{meta['corpus']!r}")
        print(f"  kl_divergence {rep['kl_divergence']:.4f}  shifted {rep['n_shifted']}  dead {rep['n_dead']} "
              f"(newly {rep['n_newly_dead']})  newly active {rep['n_newly_active']}")
        print(f"  top features {rep['top_features']}  most shifted {rep['shifted_features'][:10]}")
    if args.metrics_port is not None:
        import time

        sys.stdout.flush()
        while True:  # keep /metrics up for scrapers until interrupted
            time.sleep(3600)
    return 0


if __name__ == "__main__":
    run_main(main)
