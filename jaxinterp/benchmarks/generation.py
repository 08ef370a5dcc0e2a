"""Steered generation throughput: tokens/s of jitted generation with no steering and with each kind
of steering at one site, as ratios to the unsteered run measured in the same process.

Each timed call generates `new_tokens` tokens for `batch` prompts (no early stop) after a compile
and warm-up call; variants are timed in interleaved rounds and the median per variant is reported.
The dictionary is a TopK SAE of the site's width (random weights: cost does not depend on them).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxinterp.benchmarks.timing import interleaved_medians
from jaxinterp.dictionaries import sae as dl
from jaxinterp.generation import generate
from jaxinterp.models import load_model
from jaxinterp.steering import DictionaryRegistry, SteeringVector


def run(*, model: str = "smollm2-135m", site: str = "blocks.15.resid_post", batch: int = 8, new_tokens: int = 32,
        d_sae: int = 4608, k: int = 32, repeats: int = 3) -> dict:
    lm, tok = load_model(model)
    d = lm.cfg.d_model
    spec = dl.DictionarySpec(activation="topk", d_in=d, d_sae=d_sae, k=k)
    reg = DictionaryRegistry().add(site, spec, dl.init(jax.random.key(0), spec))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, lm.cfg.vocab_size, size=24).tolist() for _ in range(batch)]
    vec = rng.normal(size=d).astype(np.float32)
    per_row = [[SteeringVector(site, features={int(rng.integers(d_sae)): float(rng.normal() * 4)},
                               mode=("add", "clamp", "scale", "ablate")[i % 4])] for i in range(batch)]
    variants = {
        "unsteered": dict(),
        "feature_full_encode": dict(steering=SteeringVector(site, features={7: 4.0}), encode="full"),
        "feature_selected": dict(steering=SteeringVector(site, features={7: 4.0}), encode="selected"),
        "per_row_features_selected": dict(steering=per_row, encode="selected"),
        "vector": dict(steering=SteeringVector(site, vector=vec, scale=2.0)),
        "read_top8": dict(read=(site,), read_k=8),
    }

    def call(kw):
        return generate(lm, prompts, max_new_tokens=new_tokens, stop=(), dictionaries=reg, **kw).tokens

    med = interleaved_medians(variants, call, repeats)
    n = batch * new_tokens
    out = {"benchmark": "generate", "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
           "model": model, "site": site, "batch": batch, "new_tokens": new_tokens, "d_sae": d_sae, "k": k,
           "tokens_per_s": {name: n / t for name, t in med.items()},
           "overhead": {name: med[name] / med["unsteered"] - 1 for name in med if name != "unsteered"}}
    return out


def format_human(res: dict) -> str:
    lines = [f"generate on {res['device']} ({res['platform']}): {res['model']}, batch {res['batch']}, "
             f"{res['new_tokens']} new tokens, steering at {res['site']} (TopK d_sae {res['d_sae']})"]
    base = res["tokens_per_s"]["unsteered"]
    lines.append(f"  unsteered: {base:,.1f} tokens/s")
    for name, ov in res["overhead"].items():
        lines.append(f"  {name}: {res['tokens_per_s'][name]:,.1f} tokens/s  overhead {100 * ov:+.1f}%")
    return "\n".join(lines)
