"""Plain-JAX references for the top-k decode kernels.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_model.

Every kernel in this package computes, with float32 accumulation and the result in `W_dec`'s dtype,

    x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] + b_dec

which is `topk_decode_reference` below. Repeated indices within a row simply add up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def topk_decode_reference(vals_bk: jax.Array, idx_bk: jax.Array, w_dec_fd: jax.Array,
                          b_dec_d: jax.Array) -> jax.Array:
    """`x_hat [B, D] = einsum("bk,bkd->bd", vals, W_dec[idx]) + b_dec`, float32 accumulation, W_dec's dtype.

    Forms the [B, K, D] gather: fine as a reference, not what the kernels do.
    """
    rows_bkd = jnp.take(w_dec_fd, idx_bk, axis=0).astype(jnp.float32)
    acc_bd = jnp.einsum("bk,bkd->bd", vals_bk.astype(jnp.float32), rows_bkd, precision=lax.Precision.HIGHEST)
    return (acc_bd + b_dec_d.astype(jnp.float32)).astype(w_dec_fd.dtype)


def select_topk(pre_acts_bf: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(vals [B, K], idx [B, K] int32): the top k of `relu(pre_acts)` per row, largest first."""
    vals_bk, idx_bk = lax.top_k(jax.nn.relu(pre_acts_bf), k)
    return vals_bk, idx_bk.astype(jnp.int32)


def fused_reference(pre_acts_bf: jax.Array, k: int, w_dec_fd: jax.Array,
                    b_dec_d: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x_hat [B, D], idx [B, K], vals [B, K]): top-k of the relu'd pre-activations, then decode.

    Ties (including the zeros of a row with fewer than k positive entries) go to the lower index,
    as `lax.top_k` breaks them.
    """
    vals_bk, idx_bk = select_topk(pre_acts_bf, k)
    return topk_decode_reference(vals_bk, idx_bk, w_dec_fd, b_dec_d), idx_bk, vals_bk
