"""The train state: a pytree of arrays, checkpointed whole."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from jaxinterp.dictionaries import Params


class TrainState(NamedTuple):
    step: jax.Array
    """Optimizer steps taken (int32 scalar)."""
    params: Params
    """Trainable dictionary parameters."""
    buffers: Params
    """Non-trainable dictionary arrays: norm_scale, the batchtopk threshold EMA."""
    opt_state: optax.OptState
    """Adam moments and schedule counters."""
    tokens_since_fired: jax.Array
    """[F] int32: tokens since each feature last fired (saturates at 2^31 - 1)."""

    @property
    def dictionary(self) -> Params:
        """Trainable and buffer arrays together: what `encode`/`decode` take."""
        return self.params | self.buffers
