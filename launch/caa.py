"""Contrastive activation addition on a model:

    python launch/caa.py [--model smollm2-135m] [--site blocks.10.resid_post] \
        [--pairs shakespearean_vs_modern|FILE.jsonl] [--held-out 10] [--out caa.npy] [--json]
    python launch/caa.py --dictionary runs/default --feature ID|auto [--scales 0,2,4] [--json]

Extracts the mean-difference vector from all but the last `--held-out` pairs, saves it (`--out`, for
`launch/generate.py --steer SITE:vector=caa.npy:scale=S`; `--out caa.gguf` writes llama.cpp's
control-vector layout for a `blocks.K.resid_post` site, K >= 1, which `llama-cli --control-vector`
and `launch/generate.py --control-vector` read; `.safetensors` / `.npz`: `{site: vector}`), and prints what steering with it does to
the held-out pairs: the mean log-probability per token of positive and negative texts at several
scales, and a steered vs unsteered continuation.

With `--dictionary` and `--feature`, steers one feature of the dictionary instead (mode add at the
dictionary's site; `auto`: the top feature of `launch/search.py contrast` over the training pairs).
Its `--scales` are raw activation amounts, by default multiples 0, 1, 2, 4 of the feature's
largest activation on the training texts (`launch/generate.py --steer SITE:feature=ID:add=V`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import run_main  # noqa: E402
from jaxinterp.errors import UsageError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--site", help="default blocks.10.resid_post; with --feature, the dictionary's site")
    ap.add_argument("--pairs", default="shakespearean_vs_modern")
    ap.add_argument("--held-out", type=int, default=10)
    ap.add_argument("--positions", choices=("mean", "last"), default="mean")
    ap.add_argument("--pca", action="store_true")
    ap.add_argument("--scales", help="default 0,1,2,4 (vector); multiples 0,1,2,4 of max activation (feature)")
    ap.add_argument("--prompt", default="The weather today is")
    ap.add_argument("--out", default="caa.npy")
    ap.add_argument("--dictionary", help="a run or dictionary directory, for --feature")
    ap.add_argument("--feature", help="ID or auto: steer this feature of --dictionary instead of the vector")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if (args.dictionary is None) != (args.feature is None):
        raise UsageError("--dictionary and --feature go together: give both to steer a feature, neither for the vector")
    if args.feature is not None and args.feature != "auto" and not args.feature.isdigit():
        raise UsageError(f"--feature {args.feature!r}: give a feature id (an integer) or auto")
    try:
        scales = None if args.scales is None else [float(s) for s in args.scales.split(",")]
    except ValueError:
        raise UsageError(f"--scales {args.scales!r}: give comma-separated numbers, e.g. 0,1,2,4") from None

    from jaxinterp.generation import generate
    from jaxinterp.models import load_model
    from jaxinterp.steering.caa import load_pairs, split_held_out

    train, held = split_held_out(load_pairs(args.pairs), args.held_out)
    model, tok = load_model(args.model)
    if tok is None:
        raise UsageError(f"{args.model} has no tokenizer (tokenizer.json); text prompts need one")
    run = _feature_run if args.feature is not None else _vector_run
    result, steer, registry = run(args, model, tok, train, held, scales)
    plain = generate(model, [args.prompt], max_new_tokens=24, tokenizer=tok)
    steered = generate(model, [args.prompt], max_new_tokens=24, tokenizer=tok, dictionaries=registry,
                       steering=steer(result["steered_scale"]))
    result |= {"train_pairs": len(train), "held_out_pairs": len(held), "prompt": args.prompt,
               "unsteered": plain.text[0], "steered": steered.text[0]}
    header = result.pop("header")
    if args.json:
        print(json.dumps(result))
        return 0
    print(header)
    unit = result.get("max_activation")
    print("scale  " + ("x max  " if unit else "") + "logprob(positive)  logprob(negative)  margin   "
          "(held-out pairs, per token)")
    for r in result["shift"]:
        mult = f"{r['scale'] / unit:5.1f}  " if unit else ""
        print(f"{r['scale']:5.1f}  {mult}{r['logprob_positive']:17.3f}  {r['logprob_negative']:17.3f}  "
              f"{r['margin']:6.3f}")
    print(f"unsteered: {plain.text[0]!r}\nsteered (scale {result['steered_scale']:g}): {steered.text[0]!r}")
    return 0


def _vector_run(args, model, tok, train, held, scales):
    """The mean-difference vector: (result, steer(scale), no registry)."""
    import numpy as np

    from jaxinterp.steering import SteeringVector
    from jaxinterp.steering.caa import contrastive_vector, style_shift

    site = args.site or "blocks.10.resid_post"
    cv = contrastive_vector(model, tok, site, train, positions=args.positions, pca=args.pca)
    if args.out.endswith((".gguf", ".safetensors", ".npz")):  # llama.cpp's control vector, or {site: vector}
        from jaxinterp.steering.control_vectors import write_vectors

        write_vectors(args.out, {site: cv.vector})
    else:
        np.save(args.out, cv.vector)
    scales = scales or [0.0, 1.0, 2.0, 4.0]
    norm = float(np.linalg.norm(cv.vector))
    result = {"site": site, "vector_norm": norm, "pc1_explained": cv.explained, "vector": args.out,
              "shift": style_shift(model, tok, site, cv.vector, held, scales=scales),
              "steered_scale": max(scales),
              "header": f"{site}: vector norm {norm:.2f} from {len(train)} pairs, saved to {args.out}"}
    return result, lambda s: SteeringVector(site, vector=cv.vector, scale=s), None


def _feature_run(args, model, tok, train, held, scales):
    """One dictionary feature, added: (result, steer(scale), the registry holding the dictionary)."""
    from jaxinterp.dictionaries import load_site_dictionary
    from jaxinterp.features import contrast
    from jaxinterp.steering import DictionaryRegistry
    from jaxinterp.steering.caa import feature_steer, style_shift

    dictionary = load_site_dictionary(args.dictionary, use="caa.py --dictionary")
    site = dictionary.site
    if site is None or dictionary.target_site is not None:
        raise UsageError(f"--dictionary {args.dictionary}: feature steering here needs an SAE that names its site")
    if args.site not in (None, site):
        raise UsageError(f"--site {args.site} but the dictionary reads {site}; drop --site or pick a dictionary there")
    dictionary.check_model(model.cfg.d_model, model.cfg.n_layers, model=args.model)
    # every feature ranked on the training pairs: `auto` takes the first, an ID gets its own figures
    c = contrast(model, dictionary, [tok.encode(p, add_bos=True) for p, _ in train],
                 [tok.encode(n, add_bos=True) for _, n in train], k=dictionary.d_sae)
    if args.feature == "auto":
        rank = 0
    elif int(args.feature) < dictionary.d_sae:
        rank = int((c.ids == int(args.feature)).argmax())
    else:
        raise UsageError(f"--feature {args.feature}: the dictionary has {dictionary.d_sae} features (0 to "
                         f"{dictionary.d_sae - 1})")
    feature, peak = int(c.ids[rank]), float(c.max_act[rank])
    if peak <= 0:
        raise UsageError(f"feature {feature} never fires on the training texts; give --scales in raw units")
    scales = scales or [m * peak for m in (0.0, 1.0, 2.0, 4.0)]
    registry = DictionaryRegistry().add_dictionary(dictionary)
    steer = feature_steer(site, feature)
    result = {"site": site, "feature": feature, "rank": rank, "effect_size": float(c.effect_size[rank]),
              "mean_positive": float(c.mean_a[rank]), "mean_negative": float(c.mean_b[rank]), "max_activation": peak,
              "shift": style_shift(model, tok, site, None, held, scales=scales, steer=steer, dictionaries=registry),
              "steered_scale": max(scales),
              "header": (f"{site}: feature {feature} (rank {rank + 1} of {dictionary.d_sae}, effect size "
                         f"{float(c.effect_size[rank]):.2f}, largest activation {peak:.2f}) on {len(train)} pairs")}
    return result, steer, registry


if __name__ == "__main__":
    run_main(main)
