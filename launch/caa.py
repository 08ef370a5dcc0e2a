"""Contrastive activation addition on a model:

    python launch/caa.py [--model smollm2-135m] [--site blocks.10.resid_post] \
        [--pairs shakespearean_vs_modern|FILE.jsonl] [--held-out 10] [--out caa.npy] [--json]

Extracts the mean-difference vector from all but the last `--held-out` pairs, saves it (`--out`, for
`launch/generate.py --steer SITE:vector=caa.npy:scale=S`), and prints what steering with it does to
the held-out pairs: the mean log-probability per token of positive and negative texts at several
scales, and a steered vs unsteered continuation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.errors import UsageError  # noqa: E402
from jaxinterp.cli import run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--site", default="blocks.10.resid_post")
    ap.add_argument("--pairs", default="shakespearean_vs_modern")
    ap.add_argument("--held-out", type=int, default=10)
    ap.add_argument("--positions", choices=("mean", "last"), default="mean")
    ap.add_argument("--pca", action="store_true")
    ap.add_argument("--scales", default="0,1,2,4")
    ap.add_argument("--prompt", default="The weather today is")
    ap.add_argument("--out", default="caa.npy")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from jaxinterp.generation import generate
    from jaxinterp.models import load_model
    from jaxinterp.steering import SteeringVector
    from jaxinterp.steering.caa import contrastive_vector, load_pairs, style_shift

    pairs = load_pairs(args.pairs)
    if not 0 < args.held_out < len(pairs):
        raise UsageError(f"--held-out {args.held_out}: need between 1 and {len(pairs) - 1} of the {len(pairs)} pairs")
    train, held = pairs[: -args.held_out], pairs[-args.held_out :]
    model, tok = load_model(args.model)
    cv = contrastive_vector(model, tok, args.site, train, positions=args.positions, pca=args.pca)
    np.save(args.out, cv.vector)
    scales = [float(s) for s in args.scales.split(",")]
    table = style_shift(model, tok, args.site, cv.vector, held, scales=scales)
    steer_scale = max(scales)
    plain = generate(model, [args.prompt], max_new_tokens=24, tokenizer=tok)
    steered = generate(model, [args.prompt], max_new_tokens=24, tokenizer=tok,
                       steering=SteeringVector(args.site, vector=cv.vector, scale=steer_scale))
    result = {"site": args.site, "train_pairs": len(train), "held_out_pairs": len(held),
              "vector_norm": float(np.linalg.norm(cv.vector)), "pc1_explained": cv.explained, "shift": table,
              "prompt": args.prompt, "unsteered": plain.text[0], "steered": steered.text[0],
              "steered_scale": steer_scale, "vector": args.out}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.site}: vector norm {result['vector_norm']:.2f} from {len(train)} pairs, saved to {args.out}")
    print("scale  logprob(positive)  logprob(negative)  margin   (held-out pairs, per token)")
    for r in table:
        print(f"{r['scale']:5.1f}  {r['logprob_positive']:17.3f}  {r['logprob_negative']:17.3f}  {r['margin']:6.3f}")
    print(f"unsteered: {plain.text[0]!r}\nsteered (scale {steer_scale:g}): {steered.text[0]!r}")
    return 0


if __name__ == "__main__":
    run_main(main)
