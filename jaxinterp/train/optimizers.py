"""Optimizers as values: the optax transformation a config names, its learning rate, and the
parameters to evaluate.

`train.optimizer` picks the update direction (`adam`, or `signum`: the sign of the gradient);
`train.lr_schedule` picks how the step size evolves (`schedule_free` wraps the update in
Defazio et al.'s schedule-free averaging, `optax.contrib.schedule_free`; the others multiply it by
a warm-up and decay). Under schedule-free training the step holds the interpolated point `y` where
gradients are taken, and the point to evaluate and export is the average `x`
(`schedule_free_eval_params`), which `eval_params` returns.

The learning rate, when `train.lr` is unset, scales as `base / sqrt(d_sae / 2^14)` (more features,
smaller steps, as in sparsify and dictionary_learning), with a base per optimizer chosen by the
measurements in docs/benchmarks.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import optax
from optax.contrib import ScheduleFreeState, schedule_free, schedule_free_eval_params

from jaxinterp.config import TrainConfig
from jaxinterp.train.schedules import lr_schedule

BASE_LR: dict[str, float] = {"adam": 2e-3, "signum": 5e-3}
"""Learning rate at d_sae = 2^14 when `train.lr` is unset."""


def resolved_lr(cfg: TrainConfig, d_sae: int) -> float:
    """`train.lr`, or the scaled default for the optimizer and the number of features."""
    if cfg.lr is not None:
        return cfg.lr
    return BASE_LR[cfg.optimizer] / math.sqrt(d_sae / 2**14)


def _adam(cfg: TrainConfig, lr: optax.Schedule, momentum: float) -> optax.GradientTransformation:
    return optax.adam(lr, b1=momentum, b2=cfg.adam_b2)


def _signum(cfg: TrainConfig, lr: optax.Schedule, momentum: float) -> optax.GradientTransformation:
    sign = optax.scale_by_sign()
    if momentum > 0:
        sign = optax.chain(optax.trace(decay=momentum), sign)
    return optax.chain(sign, optax.scale_by_learning_rate(lr))


UPDATES: dict[str, Callable[[TrainConfig, optax.Schedule, float], optax.GradientTransformation]] = {
    "adam": _adam,
    "signum": _signum,
}
"""Update rules by `train.optimizer`: (config, learning-rate schedule, momentum) -> transformation."""


def make_optimizer(cfg: TrainConfig, d_sae: int) -> optax.GradientTransformation:
    """The optax transformation of a run: clipping (if any), then the update, schedule-free or scheduled."""
    schedule = lr_schedule(cfg, resolved_lr(cfg, d_sae))
    if cfg.lr_schedule == "schedule_free":
        # The averaging takes the place of momentum: the inner update runs without it.
        tx = schedule_free(UPDATES[cfg.optimizer](cfg, schedule, 0.0), schedule, b1=cfg.momentum)
    else:
        tx = UPDATES[cfg.optimizer](cfg, schedule, cfg.momentum)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip > 0 else tx


def eval_params(opt_state: optax.OptState, params):
    """The parameters to evaluate and export: schedule-free's average `x`, else `params` itself."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, ScheduleFreeState))
             if isinstance(s, ScheduleFreeState)]
    return schedule_free_eval_params(found[0], params) if found else params
