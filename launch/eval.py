"""Evaluate a trained dictionary at its site in its language model:
`python launch/eval.py --checkpoint RUN_OR_DICTIONARY_DIR [--step N] [--corpus shakespeare|DIR|FILE.jsonl] [--contexts N] [--json]`.

A cross-layer transcoder (a run of `dictionary.architecture: clt`, its dictionary, or a
circuit-tracer directory) is evaluated as a replacement model: next-token agreement, KL, CE and
ce_loss_score with every covered MLP replaced, and per-layer FVU, L0 and dead fraction.

Prints ce_loss_score / kl_div_score (loss recovered with the dictionary spliced in, against the
clean model and the zero-ablated site; a transcoder's output in place of its target site) beside
the reconstruction metrics, with the metric names of `metrics.jsonl`. A run directory supplies its
corpus and context length; a dictionary directory alone is evaluated on `--corpus` (default
shakespeare) with the model it names.
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
    ap.add_argument("--checkpoint", required=True,
                    help="a run directory written by launch/train.py, or a dictionary directory")
    ap.add_argument("--corpus", help="held-out text: shakespeare, a folder of .txt files, or a .jsonl (default: the run's)")
    ap.add_argument("--contexts", type=int, default=32, help="held-out contexts to evaluate")
    ap.add_argument("--outlier-norm", type=float, default=None,
                    help="leave out rows above this multiple of the median norm (default: the run's data.outlier_norm)")
    ap.add_argument("--step", type=int, help="a run directory's checkpoint at this step instead of its final dictionary")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    from jaxinterp import evals
    from jaxinterp.config import Config, DataConfig, load_config
    from jaxinterp.data.activations import ModelSource
    from jaxinterp.dictionaries import CLTDictionary, Dictionary, DictionaryError, load_dictionary
    from jaxinterp.dictionaries.clt import CLTSpec

    run = Path(args.checkpoint)
    cfg = load_config(run / "config.yaml") if (run / "config.yaml").is_file() and (run / "checkpoints").is_dir() \
        else Config()
    if args.step is not None:
        from jaxinterp.train import checkpoint_dictionary

        spec, params = checkpoint_dictionary(run, args.step)
        d = CLTDictionary(spec, params) if isinstance(spec, CLTSpec) else Dictionary(
            spec, params, site=cfg.data.site, target_site=cfg.data.target_site, model=cfg.data.model)
    else:
        d = load_dictionary(run)
    if isinstance(d, CLTDictionary):
        return _evaluate_clt(args, run, cfg, d)
    data = cfg.data
    if data.source == "cache":  # the cache's manifest names the model and corpus it was read from
        from jaxinterp.data.cache import read_manifest

        m = read_manifest(data.path)
        data = dataclasses.replace(data, source="model", model=m["model"], corpus=m["corpus"],
                                   context_length=m["context_length"], eval_fraction=m["eval_fraction"],
                                   chunk_contexts=m["chunk_contexts"])
    elif data.source != "model":
        if d.model is None:
            raise DictionaryError(f"{run}: the dictionary names no model; loss recovered needs the model it was "
                                  "trained on")
        data = DataConfig(source="model", model=d.model, site=d.site)
    if d.site is None:
        raise DictionaryError(f"{run}: the dictionary names no site; loss recovered needs a model site")
    data = dataclasses.replace(data, site=d.site, target_site=d.target_site, corpus=args.corpus or data.corpus)
    source = ModelSource(data, cfg.train.batch_size, cfg.train.seed)
    d.check_model(source.model.cfg.d_model, source.model.cfg.n_layers, model=f"model {data.model!r}")
    per = data.context_length - 1
    result = {"checkpoint": str(run), "site": d.site, "target_site": d.target_site, "corpus": data.corpus}
    outlier_norm = cfg.data.outlier_norm if args.outlier_norm is None else args.outlier_norm
    result |= evals.evaluate(d.spec, d.params, source.eval_batches(args.contexts * per, cfg.train.batch_size),
                             outlier_norm=outlier_norm)
    result |= evals.loss_recovered(source.model, d.spec, d.params, d.site, source.eval_contexts[: args.contexts],
                                   target_site=d.target_site, outlier_norm=outlier_norm)
    if args.json:
        print(json.dumps(result, default=float))
    else:
        keys = ("ce_loss_score", "kl_div_score", "ce_loss_clean", "ce_loss_with_sae", "ce_loss_with_ablation",
                "explained_variance", "l0")
        print("  ".join(f"{k}={result[k]:.4g}" for k in keys))
    return 0


def _evaluate_clt(args, run: Path, cfg, d) -> int:
    """A CLT: the replacement model's fidelity (agreement, KL, CE and ce_loss_score with every covered
    MLP replaced) and per-layer FVU, explained variance, L0 and dead fraction, on held-out contexts."""
    from jaxinterp.circuits import replacement_fidelity
    from jaxinterp.data.corpus import corpus_documents, held_out_contexts, split_documents
    from jaxinterp.dictionaries import DictionaryError
    from jaxinterp.models import load_model

    data = cfg.data
    if data.source == "cache":
        from jaxinterp.data.cache import read_manifest

        m = read_manifest(data.path)
        data = dataclasses.replace(data, model=m["model"], corpus=m["corpus"], context_length=m["context_length"],
                                   eval_fraction=m["eval_fraction"])
    elif not (run / "config.yaml").is_file() or not (run / "checkpoints").is_dir():
        if d.model is None:
            raise DictionaryError(f"{run}: the CLT names no model; its replacement model needs the model it was "
                                  "trained on")
        data = dataclasses.replace(data, model=d.model)
    model, tokenizer = load_model(data.model)
    d.check_model(model.cfg.d_model, model.cfg.n_layers, model=f"model {data.model!r}")
    train_docs, eval_docs = split_documents(corpus_documents(args.corpus or data.corpus), data.eval_fraction)
    contexts = held_out_contexts(train_docs, eval_docs, tokenizer, data.context_length)[: args.contexts]
    result = {"checkpoint": str(run), "step": args.step, "layers": [d.spec.first_layer,
                                                                     d.spec.first_layer + d.spec.n_layers - 1],
              "corpus": args.corpus or data.corpus, **replacement_fidelity(model, d.spec, d.params, contexts)}
    if args.json:
        print(json.dumps(result, default=float))
    else:
        keys = ("agreement", "kl", "ce_loss_score", "ce_original", "ce_replacement", "ce_ablated", "fvu", "l0",
                "dead_fraction")
        print("  ".join(f"{k}={result[k]:.4g}" for k in keys))
        print("fvu per layer: " + " ".join(f"{v:.3f}" for v in result["fvu_per_layer"]))
        print("l0 per layer:  " + " ".join(f"{v:.1f}" for v in result["l0_per_layer"]))
    return 0


if __name__ == "__main__":
    run_main(main)
