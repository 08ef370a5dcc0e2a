"""Evaluate a trained dictionary at its site in its language model:
`python launch/eval.py --checkpoint RUN_DIR [--corpus shakespeare|DIR|FILE.jsonl] [--contexts N] [--json]`.

Prints ce_loss_score / kl_div_score (loss recovered with the dictionary spliced in, against the
clean model and the zero-ablated site) beside the reconstruction metrics, with the metric names of
`metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import configure_host_devices, run_main  # noqa: E402

configure_host_devices()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="a run directory written by launch/train.py")
    ap.add_argument("--corpus", help="held-out text: shakespeare, a folder of .txt files, or a .jsonl (default: the run's)")
    ap.add_argument("--contexts", type=int, default=32, help="held-out contexts to evaluate")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    from jaxinterp import evals
    from jaxinterp.config import load_config
    from jaxinterp.data.activations import ModelSource
    from jaxinterp.train import load_dictionary

    run = Path(args.checkpoint)
    cfg = load_config(run / "config.yaml")
    data = cfg.data
    if data.source == "cache":  # the cache's manifest names the model, site and corpus it was read from
        from jaxinterp.data.cache import read_manifest

        m = read_manifest(data.path)
        data = dataclasses.replace(data, source="model", model=m["model"], site=m["site"], corpus=m["corpus"],
                                   context_length=m["context_length"], eval_fraction=m["eval_fraction"],
                                   chunk_contexts=m["chunk_contexts"])
    if data.source != "model" or data.site is None:
        raise ValueError(f"{run} was trained on data.source={data.source!r}; loss recovered needs a model site")
    spec, params = load_dictionary(run)
    data = dataclasses.replace(data, corpus=args.corpus or data.corpus)
    source = ModelSource(data, cfg.train.batch_size, cfg.train.seed)
    per = data.context_length - 1
    result = {"checkpoint": str(run), "site": data.site, "corpus": data.corpus}
    result |= evals.evaluate(spec, params, source.eval_batches(args.contexts * per, cfg.train.batch_size))
    result |= evals.loss_recovered(source.model, spec, params, data.site, source.eval_contexts[: args.contexts])
    if args.json:
        print(json.dumps(result, default=float))
    else:
        keys = ("ce_loss_score", "kl_div_score", "ce_loss_clean", "ce_loss_with_sae", "ce_loss_with_ablation",
                "explained_variance", "l0")
        print("  ".join(f"{k}={result[k]:.4g}" for k in keys))
    return 0


if __name__ == "__main__":
    run_main(main)
