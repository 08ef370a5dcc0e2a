"""Attribution graphs: wall time, peak memory and seconds per feature row against prompt length.

Each case runs in a fresh process (so its peak resident memory is its own): load the model and the
dictionary, note the resident memory (the baseline: weights), build one graph of a prompt of the
corpus cut to `length` tokens (BOS first) with `max_feature_nodes`, then build it again (compiled).
Reported per case: the first graph's wall time (compile included), the second's, its feature rows'
seconds per row, the peak resident memory of the process through the first graph (compiling
included) and that peak less the baseline (what attribution itself holds). The growth exponents are least-squares slopes of log figure against
log length over the cases.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np
args = json.loads(sys.argv[1])
from jaxinterp.circuits import attribution as at
from jaxinterp.dictionaries.artifact import load_dictionary
from jaxinterp.models import load_model
model, tok = load_model(args["model"])
d = load_dictionary(args["dictionary"])
if args["random_tokens"]:
    rng = np.random.default_rng(0)
    body = rng.integers(3, model.cfg.vocab_size, size=4 * args["length"]).tolist()
else:
    from jaxinterp.data.corpus import corpus_documents
    body = tok.encode(" ".join(corpus_documents(args["corpus"])[:50]), add_bos=False)
ids = at.with_bos(body, tok if tok is not None else type("T", (), {"bos_id": 1, "special_ids": (1,)})())[: args["length"]]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
cfg = at.AttributionConfig(max_feature_nodes=args["max_feature_nodes"], memory_gib=args["memory_gib"])
t0 = time.perf_counter(); g = at.attribute(model, ids, d.spec, d.params, cfg); first = time.perf_counter() - t0
peak = rss()
del g
t0 = time.perf_counter(); g = at.attribute(model, ids, d.spec, d.params, cfg); warm = time.perf_counter() - t0
print(json.dumps({"length": len(ids), "active_features": int(len(g.active_features)), "feature_rows": g.n_features,
                  "nodes": g.n_nodes, "first_s": first, "warm_s": warm,
                  "feature_rows_s": g.timings["feature_rows_s"],
                  "s_per_feature_row": g.timings["feature_rows_s"] / max(g.n_features, 1),
                  "chunk_rows": g.timings["chunk_rows"], "peak_rss_bytes": peak, "baseline_rss_bytes": base}))
"""


def _case(model: str, dictionary: str, length: int, max_feature_nodes: int, *, corpus: str, random_tokens: bool,
          memory_gib: float) -> dict:
    args = json.dumps({"model": model, "dictionary": dictionary, "length": length, "max_feature_nodes": max_feature_nodes,
                       "corpus": corpus, "random_tokens": random_tokens, "memory_gib": memory_gib})
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, args], env=env, capture_output=True, text=True, timeout=7200)
    if out.returncode != 0:
        raise RuntimeError(f"attribution case of {length} tokens failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(xs, ys) -> float | None:
    xs, ys = np.log(np.asarray(xs, float)), np.log(np.maximum(np.asarray(ys, float), 1e-12))
    return None if len(xs) < 2 else float(np.polyfit(xs, ys, 1)[0])


def run(*, model: str, dictionary: str, lengths=(16, 64, 256, 1024), max_feature_nodes: int = 256,
        reference: tuple[int, int] | None = (16, 2048), corpus: str = "shakespeare", random_tokens: bool = False,
        memory_gib: float = 1.0) -> dict:
    """The cases over `lengths` at `max_feature_nodes`, and the `reference` (length, feature nodes)
    case to set against circuit-tracer's seconds per feature row."""
    import jax

    kw = dict(corpus=corpus, random_tokens=random_tokens, memory_gib=memory_gib)
    cases = [_case(model, dictionary, n, max_feature_nodes, **kw) for n in lengths]
    ref = None if reference is None else _case(model, dictionary, reference[0], reference[1], **kw)
    ls = [c["length"] for c in cases]
    return {"model": model, "dictionary": dictionary, "max_feature_nodes": max_feature_nodes, "cases": cases,
            "reference": ref,
            "exponents": {"warm_s": _slope(ls, [c["warm_s"] for c in cases]),
                          "peak_rss": _slope(ls, [c["peak_rss_bytes"] for c in cases]),
                          "attribution_rss": _slope(ls, [c["peak_rss_bytes"] - c["baseline_rss_bytes"] for c in cases])},
            "machine": {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                        "cpus": os.cpu_count(), "platform": platform.platform()}}


def format_human(res: dict) -> str:
    gib = 2**30
    lines = [f"attribution graphs: {res['model']} with {res['dictionary']}, max_feature_nodes {res['max_feature_nodes']} "
             f"({res['machine']['backend']}, {res['machine']['cpus']} CPUs)"]
    for c in res["cases"] + ([res["reference"]] if res["reference"] else []):
        lines.append(f"  {c['length']:5d} tokens, {c['feature_rows']:5d} feature rows of {c['active_features']:7d} active: "
                     f"{c['first_s']:7.1f} s first (compile), {c['warm_s']:7.1f} s warm, {c['s_per_feature_row']:.4f} s per "
                     f"feature row, peak {c['peak_rss_bytes'] / gib:5.2f} GiB ({(c['peak_rss_bytes'] - c['baseline_rss_bytes']) / gib:5.2f} "
                     "GiB over the loaded model)")
    e = res["exponents"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines.append(f"  growth exponents with prompt length: warm time {fmt(e['warm_s'])}, peak memory {fmt(e['peak_rss'])}, "
                 f"memory over the model {fmt(e['attribution_rss'])}")
    return "\n".join(lines)
