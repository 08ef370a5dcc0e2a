"""Cross-layer transcoder training: step throughput, its fraction of the machine's matmul rate, the
memory estimate against what the compiled step allocates, and a (4, 2) mesh against one device.

A timed step is the whole jitted CLT train step (`jaxinterp.train.clt_step`: forward, backward,
decoder projection, Adam, renormalisation, dead counters, fault checks) on random rows already on
the device, after a compile and a warm-up step.

Model FLOPs of a top-k CLT step with B rows, L layers, D d_model, F features per layer, K per layer
and S = sum_l T_l target blocks: the encoder forward and its weight gradient, 4 B L D F, and the
sparse decoder forward and backward (values' and rows' gradients), 6 B K D S.

"Measured" memory is what XLA's buffer assignment gives the compiled step per device (arguments
plus temporaries; the donated state is counted once) and, where the backend reports it, the
device's peak bytes in use after the timed steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from jaxinterp.benchmarks.train_throughput import PEAK_BF16, matmul_gflops
from jaxinterp.config import config_from_dict
from jaxinterp.train import clt_step, sharding
from jaxinterp.train.step import place_state

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Case:
    d_sae: int
    span: int | None
    batch_size: int
    k: int = 32
    n_layers: int = 30
    d_model: int = 576
    dtype: str = "float32"
    mesh: tuple[int, int] = (1, 1)

    @property
    def name(self) -> str:
        return (f"L={self.n_layers} D={self.d_model} F={self.d_sae} k={self.k} span={self.span or self.n_layers} "
                f"batch={self.batch_size} {self.dtype} mesh={self.mesh[0]}x{self.mesh[1]}")

    def config(self):
        return config_from_dict({
            "data": {"source": "cache", "path": "unused"},
            "dictionary": {"architecture": "clt", "activation": "topk", "d_sae": self.d_sae, "k": self.k,
                           "clt": {"span": self.span}},
            "train": {"batch_size": self.batch_size, "tokens": self.batch_size * 100, "lr": 1e-3,
                      "compute_dtype": self.dtype},
            "mesh": {"data": self.mesh[0], "model": self.mesh[1]},
        })

    def spec(self):
        return clt_step.make_spec(self.config(), self.n_layers, self.d_model)

    def flops(self) -> float:
        spec = self.spec()
        s = sum(spec.targets(l) for l in range(spec.n_layers))
        b, l, d, f, k = self.batch_size, self.n_layers, self.d_model, self.d_sae, self.k
        return 4 * b * l * d * f + 6 * b * k * d * s


def time_case(case: Case, steps: int) -> dict:
    cfg = case.config()
    spec = case.spec()
    mesh = sharding.make_mesh(cfg.mesh)
    est = clt_step.memory_estimate(cfg, spec, mesh)
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=(case.batch_size, 2 * case.n_layers * case.d_model)).astype(np.float32) for _ in range(2)]
    state = clt_step.init_state(cfg, spec, rows[:1])
    fns = clt_step.build_step(cfg, spec, mesh, state)
    state = place_state(state, fns)
    batches = [jax.device_put(r, fns.batch_sharding) for r in rows]
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda s, x: clt_step.train_step(cfg, spec, clt_step.make_optimizer(cfg, spec), s, x),
                           in_shardings=(fns.state_sharding, fns.batch_sharding),
                           out_shardings=(fns.state_sharding, None), donate_argnums=0).lower(state, batches[0]).compile()
    ma = compiled.memory_analysis()
    xla_bytes = None if ma is None else int(ma.argument_size_in_bytes + ma.temp_size_in_bytes
                                            + max(ma.output_size_in_bytes - ma.alias_size_in_bytes, 0))
    state, m = fns.step(state, batches[0])
    jax.block_until_ready(m)
    t = time.perf_counter()
    for i in range(steps):
        state, m = fns.step(state, batches[i % 2])
    jax.block_until_ready(m)
    sec = (time.perf_counter() - t) / steps
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends do not report memory
        stats = None
    return {"case": case.name, "n_weights": spec.n_weights, "seconds_per_step": sec,
            "tokens_per_s": case.batch_size / sec, "model_tflops": case.flops() / sec / 1e12,
            "estimate_bytes_per_device": est.total, "estimate": est._asdict(), "xla_bytes_per_device": xla_bytes,
            "peak_bytes_in_use": None if not stats else stats.get("peak_bytes_in_use"), "loss": float(m["loss"])}


def _mesh_child(case: Case, steps: int) -> dict:
    """`time_case` in a fresh process with 8 fake CPU devices (the device count is fixed at start)."""
    code = ("import json, sys; from jaxinterp.benchmarks.clt import Case, time_case; "
            f"print(json.dumps(time_case(Case(**json.loads(sys.argv[1])), {steps})))")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    args = json.dumps(dataclasses.asdict(case))
    out = subprocess.run([sys.executable, "-c", code, args], env=env, capture_output=True, text=True, timeout=3600,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if out.returncode:
        raise RuntimeError(f"the mesh comparison failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(*, widths: tuple[int, ...] = (1152, 4608), span: int | None = 4, batch_size: int = 256, k: int = 32,
        steps: int = 3, dtype: str = "float32", mesh_compare: bool = True) -> dict:
    dev = jax.devices()[0]
    mm = matmul_gflops()
    cases = []
    for f in widths:
        r = time_case(Case(d_sae=f, span=span, batch_size=batch_size, k=k, dtype=dtype), steps)
        r["fraction_of_matmul"] = r["model_tflops"] * 1e3 / mm
        cases.append(r)
    out = {"device": f"{dev.platform} {dev.device_kind}", "n_devices": jax.device_count(), "matmul_gflops": mm,
           "peak_bf16_flops": PEAK_BF16.get(next((k for k in PEAK_BF16 if k in dev.device_kind), ""), None),
           "cases": cases}
    if mesh_compare and dev.platform == "cpu":
        base = Case(d_sae=widths[0], span=span, batch_size=batch_size, k=k, dtype=dtype)
        one = _mesh_child(base, steps)
        many = _mesh_child(dataclasses.replace(base, mesh=(4, 2)), steps)
        out["mesh"] = {"one_device": one, "mesh_4x2": many, "ratio_4x2_over_1": many["tokens_per_s"] / one["tokens_per_s"],
                       "loss_equal_to": abs(many["loss"] - one["loss"]) / max(abs(one["loss"]), 1e-12)}
    return out


def format_human(res: dict) -> str:
    lines = [f"device: {res['device']} ({res['n_devices']} devices); matmul {res['matmul_gflops']:.0f} GFLOP/s"]
    for c in res["cases"]:
        xla = c["xla_bytes_per_device"]
        peak = c["peak_bytes_in_use"]
        lines.append(f"{c['case']}: {c['n_weights']:,} weights, {c['tokens_per_s']:.0f} tokens/s "
                     f"({c['seconds_per_step']:.2f} s/step), {c['fraction_of_matmul']:.1%} of matmul; memory "
                     f"estimate {c['estimate_bytes_per_device'] / GIB:.2f} GiB/device, compiled step "
                     f"{'n/a' if xla is None else f'{xla / GIB:.2f} GiB'}"
                     + ("" if peak is None else f", peak in use {peak / GIB:.2f} GiB"))
    if "mesh" in res:
        m = res["mesh"]
        lines.append(f"(4, 2) mesh of fake CPU devices vs 1 device, same batch: {m['mesh_4x2']['tokens_per_s']:.0f} vs "
                     f"{m['one_device']['tokens_per_s']:.0f} tokens/s (ratio {m['ratio_4x2_over_1']:.2f}); "
                     f"first-step loss differs by {m['loss_equal_to']:.1e} (relative)")
    return "\n".join(lines)
