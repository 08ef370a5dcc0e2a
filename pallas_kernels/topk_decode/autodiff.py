"""`topk_decode`: the kernels' forward with a sparse backward in plain JAX.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_model.

    x_hat[b]      = sum_j vals[b, j] * W_dec[idx[b, j]] + b_dec
    d_vals[b, j]  = <W_dec[idx[b, j]], g[b]>
    d_W_dec[f]    = sum over (b, j) with idx[b, j] == f of vals[b, j] * g[b]
    d_b_dec       = sum_b g[b]                                   (no gradient for idx)

The backward loops over the K columns: K gathers of [B, D] rows for d_vals and K scatter-adds of
[B, D] rows into a float32 [F, D] accumulator for d_W_dec, so neither a dense [B, F] matrix nor a
[B, K, D] intermediate is formed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.topk_decode import dispatch
from pallas_kernels.topk_decode.dispatch import column, gather_accumulate  # noqa: F401  (the forward loop)


def gather_dot(g_bd: jax.Array, idx_bk: jax.Array, table_fd: jax.Array, counts_b=None) -> jax.Array:
    """out[b, j] = <g[b], table[idx[b, j]]>  -> [B, K] float32; with `counts_b`, only the first
    counts[b] entries of row b (the rest are zero)."""
    if counts_b is not None:
        lead = jnp.arange(idx_bk.shape[1])

        def block(g, i, c, trips):
            return _gather_dot_n(g, i, table_fd, trips) * (lead < c[:, None])

        perm, outs = dispatch.by_blocks(counts_b, block, g_bd, idx_bk, counts_b)
        return dispatch.unsort_rows(jnp.concatenate(outs), perm)
    return _gather_dot_n(g_bd, idx_bk, table_fd, idx_bk.shape[1])


def _gather_dot_n(g_bd, idx_bk, table_fd, n_cols):
    g32 = g_bd.astype(jnp.float32)

    def body(j, acc_bk):
        rows_bd = table_fd.at[column(idx_bk, j)].get(mode="promise_in_bounds").astype(jnp.float32)
        return lax.dynamic_update_index_in_dim(acc_bk, jnp.sum(rows_bd * g32, axis=-1), j, axis=1)

    return lax.fori_loop(0, n_cols, body, jnp.zeros(idx_bk.shape, jnp.float32))


def scatter_rows(vals_bk: jax.Array, idx_bk: jax.Array, g_bd: jax.Array, n_rows: int, counts_b=None) -> jax.Array:
    """out[idx[b, j]] += vals[b, j] * g[b]  -> [F, D] float32 (repeated indices add up); with
    `counts_b`, only the first counts[b] entries of row b (the rest are zero)."""
    acc_fd = jnp.zeros((n_rows, g_bd.shape[1]), jnp.float32)
    if counts_b is None:
        return _scatter_rows_n(vals_bk, idx_bk, g_bd, acc_fd, vals_bk.shape[1])
    # one accumulator carried through the blocks (sorting rows does not change the sum)
    perm, blocks = dispatch.ragged_blocks(counts_b)
    v, i, g = vals_bk[perm], idx_bk[perm], g_bd[perm]
    for lo, hi, trips in blocks:
        acc_fd = _scatter_rows_n(v[lo:hi], i[lo:hi], g[lo:hi], acc_fd, trips)
    return acc_fd


def _scatter_rows_n(vals_bk, idx_bk, g_bd, acc_fd, n_cols):
    g32 = g_bd.astype(jnp.float32)

    def body(j, acc):
        upd_bd = column(vals_bk, j).astype(jnp.float32)[:, None] * g32
        return acc.at[column(idx_bk, j)].add(upd_bd, mode="promise_in_bounds")

    return lax.fori_loop(0, n_cols, body, acc_fd)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _decode(vals_bk, idx_bk, w_dec_fd, b_dec_d, counts_b, impl, interpret):
    return dispatch.decode_forward(vals_bk, idx_bk, w_dec_fd, b_dec_d, impl, interpret, counts_b)


def _decode_fwd(vals_bk, idx_bk, w_dec_fd, b_dec_d, counts_b, impl, interpret):
    out = dispatch.decode_forward(vals_bk, idx_bk, w_dec_fd, b_dec_d, impl, interpret, counts_b)
    return out, (vals_bk, idx_bk, w_dec_fd, b_dec_d, counts_b)


def decode_backward(vals_bk, idx_bk, w_dec_fd, g_bd, counts_b=None, *, dot=gather_dot, scatter=scatter_rows):
    """(d_vals [B, K], d_W_dec [F, D]) of the decode for the cotangent `g_bd`: the one backward of
    every forward here. `dot` / `scatter` default to the loops above; `jaxinterp` passes the same
    loops wrapped for a device mesh (each device's block, summed over the others). With `counts_b`
    the entries past a row's count are absent: no work, and a zero gradient."""
    d_vals = dot(g_bd, idx_bk, w_dec_fd, counts_b).astype(vals_bk.dtype)
    d_w = scatter(vals_bk, idx_bk, g_bd, w_dec_fd.shape[0], counts_b).astype(w_dec_fd.dtype)
    return d_vals, d_w


def _decode_bwd(impl, interpret, res, g_bd):
    vals_bk, idx_bk, w_dec_fd, b_dec_d, counts_b = res
    d_vals, d_w = decode_backward(vals_bk, idx_bk, w_dec_fd, g_bd, counts_b)
    d_b = jnp.sum(g_bd.astype(jnp.float32), axis=0).astype(b_dec_d.dtype)
    return d_vals, None, d_w, d_b, None


_decode.defvjp(_decode_fwd, _decode_bwd)


def topk_decode(vals: jax.Array, idx: jax.Array, w_dec: jax.Array, b_dec: jax.Array, *,
                impl: dispatch.Impl = "auto", interpret=None, counts: jax.Array | None = None) -> jax.Array:
    """`x_hat[..., :] = sum_j vals[..., j] * W_dec[idx[..., j]] + b_dec`, with a sparse backward.

    vals [..., K] float, idx [..., K] int in [0, F), W_dec [F, D], b_dec [D] -> [..., D] in W_dec's
    dtype, accumulated in float32. Equal to

        (jnp.einsum("...k,...kd->...d", vals.astype(f32), W_dec[idx].astype(f32))
         + b_dec.astype(f32)).astype(W_dec.dtype)

    `impl` picks the forward (see `pallas_kernels.topk_decode.dispatch`); `interpret=None` interprets
    a kernel exactly when the default backend is not its hardware -- so to export for another
    platform, name the kernel and pass `interpret=False`. Differentiable in vals, W_dec and b_dec.

    `counts` [...] (optional, int): each row holds only its first `counts` entries, the rest being
    zero (BatchTopK's row candidates after the batch threshold). The sparse forward and the backward
    then visit those only, and the entries past a row's count get no gradient.
    """
    if vals.shape != idx.shape or vals.ndim < 1:
        raise ValueError(f"vals {vals.shape} and idx {idx.shape} must have one shape [..., K]")
    if w_dec.ndim != 2 or b_dec.shape != (w_dec.shape[1],):
        raise ValueError(f"W_dec {w_dec.shape} and b_dec {b_dec.shape} must be [F, D] and [D]")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx has dtype {idx.dtype}; indices must be integers")
    shapes = dispatch.problem_shapes(vals, w_dec)
    resolved = dispatch.resolve_impl(impl, shapes, w_dec.dtype)
    lead = vals.shape[:-1]
    if counts is not None:
        if counts.shape != lead:
            raise ValueError(f"counts {counts.shape} must have vals' leading shape {lead}")
        counts = counts.reshape(-1).astype(jnp.int32)
    out = _decode(vals.reshape(shapes[:2]), idx.reshape(shapes[:2]).astype(jnp.int32), w_dec, b_dec, counts,
                  resolved, interpret)
    return out.reshape(*lead, w_dec.shape[1])
