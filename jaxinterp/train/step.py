"""Building the train state and the sharded train step.

Axes: `B` batch, `D` d_in, `F` d_sae.

`build_step` returns the jitted step with its declared input/output shardings and the donated state,
compiled once per (spec, config, mesh): the batch is split over `data`, the d_sae axis of the
parameters and their Adam moments over `model` (see `sharding.LOGICAL_RULES`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxinterp.config import ConfigError
from jaxinterp import dictionaries as dl
from jaxinterp.config import Config
from jaxinterp.sharding import check_sharded_as_declared
from jaxinterp.train import health, optimizers, sharding
from jaxinterp.train.schedules import lr_schedule, sparsity_warmup
from jaxinterp.train.state import TrainState

INT_MAX = jnp.iinfo(jnp.int32).max


def make_spec(cfg: Config, d_in: int, d_out: int | None = None) -> dl.DictionarySpec:
    """The dictionary's static shape for data of width `d_in` (and targets of width `d_out`)."""
    d = cfg.dictionary
    if d.d_in is not None and d.d_in != d_in:
        raise ConfigError(f"dictionary.d_in={d.d_in} but the data has width {d_in}; drop dictionary.d_in")
    d_sae = d.d_sae if d.d_sae is not None else d_in * d.expansion
    if dl.selects_k(d.activation) and d.k > d_sae:
        raise ConfigError(f"dictionary.k: k={d.k} exceeds d_sae={d_sae}; lower k or raise d_sae")
    if d.matryoshka_widths and d.matryoshka_widths[-1] != d_sae:
        raise ConfigError(f"dictionary.matryoshka_widths: the last width ({d.matryoshka_widths[-1]}) must equal "
                          f"d_sae ({d_sae})")
    aux_k = 0
    if dl.selects_k(d.activation) and d.aux_k_coefficient > 0:
        aux_k = min(d.aux_k if d.aux_k is not None else max(d_in // 2, 1), d_sae)
    return dl.DictionarySpec(
        activation=d.activation,
        d_in=d_in,
        d_sae=d_sae,
        k=d.k,
        aux_k=aux_k,
        jumprelu_bandwidth=d.jumprelu_bandwidth,
        topk_path=d.topk_path,
        compute_dtype=cfg.train.compute_dtype,
        architecture=d.architecture,
        d_out=d_out,
        matryoshka_widths=d.matryoshka_widths,
    )


def make_optimizer(cfg: Config, spec: dl.DictionarySpec) -> optax.GradientTransformation:
    return optimizers.make_optimizer(cfg.train, spec.d_sae)


def loss_weights(cfg: Config, step) -> dl.LossWeights:
    d = cfg.dictionary
    warm = sparsity_warmup(cfg.train, step)
    penalty = dl.sparsity_penalty(d.activation)
    if penalty == "l1":
        return dl.LossWeights(sparsity=d.l1_coefficient * warm, aux=1.0)
    if penalty == "l0":
        return dl.LossWeights(sparsity=d.l0_coefficient * warm, aux=0.0)
    row_topk = step < int(d.batchtopk_row_warmup * cfg.train.steps)
    return dl.LossWeights(sparsity=0.0, aux=d.aux_k_coefficient, row_topk=row_topk)


# ---------------------------------------------------------------------------------------------
# data-dependent initialisation


def geometric_median(x_bd: jax.Array, iters: int = 50) -> jax.Array:
    """Weiszfeld's iterations, started at the mean."""

    def body(_, m):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x_bd - m, axis=-1), 1e-6)
        return (w[:, None] * x_bd).sum(0) / w.sum()

    return jax.lax.fori_loop(0, iters, body, x_bd.mean(0))


def init_state(cfg: Config, spec: dl.DictionarySpec, init_batches: list[jax.Array]) -> TrainState:
    """Fresh state: random params, input scale and b_dec estimated from `init_batches`.

    One compiled program (op-by-op dispatch of the same work takes seconds on a CPU)."""
    return jax.jit(lambda batches: _init_state(cfg, spec, batches))(list(init_batches))


def _init_state(cfg: Config, spec: dl.DictionarySpec, init_batches: list[jax.Array]) -> TrainState:
    d = cfg.dictionary
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1)
    params = dl.init(key, spec, threshold=d.jumprelu_init_threshold)
    batch = jnp.concatenate([dl.replace_outliers(spec, jnp.asarray(b, jnp.float32), cfg.data.outlier_norm)
                             for b in init_batches])
    centre = {"geometric_median": geometric_median, "mean": lambda a: a.mean(0), "zeros": None}[d.b_dec_init]
    params = dl.fit_to_data(spec, params, batch,
                            normalize=d.normalize_activations,
                            centre=None if centre is None else lambda a: centre(a[: cfg.train.batch_size]))
    trainable, buffers = dl.split_params(spec, params)
    opt_state = make_optimizer(cfg, spec).init(trainable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        buffers=buffers,
        opt_state=opt_state,
        tokens_since_fired=jnp.zeros((spec.d_sae,), jnp.int32),
        fault=health.healthy(),
    )


# ---------------------------------------------------------------------------------------------
# the step


class StepFns(NamedTuple):
    step: Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]
    """Jitted (state, batch) -> (state, metrics) without the aux-k loss; the state is donated."""
    step_aux_k: Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]] | None
    """The same step with the aux-k loss (compiled on first use); None for kinds without one."""
    state_sharding: Any
    """Pytree of NamedShardings of the state."""
    batch_sharding: NamedSharding
    """Sharding of a [B, D] batch."""
    mesh: Mesh


def _fired(spec: dl.DictionarySpec, out: dl.ForwardOutput) -> tuple[jax.Array, jax.Array]:
    """(features that fired in the batch [F] bool, mean active features per row)."""
    if out.top_idx is not None:
        on = out.top_vals > 0
        fired = jnp.zeros((spec.d_sae,), jnp.bool_).at[out.top_idx.reshape(-1)].max(on.reshape(-1))
        return fired, jnp.mean(jnp.sum(on, -1))
    on = out.feature_acts > 0
    return jnp.any(on, axis=0), jnp.mean(jnp.sum(on, -1))


def train_step(
    cfg: Config,
    spec: dl.DictionarySpec,
    tx: optax.GradientTransformation,
    state: TrainState,
    x_bd: jax.Array,
    *,
    aux_k: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (pure; `build_step` jits it).

    `aux_k=True` adds the aux-k loss of the dead features (kinds that have one): a second top-k over
    the encoder's outputs and its backward. It is a static choice, not a `lax.cond` on the dead
    mask: on a 2-device CPU mesh an untaken cond still cost ~25% of a TopK step, so the loop keeps
    two compiled steps and picks one from the dead fraction it reads when it logs."""
    d = cfg.dictionary
    x_bd = dl.replace_outliers(spec, x_bd, cfg.data.outlier_norm)
    weights = loss_weights(cfg, state.step)
    dead = state.tokens_since_fired >= d.dead_tokens
    with_aux = aux_k and dl.has_aux_k(spec)
    aux_key = jax.random.fold_in(jax.random.key(cfg.train.seed), state.step)

    def loss_fn(trainable):
        p = trainable | state.buffers
        out = dl.forward(spec, p, x_bd, weights, training=True)
        if with_aux:
            aux = weights.aux * dl.aux_k_loss(spec, p, x_bd, out.recon, dead, aux_key)
            out = out._replace(losses=out.losses._replace(total=out.losses.total + aux, aux=aux))
        return out.losses.total, out

    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if d.unit_norm_decoder:
        grads = dl.project_decoder_grad(grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if d.unit_norm_decoder:
        params = dl.normalise_decoder(params)
    params = dl.clamp_params(spec, params)

    buffers = dl.update_buffers(spec, state.buffers, out, first=state.step == 0, ema_decay=d.threshold_ema_decay)

    fired, l0 = _fired(spec, out)
    batch = x_bd.shape[0]
    since = jnp.where(fired, 0, jnp.minimum(state.tokens_since_fired, INT_MAX - batch) + batch)
    yn = dl.split(spec, x_bd)[1].astype(jnp.float32) * dl.target_scale(spec, state.buffers)
    variance = jnp.mean(jnp.sum((yn - yn.mean(0)) ** 2, -1))
    grad_norm = optax.tree.norm(grads)
    fault = health.update_fault(state.fault, state.step, x_bd, out.losses.total, grad_norm, out.losses.mse,
                                target_sq=jnp.mean(jnp.sum(yn**2, -1)))
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        buffers=buffers,
        opt_state=opt_state,
        tokens_since_fired=since.astype(jnp.int32),
        fault=fault,
    )
    metrics = {
        "loss": out.losses.total,
        "mse": out.losses.mse,
        "sparsity_loss": out.losses.sparsity,
        "aux_loss": out.losses.aux,
        "fvu": out.losses.mse / jnp.maximum(variance, 1e-12),
        "l0": l0,
        "dead_fraction": jnp.mean(dead),
        "grad_norm": grad_norm,
        "lr": lr_schedule(cfg.train, optimizers.resolved_lr(cfg.train, spec.d_sae))(state.step),
    }
    if out.batch_threshold is not None:  # the inference threshold that the batch threshold feeds
        metrics["inference_threshold"] = jnp.mean(buffers["threshold"])
    return new_state, metrics


def build_step(
    cfg: Config, spec: dl.DictionarySpec, mesh: Mesh, abstract_state: TrainState, *, max_traces: int | None = None
) -> StepFns:
    """Jit `train_step` over `mesh` with declared shardings; `max_traces` makes retracing an error."""
    tx = make_optimizer(cfg, spec)

    def plain(state, x_bd):
        return train_step(cfg, spec, tx, state, x_bd)

    def with_aux_k(state, x_bd):
        return train_step(cfg, spec, tx, state, x_bd, aux_k=True)

    return compile_steps(mesh, abstract_state, sharding.PARAM_AXES, cfg.train.batch_size, plain,
                         with_aux_k if dl.has_aux_k(spec) else None, max_traces=max_traces)


def compile_steps(mesh: Mesh, abstract_state: TrainState, axes: dict, batch_size: int, plain, with_aux_k, *,
                  max_traces: int | None = None) -> StepFns:
    """The `StepFns` of step functions `(state, batch) -> (state, metrics)` (`with_aux_k` may be
    None): the state's shardings from the logical `axes` table (checked against the declaration),
    the batch split over `data`, each jitted with the state donated and run under `mesh`;
    `max_traces` makes retracing an error."""
    state_sh = sharding.tree_shardings(mesh, abstract_state, axes)
    check_sharded_as_declared(mesh, {k: axes[k] for k in abstract_state.params}, state_sh.params,
                              {k: tuple(v.shape) for k, v in abstract_state.params.items()})
    batch_sh = sharding.batch_sharding(mesh, batch_size)

    def compile_(fn):
        if max_traces is not None:
            fn = chex.assert_max_traces(fn, n=max_traces)
        jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)

        def run(state, batch):
            with jax.set_mesh(mesh):
                return jitted(state, batch)

        return run

    return StepFns(step=compile_(plain), step_aux_k=None if with_aux_k is None else compile_(with_aux_k),
                   state_sharding=state_sh, batch_sharding=batch_sh, mesh=mesh)


def place_state(state: TrainState, fns: StepFns) -> TrainState:
    return jax.device_put(state, fns.state_sharding)


# ---------------------------------------------------------------------------------------------
# resampling dead features (relu + L1)


def resample_dead(cfg: Config, spec: dl.DictionarySpec, state: TrainState, x_bd: jax.Array, key: jax.Array) -> TrainState:
    """Anthropic's resampling (Towards Monosemanticity, 2023): each dead feature gets the direction
    of an input drawn with probability proportional to its squared reconstruction error; encoder
    columns are scaled to 0.2x the mean alive encoder norm, b_enc and the optimizer's moments are
    reset (a schedule-free iterate restarts at the new parameters)."""
    dead = state.tokens_since_fired >= cfg.dictionary.dead_tokens
    new = dl.resample(spec, state.dictionary, x_bd, dead, key)
    new = {name: new[name] for name in state.params}

    def reset(path, leaf):
        name = sharding._param_name(path)
        if name is None or not hasattr(leaf, "shape") or leaf.ndim == 0:
            return leaf
        axes = sharding.PARAM_AXES[name]
        if "d_sae" not in axes or len(axes) != leaf.ndim:
            return leaf
        mask = jnp.expand_dims(dead, [i for i in range(leaf.ndim) if axes[i] != "d_sae"])
        if any(getattr(entry, "name", None) == "z" for entry in path):  # schedule-free iterate: restart there
            return jnp.where(mask, new[name], leaf).astype(leaf.dtype)
        return jnp.where(mask, 0.0, leaf).astype(leaf.dtype)

    opt_state = jax.tree_util.tree_map_with_path(reset, state.opt_state)
    return state._replace(
        params=new, opt_state=opt_state, tokens_since_fired=jnp.where(dead, 0, state.tokens_since_fired)
    )
