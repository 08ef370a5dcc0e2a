"""What can go wrong in a step, recorded on the device and named on the host.

Axes: `B` batch, `D` d_in.

Each step checks its batch and its result without leaving the device: a row with a NaN or an
infinity, a loss or gradient norm that is not finite although the batch was, or a reconstruction
error that has exploded (`DIVERGED` times the inputs' mean squared norm). The first such step is
written into `TrainState.fault` as (step, cause, row) and stays there; the loop reads it with the
metrics (every `output.log_every` steps) and before each checkpoint, so a checkpoint is never
written after a fault, and the error names the step, the cause and the last good checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NAN_INPUT, INF_INPUT, NONFINITE, DIVERGED_CAUSE, HUGE_INPUT = 1, 2, 3, 4, 5
DIVERGED = 1e6
"""A step whose mean squared reconstruction error exceeds this many times the batch's mean squared
input norm has diverged (a reconstruction 1000 times longer than its input)."""


def healthy() -> jax.Array:
    return jnp.array([-1, 0, 0], jnp.int32)


def update_fault(fault: jax.Array, step: jax.Array, x_bd: jax.Array, loss: jax.Array, grad_norm: jax.Array,
                 mse: jax.Array, norm_scale: jax.Array | float = 1.0, target_sq: jax.Array | None = None
                 ) -> jax.Array:
    """`fault` with this step's problem recorded, unless an earlier one already is. `target_sq`: the
    mean squared norm of the normalised targets, when they are not `x_bd` times `norm_scale`."""
    # a finite row whose squared norm overflows float32 is as unusable as an infinite one
    row_sq = jnp.sum(jnp.square(x_bd.astype(jnp.float32)), axis=-1)
    finite_rows = jnp.isfinite(row_sq)
    row = jnp.argmin(finite_rows).astype(jnp.int32)
    # per-row flags first, then one entry of each: indexing x_bd[row] would gather the whole
    # (data-sharded) batch onto every device at every step
    nan_rows = jnp.any(jnp.isnan(x_bd), axis=-1)
    inf_rows = jnp.any(jnp.isinf(x_bd), axis=-1)
    input_cause = jnp.where(nan_rows[row], NAN_INPUT, jnp.where(inf_rows[row], INF_INPUT, HUGE_INPUT))
    blew_up = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    # mse is in normalised units: compare it with the inputs' mean squared norm in the same units
    x_sq = jnp.mean(jnp.where(finite_rows, row_sq, 0.0)) * jnp.square(norm_scale) if target_sq is None else target_sq
    diverged = mse > DIVERGED * jnp.maximum(x_sq, 1e-30)
    cause = jnp.where(~finite_rows[row], input_cause,
                      jnp.where(blew_up, NONFINITE, jnp.where(diverged, DIVERGED_CAUSE, 0)))
    row = jnp.where(cause == input_cause, row, 0)
    now = jnp.stack([step.astype(jnp.int32), cause.astype(jnp.int32), row])
    return jnp.where((fault[0] < 0) & (cause > 0), now, fault)


class Fault(NamedTuple):
    """The first step that went wrong."""

    step: int
    cause: int
    row: int


def read_fault(fault) -> Fault | None:
    """The recorded fault (host values), or None."""
    step, cause, row = (int(v) for v in np.asarray(jax.device_get(fault)))
    return None if step < 0 else Fault(step, cause, row)


def fault_message(f: Fault, *, where: Callable[[int], str], lr: float, grad_clip: float, metrics: dict,
                  checkpoint: str) -> str:
    """One line: what went wrong at which step, whether the data or the optimisation is to blame,
    what to change, and the last good checkpoint. `where(row)` names the source row of a bad input."""
    at = f"step {f.step + 1}"
    if f.cause in (NAN_INPUT, INF_INPUT, HUGE_INPUT):
        value = {NAN_INPUT: "NaN", INF_INPUT: "an infinity",
                 HUGE_INPUT: "values too large for float32 (its squared norm overflows)"}[f.cause]
        return (f"bad data, not the optimisation: {where(f.row)} holds {value} (training batch of {at}); "
                f"remove or repair that row and train again (last good checkpoint: {checkpoint})")
    clip = "set train.grad_clip (e.g. 1.0)" if grad_clip == 0 else f"lower train.grad_clip (now {grad_clip:g})"
    if f.cause == NONFINITE:
        what = f"the loss or gradient became non-finite at {at} (loss {metrics.get('loss', float('nan')):.4g}, " \
               f"grad_norm {metrics.get('grad_norm', float('nan')):.4g})"
    else:
        what = f"training diverged at {at}: the reconstruction error grew to over {DIVERGED:.0e} times the inputs' " \
               f"squared norm"
    return (f"{what} while every input was finite, so the optimisation failed, not the data: lower train.lr "
            f"(now {lr:.3g}) or {clip} (last good checkpoint: {checkpoint})")
