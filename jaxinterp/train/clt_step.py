"""The train state and sharded train step of a cross-layer transcoder (`dictionary.architecture: clt`).

Axes: `B` batch, `L` covered layers, `D` d_model, `F` features per layer.

The same loop, checkpoints and metrics as the SAE step (`step.py`); what differs is the
parameters (`dictionaries.clt`), the batch (rows [B, 2 L D]: every covered layer's input, then
every one's mlp_out, see `clt.split_rows`) and the dead counters, [L, F]. Every large array is split
over `d_sae` on the `model` axis and the batch over `data` (`clt.param_axes` through the one
logical-axis rules table), so the same code runs on one device, a (4, 2) mesh of fake CPU devices
and a pod slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxinterp.config import Config, ConfigError
from jaxinterp import dictionaries as dl
from jaxinterp.dictionaries import clt
from jaxinterp.train import health, optimizers
from jaxinterp.train.schedules import lr_schedule, sparsity_warmup
from jaxinterp.train.state import TrainState
from jaxinterp.train.step import INT_MAX, StepFns, compile_steps

GIB = 2**30


def make_spec(cfg: Config, n_layers: int, d_model: int) -> clt.CLTSpec:
    """The CLT's static shape for `n_layers` covered layers of width `d_model` (from the data)."""
    d, c = cfg.dictionary, cfg.dictionary.clt
    d_sae = d.d_sae if d.d_sae is not None else d_model * d.expansion
    if dl.selects_k(d.activation) and d.k > d_sae:
        raise ConfigError(f"dictionary.k: k={d.k} exceeds d_sae={d_sae} (features per layer); lower k or raise d_sae")
    return clt.CLTSpec(activation=d.activation, n_layers=n_layers, d_model=d_model, d_sae=d_sae, k=d.k,
                       span=c.span, skip=c.skip, first_layer=c.first_layer, input_point=c.input_point,
                       jumprelu_bandwidth=d.jumprelu_bandwidth, tanh_scale=c.tanh_scale,
                       compute_dtype=cfg.train.compute_dtype,
                       topk_path="dense" if d.topk_path == "dense" else ("sparse" if d.topk_path == "auto" else d.topk_path))


def state_axes(spec: clt.CLTSpec) -> dict[str, tuple]:
    """Logical axes of every named array of the state: the parameters' and the dead counters'."""
    return clt.param_axes(spec) | {"tokens_since_fired": ("layer", "d_sae")}


def aux_k(cfg: Config, spec: clt.CLTSpec) -> int:
    """Dead features per layer and row in the aux-k loss (0: none; topk only); unset: 2 k. Not
    an SAE's d_model / 2: each one selected decodes into all its T target layers, and at 288 per
    layer (SmolLM2) the aux-k step of `configs/clt.yaml` ran 2.7x slower than the plain one."""
    d = cfg.dictionary
    if not spec.selects_k or d.aux_k_coefficient <= 0:
        return 0
    return min(d.aux_k if d.aux_k is not None else 2 * spec.k, spec.d_sae)


def make_optimizer(cfg: Config, spec: clt.CLTSpec) -> optax.GradientTransformation:
    return optimizers.make_optimizer(cfg.train, spec.d_sae)


def loss_weights(cfg: Config, spec: clt.CLTSpec, step) -> clt.LossWeights:
    if not spec.penalised:
        return clt.LossWeights()
    return clt.LossWeights(sparsity=cfg.dictionary.l0_coefficient * sparsity_warmup(cfg.train, step),
                           pre_act=cfg.dictionary.clt.pre_act_coefficient)


def unit_norm(cfg: Config, spec: clt.CLTSpec) -> bool:
    """topk CLTs keep each feature's concatenated decoder at norm one (jumprelu's penalty reads the norms)."""
    return spec.selects_k and cfg.dictionary.unit_norm_decoder


# ---------------------------------------------------------------------------------------------
# memory


def memory_estimate(cfg: Config, spec: clt.CLTSpec, mesh: Mesh | None = None, *, data: int = 1,
                    model: int = 1) -> clt.MemoryEstimate:
    """Bytes per device on `mesh` (or on a `data` x `model` mesh that need not exist here)."""
    if mesh is not None:
        data, model = mesh.shape["data"], mesh.shape["model"]
    slots = 2 if cfg.train.optimizer == "adam" else 1
    if cfg.train.lr_schedule == "schedule_free":
        slots += 1
    return clt.memory_estimate(spec, batch=cfg.train.batch_size, data=data, model=model, optimizer_slots=slots)


def describe_memory(spec: clt.CLTSpec, est: clt.MemoryEstimate, data: int, model: int) -> str:
    return (f"CLT: {spec.n_weights:,} parameters ({spec.n_layers} layers x {spec.d_sae} features, span "
            f"{spec.span or spec.n_layers}); per device on data={data} x model={model}: weights "
            f"{est.weights / GIB:.3f} GiB, optimizer {est.optimizer / GIB:.3f} GiB, gradients {est.gradients / GIB:.3f} GiB, "
            f"activations {est.activations / GIB:.3f} GiB, total {est.total / GIB:.3f} GiB")


def device_memory_bytes(mesh: Mesh) -> int | None:
    """What the first device of `mesh` reports it can hold (None where JAX does not say: CPUs)."""
    try:
        stats = mesh.devices.flat[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    return None if not stats else stats.get("bytes_limit")


def preflight(cfg: Config, spec: clt.CLTSpec, mesh: Mesh, log) -> clt.MemoryEstimate:
    """Print the parameter count and the bytes per device; refuse (one line) a run over the budget
    (`train.memory_budget_gib`, else the device's memory where known) before anything is allocated."""
    est = memory_estimate(cfg, spec, mesh)
    log(describe_memory(spec, est, mesh.shape["data"], mesh.shape["model"]))
    budget = cfg.train.memory_budget_gib * GIB if cfg.train.memory_budget_gib > 0 else device_memory_bytes(mesh)
    if budget:
        clt.check_memory(est, int(budget), what=f"this CLT ({spec.n_weights:,} parameters)")
    return est


# ---------------------------------------------------------------------------------------------
# the state


def init_state(cfg: Config, spec: clt.CLTSpec, init_batches: list) -> TrainState:
    """Fresh state: random parameters, per-layer scales and b_dec from `init_batches` (one program)."""
    return jax.jit(lambda batches: _init_state(cfg, spec, batches))(list(init_batches))


def _init_state(cfg: Config, spec: clt.CLTSpec, init_batches: list) -> TrainState:
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1)
    params = clt.init(key, spec, threshold=cfg.dictionary.jumprelu_init_threshold)
    if unit_norm(cfg, spec):
        params = clt.normalise_decoder(spec, params)
    rows = jnp.concatenate([clt.replace_outliers(spec, jnp.asarray(b, jnp.float32), cfg.data.outlier_norm)
                            for b in init_batches])
    x, y = clt.split_rows(spec, rows)
    params = clt.fit_to_data(spec, params, x, y, normalize=cfg.dictionary.normalize_activations)
    trainable, buffers = clt.split_params(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, buffers=buffers,
                      opt_state=make_optimizer(cfg, spec).init(trainable),
                      tokens_since_fired=jnp.zeros((spec.n_layers, spec.d_sae), jnp.int32), fault=health.healthy())


# ---------------------------------------------------------------------------------------------
# the step


def train_step(cfg: Config, spec: clt.CLTSpec, tx: optax.GradientTransformation, state: TrainState, rows: jax.Array,
               *, with_aux: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on rows [B, 2 L D] (pure; `build_step` jits it). `with_aux` adds the aux-k
    loss of the dead features (topk), a static choice as in the SAE step."""
    d = cfg.dictionary
    rows = clt.replace_outliers(spec, rows, cfg.data.outlier_norm)
    x, y = clt.split_rows(spec, rows)
    weights = loss_weights(cfg, spec, state.step)
    dead = state.tokens_since_fired >= d.dead_tokens
    n_aux = aux_k(cfg, spec) if with_aux else 0

    def loss_fn(trainable):
        p = trainable | state.buffers
        out = clt.forward(spec, p, x, y, weights)
        aux = jnp.float32(0.0)
        if n_aux:
            aux = d.aux_k_coefficient * clt.aux_k_loss(spec, p, x, out, dead, n_aux)
        return out.loss + aux, (out, aux)

    (_, (out, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if unit_norm(cfg, spec):
        grads = clt.project_decoder_grad(spec, grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if unit_norm(cfg, spec):
        params = clt.normalise_decoder(spec, params)
    params = clt.clamp_params(spec, params)

    fired = clt.fired(spec, out)
    batch = rows.shape[0]
    since = jnp.where(fired, 0, jnp.minimum(state.tokens_since_fired, INT_MAX - batch) + batch)
    yn = clt.normalise_out(state.buffers, y)
    var_per_layer = jnp.mean(jnp.sum((yn - yn.mean(0)) ** 2, -1), 0)
    grad_norm = optax.tree.norm(grads)
    total = out.loss + aux
    fault = health.update_fault(state.fault, state.step, rows, total, grad_norm, out.mse,
                                target_sq=jnp.sum(jnp.mean(jnp.sum(yn**2, -1), 0)))
    new_state = TrainState(step=state.step + 1, params=params, buffers=state.buffers, opt_state=opt_state,
                           tokens_since_fired=since.astype(jnp.int32), fault=fault)
    metrics = {
        "loss": total,
        "mse": out.mse,
        "sparsity_loss": out.sparsity,
        "pre_act_loss": out.pre_act,
        "aux_loss": aux,
        "fvu": out.mse / jnp.maximum(jnp.sum(var_per_layer), 1e-12),
        "fvu_worst_layer": jnp.max(out.mse_per_layer / jnp.maximum(var_per_layer, 1e-12)),
        "l0": jnp.mean(out.l0_per_layer),
        "dead_fraction": jnp.mean(dead),
        "grad_norm": grad_norm,
        "lr": lr_schedule(cfg.train, optimizers.resolved_lr(cfg.train, spec.d_sae))(state.step),
    }
    return new_state, metrics


def build_step(cfg: Config, spec: clt.CLTSpec, mesh: Mesh, abstract_state: TrainState, *,
               max_traces: int | None = None) -> StepFns:
    """Jit `train_step` over `mesh` with declared shardings (the state donated)."""
    tx = make_optimizer(cfg, spec)

    def plain(state, rows):
        return train_step(cfg, spec, tx, state, rows)

    def with_aux_k(state, rows):
        return train_step(cfg, spec, tx, state, rows, with_aux=True)

    return compile_steps(mesh, abstract_state, state_axes(spec), cfg.train.batch_size, plain,
                         with_aux_k if aux_k(cfg, spec) else None, max_traces=max_traces)
