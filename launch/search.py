"""Search a dictionary's features: what fires on a prompt, and which features separate two sets of texts.

    python launch/search.py fires --dictionary runs/default --prompt "Thou art" [--k 10] [--dashboard dash/] [--json]
    python launch/search.py contrast --dictionary runs/default \
        [--pairs shakespearean_vs_modern|FILE.jsonl] [--held-out 10] [--k 10] [--json]
    python launch/search.py token --dashboard dash/ --text thou [--contains] [--k 10] [--json]

`fires`: each token's top features with their activations (with `--dashboard`, the contexts each
fires most on in that dashboard's corpus pass). `contrast`: the features most active on
the positive texts relative to the negative ones (Cohen's d of per-token activations), from the
training pairs only (all but the last `--held-out`, which `launch/caa.py` keeps for measuring), with
the `launch/generate.py` line that steers the top one. `token`: the features whose top contexts in a
dashboard's corpus pass (`launch/dashboard.py --out DIR`) fire on a token, or whose logit effects
promote it (`--contains`: tokens containing the text). `--model` defaults to the dictionary's model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import run_main  # noqa: E402
from jaxinterp.errors import UsageError  # noqa: E402

STEER_MULTIPLE = 4.0
"""The suggested amount to add, in multiples of the feature's largest activation on the texts."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("fires", "contrast"):
        p = sub.add_parser(name)
        p.add_argument("--dictionary", required=True, help="a run or dictionary directory")
        p.add_argument("--model", help="default: the model the dictionary was trained on, else smollm2-135m")
        p.add_argument("--k", type=int, default=10)
        p.add_argument("--json", action="store_true")
    tk = sub.add_parser("token")
    tk.add_argument("--dashboard", required=True, help="the --out folder of launch/dashboard.py")
    tk.add_argument("--text", required=True, help="the token's text, e.g. thou (case and spaces ignored)")
    tk.add_argument("--contains", action="store_true", help="match every token containing the text")
    tk.add_argument("--k", type=int, default=10)
    tk.add_argument("--json", action="store_true")
    sub.choices["fires"].add_argument("--prompt", required=True)
    sub.choices["fires"].add_argument("--dashboard", help="a launch/dashboard.py --out folder: also show the "
                                      "contexts each listed feature fires most on in its corpus pass")
    sub.choices["fires"].add_argument("--contexts", type=int, default=3, help="with --dashboard: contexts a feature")
    sub.choices["contrast"].add_argument("--pairs", default="shakespearean_vs_modern")
    sub.choices["contrast"].add_argument("--held-out", type=int, default=10)
    sub.choices["contrast"].add_argument("--prompt", default="The weather today is", help="for the generate line")
    args = ap.parse_args()
    if args.k < 1:
        raise UsageError(f"--k {args.k}: give at least 1")
    if args.command == "token":
        return _token(args)

    from jaxinterp.dictionaries import load_site_dictionary
    from jaxinterp.models import load_model

    dictionary = load_site_dictionary(args.dictionary, use="search.py")
    model_name = args.model or dictionary.model or "smollm2-135m"
    model, tok = load_model(model_name)
    if tok is None:
        raise UsageError(f"{model_name} has no tokenizer (tokenizer.json); text prompts need one")
    dictionary.check_model(model.cfg.d_model, model.cfg.n_layers, model=model_name)
    return (_fires if args.command == "fires" else _contrast)(args, model, tok, dictionary)


def _fires(args, model, tok, dictionary) -> int:
    from jaxinterp.features import fires_here

    ids = tok.encode(args.prompt, add_bos=True)
    if len(ids) < 2:
        raise UsageError("--prompt is empty; give some text")
    here = fires_here(model, dictionary, ids, k=args.k)
    rows = [{"position": t, "token": tok.decode([ids[t]]),
             "features": [{"id": int(f), "value": float(v)} for f, v in zip(here.ids[t], here.values[t]) if f >= 0]}
            for t in range(1, len(ids))]
    seen = sorted({f["id"] for r in rows for f in r["features"]})
    contexts = _top_contexts(args.dashboard, dictionary, seen, args.contexts, (model, tok)) if args.dashboard else {}
    if args.json:
        print(json.dumps({"site": dictionary.site, "prompt": args.prompt, "tokens": rows,
                          "top_contexts": {str(f): c for f, c in contexts.items()}}))
        return 0
    print(f"{dictionary.site}: top {args.k} features per token")
    for r in rows:
        feats = "  ".join(f"{f['id']}={f['value']:.2f}" for f in r["features"]) or "(none)"
        print(f"{r['position']:4d} {r['token']!r:>14}  {feats}")
    for f, found in contexts.items():
        print(f"feature {f} fires most on:")
        for c in found:
            print(f"  {c['value']:7.2f}  {c['text']!r}")
    return 0


def _dashboard_pass(folder: str, loaded=None):
    """(summary, statistics, contexts, token strings, model) of a finished launch/dashboard.py run
    (`loaded`: its (model, tokenizer) when already loaded)."""
    from jaxinterp.features import load_stats
    from jaxinterp.features.dashboard import corpus_contexts
    from jaxinterp.features.examples import token_strings
    from jaxinterp.models import load_model

    folder = Path(folder)
    if not (folder / "summary.json").is_file() or not (folder / "pass" / "stats.npz").is_file():
        raise UsageError(f"--dashboard {folder}: no summary.json and pass/stats.npz there; give the --out folder "
                         "of a finished launch/dashboard.py run")
    summary = json.loads((folder / "summary.json").read_text())
    stats, _ = load_stats(folder / "pass" / "stats.npz")
    model, tok = loaded or load_model(summary["model"])
    s = summary["settings"]
    contexts = corpus_contexts(s["corpus"], tok, s["tokens"], s["context_length"], s["seed"])
    return summary, stats, contexts, token_strings(tok, model.cfg.vocab_size), model


def _top_contexts(folder: str, dictionary, features, n: int, loaded) -> dict[int, list[dict]]:
    """Each feature's `n` top contexts in the dashboard's pass: its value and the text around the
    token (the token itself in [brackets])."""
    import numpy as np

    summary, stats, contexts, strings, _ = _dashboard_pass(folder, loaded)
    if summary["d_sae"] != dictionary.d_sae or summary["site"] != dictionary.site:
        raise UsageError(f"--dashboard {folder} was built for another dictionary ({summary['dictionary']}); "
                         "give the dashboard of this one")
    t = contexts.shape[1]
    top_locs, top_vals = np.asarray(stats.top_locs), np.asarray(stats.top_vals)
    out = {}
    for f in features:
        found = []
        for loc, val in zip(top_locs[f][:n], top_vals[f][:n]):
            if loc < 0:
                break
            c, p = divmod(int(loc), t)
            text = ("".join(strings[i] for i in contexts[c, max(1, p - 10) : p]) + f"[{strings[contexts[c, p]]}]"
                    + "".join(strings[i] for i in contexts[c, p + 1 : p + 4]))
            found.append({"value": float(val), "text": text})
        out[int(f)] = found
    return out


def _contrast(args, model, tok, dictionary) -> int:
    from jaxinterp.features import contrast
    from jaxinterp.steering.caa import load_pairs, split_held_out

    train, held = split_held_out(load_pairs(args.pairs), args.held_out)
    c = contrast(model, dictionary, [tok.encode(p, add_bos=True) for p, _ in train],
                 [tok.encode(n, add_bos=True) for _, n in train], k=args.k)
    rows = [{"id": int(f), "effect_size": float(d), "mean_a": float(a), "mean_b": float(b), "max_act": float(m)}
            for f, d, a, b, m in zip(c.ids, c.effect_size, c.mean_a, c.mean_b, c.max_act)]
    top = rows[0]
    amount = round(STEER_MULTIPLE * top["max_act"], 1)
    line = (f"python3 launch/generate.py --dictionary {shlex.quote(args.dictionary)} "
            f"--steer {dictionary.site}:feature={top['id']}:add={amount:g} --prompt {shlex.quote(args.prompt)}")
    if args.json:
        print(json.dumps({"site": dictionary.site, "pairs": args.pairs, "train_pairs": len(train),
                          "held_out_pairs": len(held), "features": rows, "generate": line}))
        return 0
    print(f"{dictionary.site}: features higher on the positive than the negative texts of {len(train)} training "
          f"pairs ({len(held)} held out)")
    print("   id  effect_size  mean_positive  mean_negative  max_act")
    for r in rows:
        print(f"{r['id']:5d}  {r['effect_size']:11.3f}  {r['mean_a']:13.3f}  {r['mean_b']:13.3f}  {r['max_act']:7.2f}")
    print(f"steer the top feature ({STEER_MULTIPLE:g} x its largest activation):\n  {line}")
    return 0


def _token(args) -> int:
    from jaxinterp.dictionaries import load_site_dictionary
    from jaxinterp.features import by_token, logit_effects

    summary, stats, contexts, strings, model = _dashboard_pass(args.dashboard)
    folder = Path(args.dashboard)
    dictionary = load_site_dictionary(summary["dictionary"], use="search.py")
    found = by_token(stats, contexts, strings, args.text, logits=logit_effects(model, dictionary),
                     contains=args.contains, k=args.k)
    rows = [{"id": int(f), "in_top": int(a), "in_logits": int(b), "page": str(folder / "f" / f"{int(f)}.html")}
            for f, a, b in zip(*found)]
    if args.json:
        print(json.dumps({"text": args.text, "contains": args.contains, "features": rows}))
        return 0
    if not rows:
        print(f"no feature's top contexts or promoted tokens hold {args.text!r}" +
              ("" if args.contains else "; try --contains"))
    for r in rows:
        print(f"{r['id']:6d}  fires on it in {r['in_top']:2d} of its top contexts, promotes it {r['in_logits']}x  "
              f"{r['page']}")
    return 0


if __name__ == "__main__":
    run_main(main)
