"""JumpReLU and its Heaviside step with straight-through pseudo-derivatives.

Rajamanoharan et al. 2024 ("Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders"). With the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth eps:

  jumprelu(z, t)  = z * H(z - t)      d/dz = H(z - t)    d/dt = -(t / eps) K((z - t) / eps)
  heaviside(z, t) = H(z - t)          d/dz = 0           d/dt = -(1 / eps) K((z - t) / eps)

The threshold `t` [F] is a parameter in its own right (not exp of a log-threshold: with Adam the log
form barely moves thresholds, since its gradient is scaled by t itself). Gradients for `t` are summed
over every leading axis of `z`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _rect(u: jax.Array) -> jax.Array:
    return (jnp.abs(u) < 0.5).astype(u.dtype)


def _sum_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return g.reshape(-1, *shape).sum(0) if g.shape != shape else g


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu_ste(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """z * H(z - threshold), with the pseudo-derivative above for the threshold."""
    return jnp.where(z > threshold, z, jnp.zeros_like(z))


def _jumprelu_fwd(z, threshold, bandwidth):
    return jnp.where(z > threshold, z, jnp.zeros_like(z)), (z, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    z, threshold = res
    dz = jnp.where(z > threshold, g, jnp.zeros_like(g))
    dt = -(threshold / bandwidth) * _rect((z - threshold) / bandwidth) * g
    return dz, _sum_to(dt, threshold.shape)


jumprelu_ste.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside_ste(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """H(z - threshold) as floats, with the pseudo-derivative above for the threshold."""
    return (z > threshold).astype(z.dtype)


def _heaviside_fwd(z, threshold, bandwidth):
    return (z > threshold).astype(z.dtype), (z, threshold)


def _heaviside_bwd(bandwidth, res, g):
    z, threshold = res
    dt = -(1.0 / bandwidth) * _rect((z - threshold) / bandwidth) * g
    return jnp.zeros_like(z), _sum_to(dt, threshold.shape)


heaviside_ste.defvjp(_heaviside_fwd, _heaviside_bwd)
