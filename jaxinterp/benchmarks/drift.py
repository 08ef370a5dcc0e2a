"""Drift-statistics throughput: the jitted scan-based Welford update against a per-element Python
implementation of the same statistics (the shape of the seeds' sketch), and the cost of monitoring
one site inside SmolLM2 generation.

A refresh folds one batch of `tokens` feature rows (top-k ids and values, as a TopK dictionary
produces them; or dense [tokens, d_sae]) into the per-feature statistics. `refresh_hz` is refreshes
per second (median over timed calls after a compile); the Python loop is timed on one batch.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.benchmarks.timing import interleaved_medians, median_seconds
from jaxinterp.monitor import stats as st


def python_loop_update(count, mean, m2, ids, vals):
    """Welford's update one value at a time, per feature (the reference the jitted path replaces)."""
    for row_ids, row_vals in zip(ids.tolist(), vals.tolist()):
        for f, v in zip(row_ids, row_vals):
            if v <= 0:
                continue
            count[f] += 1
            d = v - mean[f]
            mean[f] += d / count[f]
            m2[f] += d * (v - mean[f])


def run(*, d_sae: int = 16384, tokens: int = 4096, k: int = 32, repeats: int = 20, generation: bool = True,
        model: str = "smollm2-135m", site: str = "blocks.15.resid_post") -> dict:
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(d_sae, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    vals = rng.gamma(2.0, 1.0, size=(tokens, k)).astype(np.float32)
    jids, jvals = jnp.asarray(ids), jnp.asarray(vals)
    update = jax.jit(lambda s, i, v: st.update(s, (i, v), chunk=1024))
    state = st.empty(d_sae)
    t_topk = median_seconds(lambda: update(state, jids, jvals), repeats)
    dense = np.zeros((tokens, d_sae), np.float32)
    np.put_along_axis(dense, ids, vals, axis=1)
    jdense = jnp.asarray(dense)
    update_dense = jax.jit(lambda s, x: st.update(s, x, chunk=256))
    t_dense = median_seconds(lambda: update_dense(state, jdense), max(3, repeats // 4))
    count, mean, m2 = np.zeros(d_sae), np.zeros(d_sae), np.zeros(d_sae)
    t = time.perf_counter()
    python_loop_update(count, mean, m2, ids, vals)
    t_py = time.perf_counter() - t
    ref = update(state, jids, jvals)
    np.testing.assert_allclose(np.asarray(ref.mean), mean, rtol=1e-4, atol=1e-4)  # same statistics
    dev = jax.devices()[0]
    out = {"benchmark": "drift", "device": dev.device_kind, "platform": dev.platform, "d_sae": d_sae,
           "tokens_per_batch": tokens, "k": k,
           "refresh_hz": 1.0 / t_topk, "updates_per_s": tokens / t_topk,
           "dense_refresh_hz": 1.0 / t_dense,
           "python_loop_refresh_hz": 1.0 / t_py, "speedup_vs_python_loop": t_py / t_topk}
    if generation:
        out |= _generation_overhead(model, site)
    return out


def _generation_overhead(model: str, site: str, batch: int = 8, new_tokens: int = 32, repeats: int = 5) -> dict:
    from jaxinterp.dictionaries import sae as dl
    from jaxinterp.generation import Monitor, generate
    from jaxinterp.models import load_model
    from jaxinterp.steering import DictionaryRegistry

    lm, _ = load_model(model)
    spec = dl.DictionarySpec(activation="topk", d_in=lm.cfg.d_model, d_sae=4608, k=32)
    reg = DictionaryRegistry().add(site, spec, dl.init(jax.random.key(0), spec))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, lm.cfg.vocab_size, size=24).tolist() for _ in range(batch)]
    variants = {"plain": None, "monitored": Monitor(sites=(site,), window=256)}

    def call(mon):
        return generate(lm, prompts, max_new_tokens=new_tokens, stop=(), dictionaries=reg, monitor=mon).tokens

    med = interleaved_medians(variants, call, repeats)
    return {"generation_model": model, "generation_site": site, "generation_tokens_per_s": batch * new_tokens / med["plain"],
            "monitored_tokens_per_s": batch * new_tokens / med["monitored"],
            "generation_overhead": med["monitored"] / med["plain"] - 1}


def format_human(res: dict) -> str:
    lines = [f"drift statistics on {res['device']} ({res['platform']}): d_sae {res['d_sae']}, "
             f"{res['tokens_per_batch']} tokens per batch, top-{res['k']}",
             f"  jitted refresh: {res['refresh_hz']:,.1f} Hz ({res['updates_per_s']:,.0f} token rows/s); dense input "
             f"{res['dense_refresh_hz']:,.2f} Hz",
             f"  Python loop: {res['python_loop_refresh_hz']:,.3f} Hz  -> speedup {res['speedup_vs_python_loop']:,.0f}x"]
    if "generation_overhead" in res:
        lines.append(f"  monitoring {res['generation_site']} in {res['generation_model']} generation: "
                     f"{res['monitored_tokens_per_s']:,.1f} vs {res['generation_tokens_per_s']:,.1f} tokens/s, "
                     f"overhead {100 * res['generation_overhead']:+.1f}%")
    return "\n".join(lines)
