"""Learning-rate and sparsity-coefficient schedules (pure functions of the step)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxinterp.config import TrainConfig


def lr_schedule(cfg: TrainConfig, lr: float) -> optax.Schedule:
    """Linear warm-up to `lr`, then constant (`constant`, `schedule_free`: its averaging does the
    annealing), cosine to 0, or constant with a linear decay to 0 over the last `lr_decay_fraction`
    of the steps (`linear`)."""
    steps, warm = cfg.steps, min(cfg.lr_warmup_steps, max(cfg.steps - 1, 0))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(1.0, (step + 1) / max(warm, 1)) if warm else 1.0
        if cfg.lr_schedule in ("constant", "schedule_free"):
            decay = 1.0
        elif cfg.lr_schedule == "cosine":
            t = jnp.clip((step - warm) / max(steps - warm, 1), 0.0, 1.0)
            decay = 0.5 * (1 + jnp.cos(jnp.pi * t))
        else:
            start = steps * (1 - cfg.lr_decay_fraction)
            decay = jnp.clip((steps - step) / max(steps - start, 1), 0.0, 1.0)
        return lr * warmup * decay

    return schedule


def sparsity_warmup(cfg: TrainConfig, step) -> jnp.ndarray:
    """Multiplier of the sparsity coefficient: linear from 0 to 1 over `sparsity_warmup_steps`."""
    if cfg.sparsity_warmup_steps == 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1) / cfg.sparsity_warmup_steps)
