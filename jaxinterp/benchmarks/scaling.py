"""Scaling on paper: what each train step moves between devices, and the step time and tokens/s
that follow on TPU v5e slices and 8 x H100, for the default SAE, a 16x-wider one and a SmolLM2 CLT.

Axes: `B` tokens per data shard per step, `D` d_model, `F` features (per layer for a CLT), `K`
active features per row (per layer), `L` CLT layers, `M` the mesh's `model` size, `N` its `data` size.

The model (`predict`), per device and per step, with no overlap of its parts (an upper bound):

  compute   model FLOPs / (peak bf16 FLOP/s x `MFU`): a TopK SAE step is 2 B D F / M for the encoder
            matmul plus 10 B K D for the sparse decode, its backward and the sparse encoder backward
            (`train_throughput`); a CLT step 2 B L D F / M plus, per row and layer, 6 K D for each
            layer a feature writes to and 4 K D for the encoder's sparse backward
  memory    the optimizer update: 28 bytes per parameter held (Adam reads the parameter, its
            gradient and two moments and writes three, float32), over HBM bandwidth
  gradients the all-reduce over `data` of the float32 gradient of the parameters a device holds
            (1/M of the split ones): a ring moves 2 (N - 1) / N of it through each device
  top-k     with M > 1 each row's candidates are merged over `model` (an all-gather of K values
            and indices, 8 bytes each, from every shard) and the decoder's partial outputs summed
            (an all-reduce of B D float32): per token 8 K (M - 1) + 8 D (M - 1) / M bytes
  forward   with live activations, the language model up to the site on the same B tokens (2 x
            its parameters up to there per token, attention ignored at context 128)

Interconnect figures are effective all-reduce bandwidths per device, below the links' peaks on
purpose; `MFU` is an assumption. Measured on this machine in the same run: the default SAE step
and the SmolLM2 forward to its site, so their ratio (the live forward's share) is a measurement.
"""

from __future__ import annotations

import dataclasses

MFU = 0.4
"""Fraction of peak bf16 FLOP/s assumed for the step's matmuls."""


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    devices: int
    peak_flops: float
    """bf16 dense FLOP/s per device (vendor figure)."""
    hbm_bytes_per_s: float
    hbm_gib: float
    allreduce_bytes_per_s: float
    """Effective all-reduce bandwidth per device (assumed, below the links' peak)."""


# v5e: 197 TFLOP/s, 819 GB/s HBM, 16 GB, 1,600 Gbit/s of ICI per chip (200 GB/s): half taken as the
# ring all-reduce's bandwidth. H100 SXM: 989 TFLOP/s, 3.35 TB/s, 80 GB, NVLink 4 at 450 GB/s each
# way: 300 GB/s taken for NCCL's ring.
HARDWARE = (
    Hardware("v5e-16", 16, 197e12, 819e9, 16, 100e9),
    Hardware("v5e-64", 64, 197e12, 819e9, 16, 100e9),
    Hardware("v5e-256", 256, 197e12, 819e9, 16, 100e9),
    Hardware("8 x H100", 8, 989e12, 3.35e12, 80, 300e9),
)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    d_model: int
    d_sae: int
    k: int
    n_layers: int = 1
    """1: an SAE; L: a CLT over L layers."""
    targets: int = 1
    """Sum over the CLT's layers of the layers each one writes to (1 for an SAE)."""
    lm_flops_per_token: float = 0.0
    """The language model's forward up to the site, per token."""

    @property
    def clt(self) -> bool:
        return self.n_layers > 1

    @property
    def params(self) -> int:
        d, f, n = self.d_model, self.d_sae, self.n_layers
        if not self.clt:
            return 2 * d * f + f + d
        return f * d * (n + self.targets) + n * f + n * d

    def flops_per_token(self, model: int) -> float:
        d, f, k, n = self.d_model, self.d_sae, self.k, self.n_layers
        if not self.clt:
            return 2 * d * f / model + 10 * k * d
        return 2 * n * d * f / model + 6 * k * d * self.targets + 4 * k * d * n

    def topk_bytes_per_token(self, model: int) -> float:
        if model == 1:
            return 0.0
        return self.n_layers * (8 * self.k * (model - 1) + 8 * self.d_model * (model - 1) / model)


def smollm2_forward_flops(layers: int) -> float:
    """2 x the parameters of SmolLM2-135M's first `layers` blocks (d 576, 9 query / 3 key-value heads of
    64, MLP 1,536), per token."""
    d, ff, kv = 576, 1536, 3 * 64
    per_block = d * d * 2 + d * kv * 2 + 3 * d * ff
    return 2.0 * per_block * layers


WORKLOADS = (
    Workload("default SAE (F 4,608, k 32)", 576, 4608, 32, lm_flops_per_token=smollm2_forward_flops(16)),
    Workload("16x-wider SAE (F 73,728, k 32)", 576, 73728, 32, lm_flops_per_token=smollm2_forward_flops(16)),
    # the README's scaled-up CLT: all 30 layers, 4,608 features each, every later layer (span 30)
    Workload("SmolLM2 CLT (30 x 4,608, k 32)", 576, 4608, 32, n_layers=30, targets=30 * 31 // 2,
             lm_flops_per_token=smollm2_forward_flops(30)),
)


def predict(w: Workload, hw: Hardware, *, model: int, tokens_per_device: int, live: bool) -> dict:
    """Seconds per step and tokens/s of `w` on `hw` with `model` devices per data shard and
    `tokens_per_device` x `model` tokens per data shard per step."""
    data = hw.devices // model
    tokens = tokens_per_device * model  # per data shard: the `model` devices share its rows
    held = w.params / model
    compute = tokens * w.flops_per_token(model) / (hw.peak_flops * MFU)
    memory = 28 * held / hw.hbm_bytes_per_s
    grads = 2 * (data - 1) / data * 4 * held / hw.allreduce_bytes_per_s if data > 1 else 0.0
    topk = tokens * w.topk_bytes_per_token(model) / hw.allreduce_bytes_per_s
    forward = tokens * w.lm_flops_per_token / model / (hw.peak_flops * MFU) if live else 0.0
    step = compute + memory + grads + topk + forward
    comm = grads + topk
    return {"workload": w.name, "hardware": hw.name, "mesh": f"{data}x{model}", "live": live,
            "global_batch": tokens * data, "params": w.params, "grad_bytes_per_device": 4 * held,
            "topk_bytes_per_device": tokens * w.topk_bytes_per_token(model),
            "fits": 16 * held / 2**30 < 0.8 * hw.hbm_gib,  # weights, Adam's two moments, gradient
            "seconds": {"compute": compute, "memory": memory, "gradients": grads, "topk": topk, "forward": forward},
            "step_s": step, "tokens_per_s": tokens * data / step, "comm_fraction": comm / step}


def crossover_tokens(w: Workload, hw: Hardware, *, model: int) -> float | None:
    """Tokens per device per step below which communication takes longer than the step's compute
    (cache source; None: it always does, the per-token top-k traffic outweighing the compute)."""
    data = hw.devices // model
    grads = 2 * (data - 1) / data * 4 * w.params / model / hw.allreduce_bytes_per_s if data > 1 else 0.0
    per_token = w.flops_per_token(model) / (hw.peak_flops * MFU)  # per token of a data shard, per device
    comm_per_token = w.topk_bytes_per_token(model) / hw.allreduce_bytes_per_s
    if comm_per_token >= per_token:
        return None
    return grads / (per_token - comm_per_token) / model


def table(*, tokens_per_device: int = 4096, models=(1, 2, 4, 8)) -> list[dict]:
    rows = []
    for w in WORKLOADS:
        for hw in HARDWARE:
            for m in models:
                for live in (False, True):
                    rows.append(predict(w, hw, model=m, tokens_per_device=tokens_per_device, live=live))
    return rows


def best_mesh(rows: list[dict], workload: str, hardware: str, live: bool) -> dict:
    """The fastest mesh that fits, of `rows` for one workload, machine and source."""
    fit = [r for r in rows if r["workload"] == workload and r["hardware"] == hardware and r["live"] == live
           and r["fits"]]
    return max(fit, key=lambda r: r["tokens_per_s"])


def measure(*, steps: int = 10) -> dict:
    """This machine: the default SAE's train step (batch 1,024) and SmolLM2's forward to
    blocks.15.resid_post on 8 contexts of 128 tokens, tokens/s each."""
    import jax

    from jaxinterp.benchmarks import harvest
    from jaxinterp.benchmarks.train_throughput import Case, time_case

    sec = time_case(Case(d_in=576, d_sae=4608, k=32, batch_size=1024), steps)
    fwd = harvest.run(model="smollm2-135m", site="blocks.15.resid_post", contexts=8)
    dev = jax.devices()[0]
    return {"device": f"{dev.platform} {dev.device_kind} x {jax.device_count()}",
            "sae_step_tokens_per_s": 1024 / sec, "sae_step_s": sec,
            "sae_model_gflops": 1024 * WORKLOADS[0].flops_per_token(1) / sec / 1e9,
            "forward_tokens_per_s": fwd["activations_per_s"],
            "forward_over_step": (1024 / sec) / fwd["activations_per_s"]}


def run(*, tokens_per_device: int = 4096, measured: bool = True) -> dict:
    rows = table(tokens_per_device=tokens_per_device)
    best = [best_mesh(rows, w.name, hw.name, live) for w in WORKLOADS for hw in HARDWARE for live in (False, True)]
    cross = [{"workload": w.name, "hardware": hw.name, "model": m, "tokens_per_device": crossover_tokens(w, hw, model=m)}
             for w in WORKLOADS for hw in HARDWARE for m in (1, 4)]
    return {"mfu_assumed": MFU, "tokens_per_device": tokens_per_device, "rows": rows, "best": best,
            "crossover": cross, "measured": measure() if measured else None}


def format_human(res: dict) -> str:
    lines = [f"predicted (MFU {res['mfu_assumed']:.0%} assumed, {res['tokens_per_device']:,} tokens per device per "
             "step); best mesh that fits per workload, machine and source:"]
    lines.append(f"{'workload':32} {'machine':9} {'source':6} {'mesh':7} {'step ms':>8} {'tokens/s':>13} "
                 f"{'comm':>5}  grads MB/dev  top-k MB/dev")
    for r in res["best"]:
        lines.append(f"{r['workload']:32} {r['hardware']:9} {'live' if r['live'] else 'cache':6} {r['mesh']:7} "
                     f"{r['step_s'] * 1e3:8.2f} {r['tokens_per_s']:13,.0f} {r['comm_fraction']:5.0%}  "
                     f"{r['grad_bytes_per_device'] / 1e6:12.1f}  {r['topk_bytes_per_device'] / 1e6:12.1f}")
    lines.append("communication outweighs compute below these tokens per device per step (cache source):")
    for c in res["crossover"]:
        t = c["tokens_per_device"]
        lines.append(f"  {c['workload']:32} {c['hardware']:9} model={c['model']}: "
                     + (f"{t:,.0f}" if t is not None else "always (top-k merges outweigh the compute)"))
    m = res.get("measured")
    if m:
        lines.append(f"measured on {m['device']}: default SAE step {m['sae_step_tokens_per_s']:,.0f} tokens/s "
                     f"({m['sae_model_gflops']:.0f} model GFLOP/s); SmolLM2 forward to blocks.15 "
                     f"{m['forward_tokens_per_s']:,.0f} tokens/s; the step runs {m['forward_over_step']:.1f}x faster "
                     "than the forward that feeds it")
    return "\n".join(lines)
