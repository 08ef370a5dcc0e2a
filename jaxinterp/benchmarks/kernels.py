"""Top-k decode kernels against the dense decode and XLA's gather, and the TopK train step with the
sparse backward against the dense path.

Decode: `x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] + b_dec` timed four ways on the current
backend (median of `repeats` calls after a compile):
- `dense`: values scattered into [B, d_sae], then a matmul with W_dec (skipped where [B, d_sae]
  would exceed `dense_limit` elements);
- `xla_gather`: `jnp.take(W_dec, idx)` [B, K, D], then an einsum with the values;
- `sparse_loop`: the plain-JAX loops of `jaxinterp.dictionaries.sparse` (K gathers of [B, D]);
- `pallas`: the Pallas kernel (GPU/TPU only; interpret mode on CPU is a correctness tool, not timed).
Achieved bandwidth counts the bytes a decode must move: the B*K rows of W_dec read, the output
written, the indices and values read. Peak: the vendor HBM figure for known accelerators; on CPU the
best streaming-read bandwidth (a sum over 256 MiB) measured in the same run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.benchmarks.timing import median_seconds
from jaxinterp.dictionaries import sparse

PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12, "TPU v4": 1.2e12, "TPU v5 lite": 0.82e12,
            "TPU v5e": 0.82e12, "TPU v5p": 2.76e12, "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12}

CPU_GRID = [(16384, 32, 1), (16384, 32, 256), (16384, 32, 4096), (65536, 64, 256), (65536, 64, 4096),
            (262144, 128, 1), (262144, 128, 256)]
ACCEL_GRID = [(f, k, b) for f in (16384, 65536, 262144) for k in (32, 64, 128) for b in (1, 16, 256, 1024, 4096)]


def peak_bandwidth() -> tuple[float, str]:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_HBM.items():
        if name.lower() in kind.lower():
            return peak, f"vendor HBM figure for {name}"
    x = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    sec = min(median_seconds(lambda: total(x), 1) for _ in range(5))
    return x.nbytes / sec, "measured: streaming read (sum) of a 256 MiB array"


def decode_variants(d_model: int, dense_limit: int) -> dict:
    def dense(v, i, w, b):
        return sparse.scatter_dense(v, i, w.shape[0]) @ w + b

    def xla_gather(v, i, w, b):
        return jnp.einsum("bk,bkd->bd", v, jnp.take(w, i, axis=0)) + b

    def sparse_loop(v, i, w, b):
        return sparse.gather_accumulate(v, i, w) + b

    out = {"xla_gather": jax.jit(xla_gather), "sparse_loop": jax.jit(sparse_loop), "dense": jax.jit(dense)}
    if jax.default_backend() in ("gpu", "tpu"):
        from pallas_kernels.topk_decode import topk_decode

        out["pallas"] = jax.jit(lambda v, i, w, b: topk_decode(v, i, w, b, impl="pallas"))
    return out


def decode_grid(grid, *, d_model: int = 768, repeats: int = 5, dense_limit: int = 2**28, dtype=jnp.float32) -> list[dict]:
    peak, _ = peak_bandwidth()
    rows = []
    fns = decode_variants(d_model, dense_limit)
    rng = np.random.default_rng(0)
    for f, k, b in grid:
        w = jax.random.normal(jax.random.key(f), (f, d_model), dtype)
        bias = jnp.zeros((d_model,), dtype)
        idx = jnp.asarray(rng.integers(0, f, size=(b, k)), jnp.int32)
        vals = jnp.asarray(rng.random((b, k)), dtype)
        row = {"d_sae": f, "k": k, "batch": b}
        nbytes = b * k * d_model * w.dtype.itemsize + b * d_model * 4 + b * k * 8
        for name, fn in fns.items():
            if name == "dense" and b * f > dense_limit:
                continue
            sec = median_seconds(lambda: fn(vals, idx, w, bias), repeats)
            row[f"{name}_us"] = sec * 1e6
            row[f"{name}_bandwidth_fraction"] = nbytes / sec / peak
        best_ours = min(row.get("pallas_us", np.inf), row["sparse_loop_us"])
        row["speedup_vs_xla_gather"] = row["xla_gather_us"] / best_ours
        if "dense_us" in row:
            row["speedup_vs_dense"] = row["dense_us"] / best_ours
        rows.append(row)
        del w
    return rows


def train_sparse_vs_dense(d_sae: int = 16384, d_in: int = 768, k: int = 32, batch: int = 4096, steps: int = 5) -> dict:
    from jaxinterp.benchmarks.train_throughput import Case, time_case

    sparse_s = time_case(Case(d_in, d_sae, k, batch, topk_path="sparse"), steps)
    dense_s = time_case(Case(d_in, d_sae, k, batch, topk_path="dense"), steps)
    return {"train_case": f"topk d_in={d_in} d_sae={d_sae} k={k} batch={batch}", "train_sparse_step_s": sparse_s,
            "train_dense_step_s": dense_s, "train_speedup_sparse_vs_dense": dense_s / sparse_s}


def run(*, grid=None, repeats: int = 5, train: bool = True) -> dict:
    dev = jax.devices()[0]
    accel = dev.platform in ("gpu", "tpu")
    peak, peak_source = peak_bandwidth()
    out = {"benchmark": "kernels", "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
           "peak_bandwidth_gb_s": peak / 1e9, "peak_source": peak_source,
           "decode": decode_grid(grid or (ACCEL_GRID if accel else CPU_GRID), repeats=repeats)}
    if train:
        out |= train_sparse_vs_dense()
    return out


def format_human(res: dict) -> str:
    lines = [f"top-k decode on {res['device']} ({res['platform']}), peak {res['peak_bandwidth_gb_s']:,.0f} GB/s "
             f"({res['peak_source']}); times in microseconds, bandwidth as a fraction of peak"]
    names = [n for n in ("pallas", "sparse_loop", "xla_gather", "dense") if any(f"{n}_us" in r for r in res["decode"])]
    lines.append("  d_sae      k  batch  " + "  ".join(f"{n:>18}" for n in names) + "  vs gather  vs dense")
    for r in res["decode"]:
        cells = [f"{r[f'{n}_us']:>9,.0f} ({r[f'{n}_bandwidth_fraction']:.3f})" if f"{n}_us" in r else f"{'-':>18}"
                 for n in names]
        vs_dense = f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else "-"
        lines.append(f"  {r['d_sae']:>6} {r['k']:>5} {r['batch']:>6}  " + "  ".join(cells)
                     + f"  {r['speedup_vs_xla_gather']:>8.2f}x  {vs_dense:>7}")
    if "train_speedup_sparse_vs_dense" in res:
        lines.append(f"  train step {res['train_case']}: sparse backward {res['train_sparse_step_s'] * 1e3:,.0f} ms, "
                     f"dense {res['train_dense_step_s'] * 1e3:,.0f} ms -> {res['train_speedup_sparse_vs_dense']:.2f}x")
    return "\n".join(lines)
