"""Harvest throughput: activations per second of a model stopped at a site, against the full forward
(logits included) on the same tokens in the same run, and full-forward tokens/s at batch 1 and 16.

A timed call is one jitted `forward` on a fixed [B, T] token batch, after a compile-and-warm-up
call; the median of `repeats` calls.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxinterp.benchmarks.timing import median_seconds
from jaxinterp.models import Plan, forward, load_model


def run(*, model: str = "smollm2-135m", site: str = "blocks.15.resid_post", contexts: int = 32,
        context_length: int = 128, repeats: int = 3) -> dict:
    lm, _ = load_model(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, lm.cfg.vocab_size, size=(contexts, context_length))
    stop = Plan(capture=(site,), stop_early=True)
    t_site = median_seconds(lambda: forward(lm, tokens, plan=stop).captured[site], repeats)
    t_full = median_seconds(lambda: forward(lm, tokens).logits, repeats)
    n = contexts * context_length
    out = {
        "benchmark": "harvest",
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "model": model,
        "site": site,
        "tokens_per_call": n,
        "activations_per_s": n / t_site,
        "full_forward_tokens_per_s": n / t_full,
        "ratio_site_vs_full": t_full / t_site,
    }
    for b in (1, 16):
        batch = rng.integers(0, lm.cfg.vocab_size, size=(b, context_length))
        out[f"full_forward_tokens_per_s_batch{b}"] = b * context_length / median_seconds(
            lambda: forward(lm, batch).logits, repeats)
    return out


def format_human(res: dict) -> str:
    return "\n".join([
        f"harvest on {res['device']} ({res['platform']}): {res['model']} up to {res['site']}",
        f"  activations/s: {res['activations_per_s']:,.0f}  (full forward: {res['full_forward_tokens_per_s']:,.0f} "
        f"tokens/s; stopping early is {res['ratio_site_vs_full']:.2f}x faster)",
        f"  full forward tokens/s at batch 1: {res['full_forward_tokens_per_s_batch1']:,.0f}, "
        f"batch 16: {res['full_forward_tokens_per_s_batch16']:,.0f}",
    ])
