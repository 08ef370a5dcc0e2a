"""Top-k encode and decode with sparse backward passes, in plain JAX.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_in / d_out.

  topk_decode(vals, idx, W_dec)      == einsum("bk,bkd->bd", vals, W_dec[idx])
  topk_encode(x_c, W_enc, b_enc, k)  == (relu(v), i) where v, i = top_k(x_c @ W_enc + b_enc, k)

Neither forms a dense [B, F] matrix in its backward, nor XLA's one-shot [B, K, D] gather (on CPU
the intermediate dominates; K gathers of [B, D] rows accumulated in a loop run ~10x faster). The
gradients are

  decode:  d_vals[b, k] = <g[b], W_dec[idx[b, k]]>,   d_W_dec[idx[b, k]] += vals[b, k] * g[b]
  encode:  with h = d_vals * (vals > 0):
           d_W_enc[:, idx[b, k]] += h[b, k] * x_c[b],  d_b_enc[idx[b, k]] += h[b, k],
           d_x_c[b] = sum_k h[b, k] * W_enc[:, idx[b, k]]

so a TopK train step costs one dense matmul (the encoder's forward) plus O(B K D) work. The Pallas
kernels replace these loops on accelerators.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxinterp.dictionaries import ops


def _column(a_bk: jax.Array, j: jax.Array) -> jax.Array:
    return lax.dynamic_index_in_dim(a_bk, j, axis=1, keepdims=False)


def gather_accumulate(vals_bk: jax.Array, idx_bk: jax.Array, table_fd: jax.Array) -> jax.Array:
    """out[b] = sum_k vals[b, k] * table[idx[b, k]]  -> [B, D]."""
    dtype = jnp.promote_types(vals_bk.dtype, table_fd.dtype)

    def body(j, acc_bd):
        rows_bd = table_fd.at[_column(idx_bk, j)].get(mode="promise_in_bounds")
        return acc_bd + _column(vals_bk, j)[:, None].astype(dtype) * rows_bd.astype(dtype)

    return lax.fori_loop(0, vals_bk.shape[1], body, jnp.zeros((vals_bk.shape[0], table_fd.shape[1]), dtype))


def scatter_accumulate(vals_bk: jax.Array, idx_bk: jax.Array, rows_bd: jax.Array, n_rows: int) -> jax.Array:
    """out[idx[b, k]] += vals[b, k] * rows[b]  -> [F, D]."""

    def body(j, acc_fd):
        upd_bd = _column(vals_bk, j)[:, None].astype(acc_fd.dtype) * rows_bd.astype(acc_fd.dtype)
        return acc_fd.at[_column(idx_bk, j)].add(upd_bd, mode="promise_in_bounds")

    return lax.fori_loop(0, vals_bk.shape[1], body, jnp.zeros((n_rows, rows_bd.shape[1]), jnp.float32))


def gather_dot(rows_bd: jax.Array, idx_bk: jax.Array, table_fd: jax.Array) -> jax.Array:
    """out[b, k] = <rows[b], table[idx[b, k]]>  -> [B, K]."""

    def body(j, acc_bk):
        t_bd = table_fd.at[_column(idx_bk, j)].get(mode="promise_in_bounds")
        col = jnp.sum(t_bd.astype(jnp.float32) * rows_bd.astype(jnp.float32), axis=-1)
        return lax.dynamic_update_index_in_dim(acc_bk, col, j, axis=1)

    return lax.fori_loop(0, idx_bk.shape[1], body, jnp.zeros(idx_bk.shape, jnp.float32))


# ---------------------------------------------------------------------------------------------


@jax.custom_vjp
def topk_decode(vals_bk: jax.Array, idx_bk: jax.Array, w_dec_fd: jax.Array) -> jax.Array:
    """`x_hat[b] = sum_k vals[b, k] * W_dec[idx[b, k]]` (no bias), with a sparse backward."""
    return gather_accumulate(vals_bk, idx_bk, w_dec_fd)


def _topk_decode_fwd(vals_bk, idx_bk, w_dec_fd):
    return gather_accumulate(vals_bk, idx_bk, w_dec_fd), (vals_bk, idx_bk, w_dec_fd)


def _topk_decode_bwd(res, g_bd):
    vals_bk, idx_bk, w_dec_fd = res
    d_vals = gather_dot(g_bd, idx_bk, w_dec_fd).astype(vals_bk.dtype)
    d_w = scatter_accumulate(vals_bk, idx_bk, g_bd, w_dec_fd.shape[0]).astype(w_dec_fd.dtype)
    return d_vals, None, d_w


topk_decode.defvjp(_topk_decode_fwd, _topk_decode_bwd)


def _encode_fwd_impl(xc_bd, w_enc_df, b_enc_f, k, compute_dtype):
    dt = jnp.dtype(compute_dtype)
    pre = jnp.matmul(xc_bd.astype(dt), w_enc_df.astype(dt), preferred_element_type=jnp.float32) + b_enc_f
    vals, idx = ops.topk(pre, k)
    return jax.nn.relu(vals), idx


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def topk_encode(xc_bd: jax.Array, w_enc_df: jax.Array, b_enc_f: jax.Array, k: int, compute_dtype: str = "float32"):
    """(relu(values) [B, K], indices [B, K]) of the top k of `x_c @ W_enc + b_enc`; sparse backward."""
    return _encode_fwd_impl(xc_bd, w_enc_df, b_enc_f, k, compute_dtype)


def _topk_encode_fwd(xc_bd, w_enc_df, b_enc_f, k, compute_dtype):
    vals, idx = _encode_fwd_impl(xc_bd, w_enc_df, b_enc_f, k, compute_dtype)
    return (vals, idx), (xc_bd, w_enc_df, vals, idx)


def _topk_encode_bwd(k, compute_dtype, res, cotangents):
    xc_bd, w_enc_df, vals, idx = res
    g_vals, _ = cotangents
    h_bk = jnp.where(vals > 0, g_vals, 0.0).astype(jnp.float32)
    n_f = w_enc_df.shape[1]
    d_b = jnp.zeros((n_f,), jnp.float32).at[idx.reshape(-1)].add(h_bk.reshape(-1), mode="promise_in_bounds")
    d_w_fd = scatter_accumulate(h_bk, idx, xc_bd, n_f)
    d_xc = gather_accumulate(h_bk, idx, w_enc_df.T)
    return d_xc.astype(xc_bd.dtype), d_w_fd.T.astype(w_enc_df.dtype), d_b


topk_encode.defvjp(_topk_encode_fwd, _topk_encode_bwd)


# ---------------------------------------------------------------------------------------------
# dense references


def topk_decode_reference(vals_bk: jax.Array, idx_bk: jax.Array, w_dec_fd: jax.Array) -> jax.Array:
    """The dense formula `topk_decode` equals: scatter into [B, F], then matmul."""
    return scatter_dense(vals_bk, idx_bk, w_dec_fd.shape[0]) @ w_dec_fd


def topk_encode_reference(xc_bd: jax.Array, w_enc_df: jax.Array, b_enc_f: jax.Array, k: int):
    """The dense formula `topk_encode` equals (XLA differentiates the top-k densely)."""
    vals, idx = lax.top_k(xc_bd @ w_enc_df + b_enc_f, k)
    return jax.nn.relu(vals), idx


def scatter_dense(vals_bk: jax.Array, idx_bk: jax.Array, d_sae: int) -> jax.Array:
    """[B, K] values at [B, K] indices -> dense [B, F]."""
    dense_bf = jnp.zeros((vals_bk.shape[0], d_sae), vals_bk.dtype)
    return dense_bf.at[jnp.arange(vals_bk.shape[0])[:, None], idx_bk].add(vals_bk)
