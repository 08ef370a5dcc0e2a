"""The train state: a pytree of arrays, checkpointed whole."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from jaxinterp.dictionaries import Params
from jaxinterp.train.optimizers import eval_params

HEALTHY = -1
"""`TrainState.fault[0]` while no step has gone wrong."""


class TrainState(NamedTuple):
    step: jax.Array
    """Optimizer steps taken (int32 scalar)."""
    params: Params
    """Trainable dictionary parameters (under schedule-free training, the point gradients are taken at)."""
    buffers: Params
    """Non-trainable dictionary arrays: norm_scale, the batchtopk threshold EMA."""
    opt_state: optax.OptState
    """Optimizer moments, schedule counters, schedule-free iterates."""
    tokens_since_fired: jax.Array
    """[F] int32: tokens since each feature last fired (saturates at 2^31 - 1)."""
    fault: jax.Array
    """[3] int32: (step, cause, batch row) of the first step that went wrong, or (-1, 0, 0); the
    causes are in `train.health`. Set on the device, read whenever metrics are."""

    @property
    def dictionary(self) -> Params:
        """The dictionary to evaluate and export (trainable and buffer arrays together): what
        `encode`/`decode` take."""
        return eval_params(self.opt_state, self.params) | self.buffers
