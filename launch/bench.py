"""Benchmarks, one subcommand per area: `python launch/bench.py train [--json] [--compare sparsify]`
(areas: train, convergence, harvest, generate, drift, kernels, features, clt, attribute, scaling, serve).

Each prints human-readable lines by default and one JSON object with `--json`; ratios are measured
in the same run, absolute figures come with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.errors import UsageError  # noqa: E402
from jaxinterp.cli import configure_host_devices, run_main  # noqa: E402

configure_host_devices()


def _train(args) -> dict:
    from jaxinterp.benchmarks import train_loop, train_throughput

    if args.loop:
        res = train_loop.run(d_in=args.d_in, d_sae=args.d_sae, k=args.k, batch_size=args.batch_size,
                             steps=args.train_steps, n_features=args.n_features, p_active=args.p_active,
                             compare=args.compare, sparsify_python=args.sparsify_python, work_dir=args.work_dir,
                             step_repeats=args.steps, sources=tuple(args.source))
        return res, train_loop.format_human

    res = train_throughput.run(steps=args.steps, compare=args.compare, sparsify_python=args.sparsify_python,
                               vs_topk=tuple(args.vs_topk))
    return res, train_throughput.format_human


def _convergence(args):
    import yaml

    from jaxinterp.benchmarks import convergence

    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    after = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with a train key, e.g. --set optimizer=signum")
        after[key.removeprefix("train.")] = yaml.safe_load(value)
    res = convergence.run(tasks=args.tasks, sparsify_python=args.sparsify_python, work_dir=args.work_dir, log=log,
                          after=after)
    return res, convergence.format_human


def _serve(args):
    from jaxinterp.benchmarks import serve

    clients = tuple(int(c) for c in args.clients.split(","))
    return serve.run(model=args.model, site=args.site, d_sae=args.d_sae, clients=clients,
                     requests_per_client=args.requests_per_client, max_tokens=args.max_tokens,
                     overhead_clients=args.overhead_clients), serve.format_human


def _harvest(args):
    from jaxinterp.benchmarks import harvest

    return harvest.run(model=args.model, site=args.site, contexts=args.contexts), harvest.format_human


def _generate(args):
    from jaxinterp.benchmarks import generation

    res = generation.run(model=args.model, site=args.site, batch=args.batch, new_tokens=args.new_tokens,
                         repeats=args.repeats)
    return res, generation.format_human


def _drift(args):
    from jaxinterp.benchmarks import drift

    res = drift.run(d_sae=args.d_sae, tokens=args.tokens, k=args.k, generation=not args.no_generation)
    return res, drift.format_human


def _kernels(args):
    from jaxinterp.benchmarks import kernels

    return kernels.run(repeats=args.repeats, train=not args.no_train), kernels.format_human


def _features(args):
    from jaxinterp.benchmarks import features

    res = features.run(model=args.model, site=args.site, d_saes=tuple(args.d_sae), k=args.k, contexts=args.contexts,
                       repeats=args.repeats)
    return res, features.format_human


def _clt(args):
    from jaxinterp.benchmarks import clt

    res = clt.run(widths=tuple(args.d_sae), span=None if args.span == 0 else args.span, batch_size=args.batch_size,
                  k=args.k, steps=args.steps, dtype=args.dtype, mesh_compare=not args.no_mesh)
    return res, clt.format_human


def _attribute(args):
    from jaxinterp.benchmarks import attribute

    ref = None if args.reference_nodes == 0 else (args.reference_length, args.reference_nodes)
    res = attribute.run(model=args.model, dictionary=args.dictionary, lengths=tuple(args.lengths),
                        max_feature_nodes=args.max_feature_nodes, reference=ref, random_tokens=args.random_tokens,
                        memory_gib=args.memory_gib)
    return res, attribute.format_human


def _scaling(args):
    from jaxinterp.benchmarks import scaling

    return scaling.run(tokens_per_device=args.tokens_per_device, measured=not args.no_measure), scaling.format_human


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="area", required=True)
    t = sub.add_parser("train", help="training throughput (tokens/s), fraction of matmul peak, vs sparsify")
    t.add_argument("--steps", type=int, default=30, help="timed steps per case (back to back; total time over steps)")
    t.add_argument("--compare", choices=["sparsify"], help="run the same work through EleutherAI's sparsify")
    t.add_argument("--sparsify-python", help="python of an environment where sparsify is installed")
    t.add_argument("--loop", action="store_true",
                   help="run launch/train.py end to end on an npy file: loop, whole-process and step tokens/s")
    t.add_argument("--d-in", type=int, default=256, help="--loop: activation width")
    t.add_argument("--d-sae", type=int, default=2048, help="--loop: features")
    t.add_argument("--k", type=int, default=32, help="--loop: active features per row")
    t.add_argument("--batch-size", type=int, default=4096, help="--loop: rows per step")
    t.add_argument("--train-steps", type=int, default=512, help="--loop: steps (the file holds steps x batch rows)")
    t.add_argument("--n-features", type=int, default=1024, help="--loop: true directions in the file")
    t.add_argument("--p-active", type=float, default=0.01, help="--loop: firing probability of a true feature")
    t.add_argument("--source", nargs="+", default=["npy"], choices=["npy", "cache", "synthetic"],
                   help="--loop: data sources to train from (the first gives the whole-process figure)")
    t.add_argument("--work-dir", help="--loop: where the activation file and runs go (default: a temp folder)")
    t.add_argument("--vs-topk", nargs="+", default=[], metavar="ACTIVATION",
                   help="also time these activations against TopK on the first case, alternately (e.g. batchtopk)")
    c = sub.add_parser("convergence", help="mmcs, explained variance, dead fraction on synthetic tasks: "
                                          "earlier defaults, project defaults, sparsify")
    c.add_argument("--tasks", nargs="+", help="task names (default: all; see jaxinterp/benchmarks/convergence.py)")
    c.add_argument("--set", action="append", default=[], help="KEY=VALUE: a train setting of the after column")
    c.add_argument("--sparsify-python", help="python of an environment where sparsify is installed")
    c.add_argument("--work-dir", help="where the activation files and runs go (default: a temp folder)")
    h = sub.add_parser("harvest", help="activations/s up to a site vs the full forward; forward tokens/s at batch 1, 16")
    h.add_argument("--model", default="smollm2-135m", help="registry name, .gguf file or HF directory")
    h.add_argument("--site", default="blocks.15.resid_post")
    h.add_argument("--contexts", type=int, default=32, help="contexts of 128 tokens per timed call")
    g = sub.add_parser("generate", help="steered vs unsteered generation tokens/s, overhead per kind of steering")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--site", default="blocks.15.resid_post")
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--repeats", type=int, default=3)
    d = sub.add_parser("drift", help="Welford refresh rate vs a Python loop; monitoring overhead in generation")
    d.add_argument("--d-sae", type=int, default=16384)
    d.add_argument("--tokens", type=int, default=4096)
    d.add_argument("--k", type=int, default=32)
    d.add_argument("--no-generation", action="store_true", help="skip the SmolLM2 generation overhead")
    kn = sub.add_parser("kernels", help="top-k decode: Pallas / sparse loops vs dense and XLA gather; train sparse vs dense")
    kn.add_argument("--repeats", type=int, default=5)
    kn.add_argument("--no-train", action="store_true", help="skip the train-step comparison")
    fe = sub.add_parser("features", help="feature statistics pass (dashboards) tokens/s vs the model's forward")
    fe.add_argument("--model", default="smollm2-135m")
    fe.add_argument("--site", default="blocks.15.resid_post")
    fe.add_argument("--d-sae", type=int, nargs="+", default=[4608, 65536])
    fe.add_argument("--k", type=int, default=32)
    fe.add_argument("--contexts", type=int, default=16, help="contexts of 128 tokens a batch (4 above d_sae 8192)")
    fe.add_argument("--repeats", type=int, default=3)
    cl = sub.add_parser("clt", help="CLT train step tokens/s, fraction of matmul, memory estimate vs compiled, (4,2) mesh vs 1")
    cl.add_argument("--d-sae", type=int, nargs="+", default=[1152, 4608], help="features per layer")
    cl.add_argument("--span", type=int, default=4, help="target layers per source layer (0: all later layers)")
    cl.add_argument("--batch-size", type=int, default=256)
    cl.add_argument("--k", type=int, default=32, help="features per layer and row")
    cl.add_argument("--steps", type=int, default=3)
    cl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cl.add_argument("--no-mesh", action="store_true", help="skip the (4, 2) fake-device mesh comparison (CPU only)")
    at = sub.add_parser("attribute", help="attribution graph wall time, peak memory and s per feature row vs prompt length")
    at.add_argument("--model", default="smollm2-135m")
    at.add_argument("--dictionary", default="runs/clt", help="a CLT (python launch/train.py --config configs/clt.yaml)")
    at.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024], help="prompt tokens, BOS included")
    at.add_argument("--max-feature-nodes", type=int, default=256)
    at.add_argument("--reference-length", type=int, default=16)
    at.add_argument("--reference-nodes", type=int, default=2048, help="feature rows of the reference case (0: skip)")
    at.add_argument("--random-tokens", action="store_true", help="random token ids instead of the corpus")
    at.add_argument("--memory-gib", type=float, default=1.0)
    sv = sub.add_parser("serve", help="the HTTP server under 1, 8, 32 clients: tokens/s, TTFT and per-token p50/p99, "
                                      "steering overhead under load, served / static batch, memory overhead")
    sv.add_argument("--model", default="smollm2-135m")
    sv.add_argument("--site", default="blocks.15.resid_post")
    sv.add_argument("--d-sae", type=int, default=4608)
    sv.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    sv.add_argument("--requests-per-client", type=int, default=2)
    sv.add_argument("--max-tokens", type=int, default=32)
    sv.add_argument("--overhead-clients", type=int, default=8)
    sc = sub.add_parser("scaling", help="per-step collective bytes and predicted step time / tokens/s on TPU v5e "
                                        "slices and 8 x H100 (a model), with this machine's measured step and forward")
    sc.add_argument("--tokens-per-device", type=int, default=4096, help="tokens each device handles per step")
    sc.add_argument("--no-measure", action="store_true", help="skip this machine's measurements (the model only)")
    for p in (t, c, h, g, d, kn, fe, cl, at, sc, sv):
        p.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    res, fmt = {"train": _train, "convergence": _convergence, "harvest": _harvest, "generate": _generate, "drift": _drift, "kernels": _kernels,
           "features": _features, "clt": _clt, "attribute": _attribute, "scaling": _scaling, "serve": _serve}[args.area](args)
    print(json.dumps(res) if args.json else fmt(res))
    return 0


if __name__ == "__main__":
    run_main(main)
