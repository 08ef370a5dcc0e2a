"""Top-k selection of encoder pre-activations followed by the decode, in one call.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_model.

The selection is `lax.top_k` of the relu'd pre-activations (XLA's top-k is already a tuned
kernel on both TPU and GPU); the decode is the Pallas kernel of `topk_decode`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from pallas_kernels.topk_decode import dispatch
from pallas_kernels.topk_decode.autodiff import topk_decode
from pallas_kernels.topk_decode.reference import select_topk


class FusedDecode(NamedTuple):
    """What `fused_topk_decode` returns."""

    x_hat: jax.Array
    """[B, D] reconstruction in W_dec's dtype."""
    idx: jax.Array
    """[B, K] int32 indices of the selected features, largest activation first."""
    vals: jax.Array
    """[B, K] their relu'd activations, in pre_acts' dtype."""


def fused_topk_decode(pre_acts: jax.Array, k: int, w_dec: jax.Array, b_dec: jax.Array, *,
                      impl: dispatch.Impl = "auto", interpret=None) -> FusedDecode:
    """Select the top k of relu(pre_acts) [B, F] per row and decode them. Equal to

        vals, idx = lax.top_k(jax.nn.relu(pre_acts), k)
        x_hat = (jnp.einsum("bk,bkd->bd", vals.astype(f32), W_dec[idx].astype(f32))
                 + b_dec.astype(f32)).astype(W_dec.dtype)

    i.e. `fused_reference`. Differentiable: the gradient reaches pre_acts through the top-k values.
    """
    if pre_acts.shape[-1] != w_dec.shape[0]:
        raise ValueError(f"pre_acts {pre_acts.shape} must end in F={w_dec.shape[0]}, the rows of W_dec")
    if not 1 <= k <= w_dec.shape[0]:
        raise ValueError(f"k={k} must lie in [1, F={w_dec.shape[0]}]")
    vals, idx = select_topk(pre_acts, k)
    return FusedDecode(topk_decode(vals, idx, w_dec, b_dec, impl=impl, interpret=interpret), idx, vals)
