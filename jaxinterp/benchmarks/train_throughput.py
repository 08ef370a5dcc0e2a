"""Training throughput of the sharded train step, beside the machine's matmul throughput and,
optionally, EleutherAI's sparsify doing the same work in the same run.

A timed step is the whole jitted train step of `jaxinterp.train.step` (forward, backward, decoder
projection, Adam, renormalisation, dead-feature counters, fault checks) on batches already on the
device, after a compile and warm-up; steps are dispatched back to back and the figure is total time
over steps, as for sparsify and the training loop.

Model FLOPs of a TopK step: the encoder matmul 2*B*D*F, plus the sparse decode forward and backward
(6*B*K*D) and the sparse encoder backward (4*B*K*D). Dense kinds: 2*B*D*F for each of the encoder
forward, the decoder forward, and the three backward matmuls (10*B*D*F).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp import dictionaries as dl
from jaxinterp.config import DictionaryConfig, config_from_dict
from jaxinterp.train import sharding
from jaxinterp.train.step import build_step, init_state, make_spec, place_state

# Dense bf16 peak FLOP/s by device kind (vendor figures), for model-FLOPs utilisation.
PEAK_BF16 = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


@dataclasses.dataclass(frozen=True)
class Case:
    d_in: int
    d_sae: int
    k: int
    batch_size: int
    activation: str = "topk"
    dtype: str = "float32"
    topk_path: str = "auto"
    aux_active: bool = False
    """Time the step as it runs once some latent is dead (aux-k on every step), not a fresh one."""
    row_warmup: float = 0.0
    """`dictionary.batchtopk_row_warmup`: 0 times BatchTopK's batch-threshold steps, 0.99 its
    per-row warm-up (the timed steps are among the first)."""

    @property
    def name(self) -> str:
        return f"{self.activation} d_in={self.d_in} d_sae={self.d_sae} k={self.k} batch={self.batch_size} {self.dtype}"

    def flops(self) -> float:
        b, d, f, k = self.batch_size, self.d_in, self.d_sae, self.k
        if dl.activation(self.activation).row_topk:  # sparse decode and backward
            return 2 * b * d * f + 10 * b * k * d
        return 10 * b * d * f


CPU_CASES = (Case(256, 2048, 32, 4096), Case(768, 16384, 32, 4096))
GPU_CASES = CPU_CASES + (Case(768, 16384, 32, 4096, dtype="bfloat16"), Case(2048, 65536, 64, 8192, dtype="bfloat16"))


def _device_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Best-of-`repeats` throughput of one [n, n] @ [n, n] matmul, in GFLOP/s."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def time_case(case: Case, steps: int) -> float:
    """Seconds per train step: `steps` steps dispatched back to back on two batches already on the
    device, total time over `steps` (a throughput, measured as sparsify's is and as the training
    loop's is, so the three compare; a median of blocking steps would flatter a noisy machine)."""
    raw = {
        "data": {"source": "synthetic", "synthetic": {"d_in": case.d_in, "n_features": case.d_sae}},
        "dictionary": {"activation": case.activation, "d_sae": case.d_sae, "k": case.k, "topk_path": case.topk_path,
                       "batchtopk_row_warmup": case.row_warmup,
                       # dead after one batch without firing
                       **({"dead_tokens": 1} if case.aux_active else {})},
        "train": {"batch_size": case.batch_size, "tokens": case.batch_size * 1000, "compute_dtype": case.dtype},
    }
    cfg = config_from_dict(raw)
    spec = make_spec(cfg, case.d_in)
    keys = jax.random.split(jax.random.key(0), 2)
    xs = [np.asarray(jax.random.normal(k, (case.batch_size, case.d_in), jnp.float32)) for k in keys]
    state = init_state(cfg, spec, xs[:1])
    if case.aux_active and "b_enc" in state.params:  # a quarter of the latents that never fire
        b_enc = state.params["b_enc"].at[: case.d_sae // 4].set(-1e4)
        state = state._replace(params=state.params | {"b_enc": b_enc})
    fns = build_step(cfg, spec, sharding.make_mesh(cfg.mesh), state)
    state = place_state(state, fns)
    xbs = [jax.device_put(x, fns.batch_sharding) for x in xs]
    step = fns.step_aux_k if case.aux_active and fns.step_aux_k is not None else fns.step
    for x in xbs:  # compile, then one warm step per batch
        state, m = step(state, x)
    jax.block_until_ready((state, m))
    start = time.perf_counter()
    for i in range(steps):
        state, m = step(state, xbs[i % 2])
    jax.block_until_ready((state, m))
    return (time.perf_counter() - start) / steps


def sparsify_tokens_per_s(case: Case, steps: int, python: str | None) -> float | None:
    """sparsify's tokens/s for the same case: in-process when importable, else via `python`."""
    from jaxinterp.benchmarks import sparsify_baseline

    if python is None and sparsify_baseline.available():
        return sparsify_baseline.sparsify_tokens_per_s(case.d_in, case.d_sae, case.k, case.batch_size, steps=steps)
    if python is None:
        return None
    out = subprocess.run(
        [python, "-m", "jaxinterp.benchmarks.sparsify_baseline", "--d-in", str(case.d_in), "--d-sae", str(case.d_sae),
         "--k", str(case.k), "--batch-size", str(case.batch_size), "--steps", str(steps)],
        capture_output=True, text=True, check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])


def activation_ratios(activations: tuple[str, ...], steps: int, repeats: int = 2) -> list[dict]:
    """Each activation's step tokens/s on the first CPU case against TopK's, timed alternately in
    this run (`repeats` rounds; the ratio of each round, and their median)."""
    base = CPU_CASES[0]
    rows = []
    for act in activations:
        ratios, own, topk, warm = [], [], [], []
        per_row_warmup = dl.activation(act).selects_over_batch
        for _ in range(repeats):
            t_topk = time_case(base, steps)
            t_act = time_case(dataclasses.replace(base, activation=act), steps)
            ratios.append(t_topk / t_act)
            own.append(base.batch_size / t_act)
            topk.append(base.batch_size / t_topk)
            if per_row_warmup:  # its warm-up steps too, and a default run's mix of the two
                warm.append(t_topk / time_case(dataclasses.replace(base, activation=act, row_warmup=0.99), steps))
        row = {"activation": act, "tokens_per_s": float(np.median(own)), "topk_tokens_per_s": float(np.median(topk)),
               "ratio_vs_topk": float(np.median(ratios)), "ratios": ratios}
        if warm:
            w = DictionaryConfig.batchtopk_row_warmup
            r_warm, r_batch = float(np.median(warm)), row["ratio_vs_topk"]
            row |= {"warmup_ratio_vs_topk": r_warm, "warmup_ratios": warm, "default_warmup": w,
                    "run_ratio_vs_topk": 1 / (w / r_warm + (1 - w) / r_batch)}
        rows.append(row)
    return rows


def run(*, steps: int = 10, compare: str | None = None, sparsify_python: str | None = None,
        cases: tuple[Case, ...] | None = None, vs_topk: tuple[str, ...] = ()) -> dict:
    platform = jax.devices()[0].platform
    if cases is None:
        cases = GPU_CASES if platform == "gpu" else CPU_CASES
    if platform != "gpu":
        cases = tuple(c for c in cases if c.dtype == "float32")
    mm = matmul_gflops()
    peak = _device_peak()
    results = []
    for case in cases:
        sec = time_case(case, steps)
        r = {
            "case": case.name,
            **dataclasses.asdict(case),
            "step_s": sec,
            "tokens_per_s": case.batch_size / sec,
            "model_gflops": case.flops() / sec / 1e9,
            "fraction_of_matmul": case.flops() / sec / 1e9 / mm,
        }
        if peak is not None and case.dtype == "bfloat16":
            r["mfu"] = case.flops() / sec / peak
        if compare == "sparsify" and case.dtype == "float32" and dl.activation(case.activation).row_topk:  # sparsify trains TopK
            sp = sparsify_tokens_per_s(case, steps, sparsify_python)
            if sp is not None:
                r["sparsify_tokens_per_s"] = sp
                r["ratio_vs_sparsify"] = r["tokens_per_s"] / sp
        results.append(r)
    head = results[0]
    out = {
        "benchmark": "train",
        "device": jax.devices()[0].device_kind,
        "platform": platform,
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "matmul_gflops": mm,
        "tokens_per_s": head["tokens_per_s"],
        "fraction_of_matmul": head["fraction_of_matmul"],
        "cases": results,
    }
    if vs_topk:
        out["vs_topk"] = activation_ratios(vs_topk, steps)
    if "ratio_vs_sparsify" in head:
        out["sparsify_tokens_per_s"] = head["sparsify_tokens_per_s"]
        out["ratio_vs_sparsify"] = head["ratio_vs_sparsify"]
    elif compare == "sparsify":
        out["sparsify"] = "not installed: pip install torch==2.13.0 eai-sparsify, or pass --sparsify-python"
    return out


def format_human(res: dict) -> str:
    lines = [f"train throughput on {res['device']} ({res['platform']}, {res['n_devices']} device(s), jax {res['jax']})",
             f"  float32 matmul: {res['matmul_gflops']:.1f} GFLOP/s (2048^3)"]
    for r in res["cases"]:
        s = (f"  {r['case']}: {r['tokens_per_s']:,.0f} tokens/s ({r['step_s'] * 1e3:.1f} ms/step), "
             f"{r['model_gflops']:.1f} model GFLOP/s = {r['fraction_of_matmul']:.0%} of matmul")
        if "mfu" in r:
            s += f", MFU {r['mfu']:.1%}"
        if "ratio_vs_sparsify" in r:
            s += f"\n    sparsify: {r['sparsify_tokens_per_s']:,.0f} tokens/s -> ratio {r['ratio_vs_sparsify']:.2f}x"
        lines.append(s)
    if "sparsify" in res:
        lines.append(f"  sparsify: {res['sparsify']}")
    for r in res.get("vs_topk", []):
        lines.append(f"  {r['activation']}: {r['tokens_per_s']:,.0f} tokens/s against TopK's {r['topk_tokens_per_s']:,.0f} "
                     f"(same case, alternated) -> ratio {r['ratio_vs_topk']:.2f} (rounds: "
                     f"{', '.join(f'{x:.2f}' for x in r['ratios'])})")
        if "warmup_ratio_vs_topk" in r:
            lines.append(f"    those are batch-threshold steps; its per-row warm-up steps: ratio {r['warmup_ratio_vs_topk']:.2f} "
                         f"(rounds: {', '.join(f'{x:.2f}' for x in r['warmup_ratios'])}); a run with the default "
                         f"warm-up ({r['default_warmup']:.0%} of the steps): ratio {r['run_ratio_vs_topk']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(), indent=2), file=sys.stdout)
