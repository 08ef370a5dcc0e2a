"""The attribution graph of one prompt: which features, errors and tokens, through which edges, make
the model predict its next token, on the replacement model with a cross-layer transcoder (or a
per-layer transcoder set) standing in for the MLPs.

    python launch/attribute.py --model smollm2-135m --dictionary runs/clt \\
        --prompt "The capital of France is" --out graph.json --html graph.html --check 20

`--dictionary`: a CLT run or artifact, or a circuit-tracer directory (a CLT or a transcoder set).
Writes the frontend's graph JSON (`--out`), `graph.npz` beside it (the unpruned graph in
circuit-tracer's node order), and with `--html` a self-contained viewer (`--dashboard DIR` adds each
feature's top contexts). `--check N` compares N random edges with the frozen model's change;
`--ablate N` ablates the N features of most influence on the top logit in the real model, against as
many random active features. Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import run_main  # noqa: E402
from jaxinterp.errors import UsageError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dictionary", required=True, help="a CLT run/artifact or a circuit-tracer directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", required=True, help="graph JSON path (graph.npz is written beside it)")
    ap.add_argument("--html", help="also write a self-contained viewer page here")
    ap.add_argument("--dashboard", help="a feature dashboard directory (launch/dashboard.py) for the viewer")
    ap.add_argument("--node-threshold", type=float, default=0.8)
    ap.add_argument("--edge-threshold", type=float, default=0.98)
    ap.add_argument("--max-logits", type=int, default=10)
    ap.add_argument("--logit-probability", type=float, default=0.95)
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--memory-gib", type=float, default=1.0, help="working memory of one chunk of rows")
    ap.add_argument("--check", type=int, default=0, metavar="N", help="check N random edges in the frozen model")
    ap.add_argument("--ablate", type=int, default=10, metavar="N",
                    help="ablation check with the N top features (0: skip)")
    ap.add_argument("--slug", default=None)
    args = ap.parse_args()

    from jaxinterp.circuits import attribution as at
    from jaxinterp.circuits import graph_files as gf
    from jaxinterp.dictionaries.artifact import CLTDictionary, load_dictionary
    from jaxinterp.models import load_model

    d = load_dictionary(args.dictionary)
    if not isinstance(d, CLTDictionary):
        raise UsageError(f"{args.dictionary} holds one site's dictionary; attribution needs a cross-layer transcoder "
                         "or a per-layer transcoder set (a circuit-tracer directory)")
    model, tok = load_model(args.model)
    if tok is None:
        raise UsageError(f"{args.model} has no tokenizer; attribution of a text prompt needs one")
    d.check_model(model.cfg.d_model, model.cfg.n_layers, model=args.model)
    cfg = at.AttributionConfig(max_logits=args.max_logits, logit_probability=args.logit_probability,
                               max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size,
                               memory_gib=args.memory_gib)
    ids = at.with_bos(tok.encode(args.prompt, add_bos=False), tok)
    t0 = time.perf_counter()
    graph = at.attribute(model, ids, d.spec, d.params, cfg)
    seconds = time.perf_counter() - t0
    pruned = gf.prune_graph(graph, args.node_threshold, args.edge_threshold)
    decode = lambda v: tok.decode(v)  # noqa: E731
    summary = {"tokens": graph.n_pos, "active_features": len(graph.active_features),
               "feature_nodes": graph.n_features, "nodes": graph.n_nodes, "seconds": round(seconds, 2),
               "seconds_per_row": round(graph.timings["feature_rows_s"] / max(graph.n_features, 1), 4),
               "kept_nodes": int(pruned.node_mask.sum()), "kept_edges": int(pruned.edge_mask.sum()),
               "replacement_score": round(pruned.replacement_score, 4),
               "completeness_score": round(pruned.completeness_score, 4),
               "top_logits": [(decode([int(v)]), round(float(p), 4))
                              for v, p in zip(graph.logit_token_ids, graph.logit_probabilities)]}
    if args.check:
        ch = at.check_edges(model, d.spec, d.params, graph, args.check)
        summary["check"] = ch.summary()
    if args.ablate:
        ab = at.ablation_check(model, d.spec, d.params, graph, n_features=args.ablate)
        summary["ablation"] = {"token": decode([ab["token_id"]]), "logit": round(ab["logit"], 4),
                               "probability": round(ab["probability"], 4), "features": ab["n_features"],
                               "top_drop": round(ab["top_drop"], 4),
                               "top_probability_after": round(ab["top_probability_after"], 4),
                               "random_drop_mean": round(ab["random_drop_mean"], 4),
                               "random_probability_after": round(ab["random_probability_after"], 4),
                               "nodes": [f"{l}_{f}_{p}" for l, p, f in ab["features"]]}
    slug = args.slug or Path(args.out).stem
    doc = gf.graph_json(graph, pruned, decode=decode, slug=slug, scan=str(d.model or args.dictionary),
                        node_threshold=args.node_threshold,
                        info={"model": args.model, "dictionary": str(args.dictionary), **{
                            k: summary[k] for k in ("check", "ablation") if k in summary}})
    out = gf.write_json(args.out, doc)
    gf.write_npz(out.with_suffix(".npz"), graph, pruned)
    if args.html:
        from jaxinterp.circuits.viewer import write_viewer

        write_viewer(args.html, doc, dashboard=args.dashboard)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
