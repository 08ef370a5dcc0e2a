"""Continue prompts with a model, plainly or steered (then steered and unsteered side by side,
from the same seed):

    python launch/generate.py --model smollm2-135m --prompt "..." [--json]
    python launch/generate.py --model smollm2-135m --prompt "..." \
        --dictionary runs/default --steer blocks.15.resid_post:feature=123:add=4 \
        --steer blocks.15.resid_post:vector=v.npy:scale=8 [--spec steer.json] [--json]
        --control-vector caa.gguf:2       (llama.cpp / repeng control vectors, or {site: vector} files)
    python launch/generate.py --prompt "The capital of France is" --dictionary runs/clt \
        --steer 12_345_5:ablate --steer 14_7_5:ablate        (attribution graph node ids)

`--model`: a registry name, an HF checkpoint directory or a .gguf file. `--dictionary [SITE=]PATH`
attaches a trained dictionary, a run directory or a dictionary directory (at its own site unless
SITE= is given; a transcoder reads its input site and writes its target), for feature steering.
A cross-layer transcoder's features are steered by the node ids of an attribution graph
(`{layer}_{feature}_{pos}` with :ablate, :scale=V, :clamp=V or :add=V, one mode per run; `pos` counts
the prompt's tokens with BOS first, as launch/attribute.py does, and the prompts get BOS first too). Greedy
unless --temperature is given. `--json` prints one object per prompt: `prompt`, `text` (the
continuation; steered when steering is given) and `unsteered` (equal to `text` without steering),
plus `steered` when steering is given.
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
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (one batch)")
    ap.add_argument("--steer", action="append", default=[], help="SITE:feature=ID:add=V | SITE:vector=FILE.npy:scale=V ...")
    ap.add_argument("--spec", help="a JSON file: a list of SteeringVector fields")
    ap.add_argument("--control-vector", action="append", default=[], metavar="FILE[:SCALE]",
                    help="add vectors by site: llama.cpp's control-vector .gguf (repeng's), or .safetensors/.npz "
                         "of {site: vector}; SCALE multiplies them (default 1)")
    ap.add_argument("--dictionary", action="append", default=[], help="[SITE=]PATH: a run or dictionary directory")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encode", choices=("full", "selected"), default="full",
                    help="selected: encode only the steered features' columns")
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt")
    args = ap.parse_args()

    from jaxinterp.generation import Sampling, generate
    from jaxinterp.models import load_model
    from jaxinterp.steering import DictionaryRegistry, load_spec_file, parse_steer

    from jaxinterp.dictionaries.artifact import CLTDictionary, load_dictionary
    from jaxinterp.steering.clt import parse_node_steer, steer_nodes

    nodes = [n for n in (parse_node_steer(s) for s in args.steer) if n is not None]
    specs = [parse_steer(s) for s in args.steer if parse_node_steer(s) is None]
    for item in args.control_vector:
        from jaxinterp.steering.control_vectors import read_vectors, steering

        path, scale = item, ""
        if not item.endswith((".gguf", ".safetensors", ".npz")) and ":" in item:
            path, _, scale = item.rpartition(":")
        try:
            specs += steering(read_vectors(path), scale=float(scale) if scale else 1.0)
        except ValueError:
            raise UsageError(f"--control-vector {item!r}: give FILE or FILE:SCALE with a number") from None
    specs += load_spec_file(args.spec) if args.spec else []
    registry, clts = DictionaryRegistry(), []
    for d in args.dictionary:
        site, _, run = d.rpartition("=")
        loaded = load_dictionary(run) if nodes and not site else None
        if isinstance(loaded, CLTDictionary):
            clts.append(loaded)
        else:
            registry.add_run(run, site or None)
    if nodes and len(clts) != 1:
        raise UsageError(f"graph node steering needs one cross-layer transcoder among --dictionary; got {len(clts)}")
    model, tok = load_model(args.model)
    if tok is None:
        raise UsageError(f"{args.model} has no tokenizer (tokenizer.json); text prompts need one")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, tokenizer=tok, dictionaries=registry)
    prompts = args.prompt
    if nodes:
        from jaxinterp.circuits.attribution import with_bos

        clts[0].check_model(model.cfg.d_model, model.cfg.n_layers, model=args.model)
        kw["intercepts"] = steer_nodes(clts[0].spec, clts[0].params, nodes)
        prompts = [with_bos(tok.encode(p, add_bos=False), tok) for p in args.prompt]
    plain = generate(model, prompts, **{k: v for k, v in kw.items() if k != "intercepts"})
    if not specs and not nodes:
        for prompt, text in zip(args.prompt, plain.text):
            print(json.dumps({"prompt": prompt, "text": text, "unsteered": text}) if args.json else f"{prompt}{text}")
        return 0
    steered = generate(model, prompts, steering=specs or None, encode=args.encode, **kw)
    for prompt, a, b in zip(args.prompt, plain.text, steered.text):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": b, "unsteered": a, "steered": b}))
        else:
            print(f"prompt:    {prompt!r}\nunsteered: {a!r}\nsteered:   {b!r}\n")
    return 0


if __name__ == "__main__":
    run_main(main)
