"""Top-k encode and decode with sparse backward passes, in plain JAX.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_in / d_out.

  topk_decode(vals, idx, W_dec)      == einsum("bk,bkd->bd", vals, W_dec[idx])
  topk_encode(x, b_dec, W_enc, b_enc, k)
                                     == (relu(v), i) where v, i = top_k((x - b_dec) @ W_enc + b_enc, k)

Neither forms a dense [B, F] matrix in its backward, nor XLA's one-shot [B, K, D] gather (on CPU
the intermediate dominates; K gathers of [B, D] rows accumulated in a loop run ~10x faster). The
gradients are

  decode:  d_vals[b, k] = <g[b], W_dec[idx[b, k]]>,   d_W_dec[idx[b, k]] += vals[b, k] * g[b]
  encode:  with h = d_vals * (vals > 0):
           d_W_enc[:, idx[b, k]] += h[b, k] * x_c[b],  d_b_enc[idx[b, k]] += h[b, k],
           d_b_dec = -W_enc @ d_b_enc,  d_x[b] = sum_k h[b, k] * W_enc[:, idx[b, k]]

so a TopK train step costs one dense matmul (the encoder's forward) plus O(B K D) work. The Pallas
kernels replace these loops on accelerators.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jax.sharding import PartitionSpec as P

from jaxinterp.dictionaries import ops


def _column(a_bk: jax.Array, j: jax.Array) -> jax.Array:
    return lax.dynamic_index_in_dim(a_bk, j, axis=1, keepdims=False)


def _gather_accumulate_local(vals_bk, idx_bk, table_fd):
    dtype = jnp.promote_types(vals_bk.dtype, table_fd.dtype)

    def body(j, acc_bd):
        rows_bd = table_fd.at[_column(idx_bk, j)].get(mode="promise_in_bounds")
        return acc_bd + _column(vals_bk, j)[:, None].astype(dtype) * rows_bd.astype(dtype)

    return lax.fori_loop(0, vals_bk.shape[1], body, jnp.zeros((vals_bk.shape[0], table_fd.shape[1]), dtype))


def _scatter_accumulate_local(vals_bk, idx_bk, rows_bd, n_rows):
    def body(j, acc_fd):
        upd_bd = _column(vals_bk, j)[:, None].astype(acc_fd.dtype) * rows_bd.astype(acc_fd.dtype)
        return acc_fd.at[_column(idx_bk, j)].add(upd_bd, mode="promise_in_bounds")

    return lax.fori_loop(0, vals_bk.shape[1], body, jnp.zeros((n_rows, rows_bd.shape[1]), jnp.float32))


def _gather_dot_local(rows_bd, idx_bk, table_fd):
    def body(j, acc_bk):
        t_bd = table_fd.at[_column(idx_bk, j)].get(mode="promise_in_bounds")
        col = jnp.sum(t_bd.astype(jnp.float32) * rows_bd.astype(jnp.float32), axis=-1)
        return lax.dynamic_update_index_in_dim(acc_bk, col, j, axis=1)

    return lax.fori_loop(0, idx_bk.shape[1], body, jnp.zeros(idx_bk.shape, jnp.float32))


# Under a mesh the loops run inside shard_map: rows split over `data`, the F axis of the table over
# `model`. Each device handles the indices that fall in its own F block (the rest masked to zero)
# and partial results are summed over the other axis. Left to XLA's partitioner, the scatters are
# replicated on every device instead.


def _mesh_split(n_rows: int, n_features: int) -> tuple[str | None, str | None]:
    n_data, n_model = ops.mesh_axis_size(ops.DATA), ops.mesh_axis_size(ops.MODEL)
    data = ops.DATA if n_data > 1 and n_rows % n_data == 0 else None
    model = ops.MODEL if n_model > 1 and n_features % n_model == 0 else None
    return data, model


def _local_ids(idx_bk, vals_bk, f_local, model):
    if model is None:
        return idx_bk, vals_bk
    local = idx_bk - lax.axis_index(model) * f_local
    inside = (local >= 0) & (local < f_local)
    return jnp.clip(local, 0, f_local - 1), jnp.where(inside, vals_bk, jnp.zeros_like(vals_bk))


def _kernel_accumulate_local(vals_bk, idx_bk, table_fd):
    from pallas_kernels.topk_decode import topk_decode as kernel

    bias = jnp.zeros((table_fd.shape[1],), table_fd.dtype)
    return kernel(vals_bk, idx_bk, table_fd, bias, impl="pallas").astype(jnp.float32)


def gather_accumulate(vals_bk: jax.Array, idx_bk: jax.Array, table_fd: jax.Array, *, kernel: bool = False) -> jax.Array:
    """out[b] = sum_k vals[b, k] * table[idx[b, k]]  -> [B, D]; through the Pallas kernel with
    `kernel=True`."""
    accumulate = _kernel_accumulate_local if kernel else _gather_accumulate_local
    data, model = _mesh_split(vals_bk.shape[0], table_fd.shape[0])
    if data is None and model is None:
        return accumulate(vals_bk, idx_bk, table_fd)

    def local(v, i, t):
        i, v = _local_ids(i, v, t.shape[0], model)
        out = accumulate(v, i, t)
        return lax.psum(out, model) if model else out

    return jax.shard_map(local, in_specs=(P(data, None), P(data, None), P(model, None)), out_specs=P(data, None),
                         check_vma=False)(vals_bk, idx_bk, table_fd)


def scatter_accumulate(vals_bk: jax.Array, idx_bk: jax.Array, rows_bd: jax.Array, n_rows: int) -> jax.Array:
    """out[idx[b, k]] += vals[b, k] * rows[b]  -> [F, D] (float32)."""
    data, model = _mesh_split(vals_bk.shape[0], n_rows)
    if data is None and model is None:
        return _scatter_accumulate_local(vals_bk, idx_bk, rows_bd, n_rows)
    f_local = n_rows // ops.mesh_axis_size(ops.MODEL) if model else n_rows

    def local(v, i, r):
        i, v = _local_ids(i, v, f_local, model)
        out = _scatter_accumulate_local(v, i, r, f_local)
        return lax.psum(out, data) if data else out

    return jax.shard_map(local, in_specs=(P(data, None), P(data, None), P(data, None)), out_specs=P(model, None),
                         check_vma=False)(vals_bk, idx_bk, rows_bd)


def gather_dot(rows_bd: jax.Array, idx_bk: jax.Array, table_fd: jax.Array) -> jax.Array:
    """out[b, k] = <rows[b], table[idx[b, k]]>  -> [B, K] (float32)."""
    data, model = _mesh_split(rows_bd.shape[0], table_fd.shape[0])
    if data is None and model is None:
        return _gather_dot_local(rows_bd, idx_bk, table_fd)

    def local(r, i, t):
        if model is None:
            return _gather_dot_local(r, i, t)
        li, ones = _local_ids(i, jnp.ones(i.shape, jnp.float32), t.shape[0], model)
        return lax.psum(_gather_dot_local(r, li, t) * ones, model)

    return jax.shard_map(local, in_specs=(P(data, None), P(data, None), P(model, None)), out_specs=P(data, None),
                         check_vma=False)(rows_bd, idx_bk, table_fd)


# ---------------------------------------------------------------------------------------------


def topk_decode(vals_bk: jax.Array, idx_bk: jax.Array, w_dec_fd: jax.Array, *, path: str = "sparse") -> jax.Array:
    """`x_hat[b] = sum_k vals[b, k] * W_dec[idx[b, k]]` (no bias), with a sparse backward.

    `path`: `sparse` (plain-JAX gather loops), `pallas` (the Pallas kernel forward; interpret mode
    on CPU), `auto` (the kernel where the backend and sizes allow it). The backward is the same
    sparse one for every path."""
    if resolve_topk_path(path, vals_bk, w_dec_fd) == "pallas":
        return _topk_decode_kernel(vals_bk, idx_bk, w_dec_fd)
    return _topk_decode_sparse(vals_bk, idx_bk, w_dec_fd)


def resolve_topk_path(path: str, vals_bk: jax.Array, w_dec_fd: jax.Array) -> str:
    """`pallas` or `sparse` for a requested path (`dense` is handled by the caller)."""
    if path in ("sparse", "dense"):
        return "sparse"
    if path == "pallas":
        return "pallas"
    backend = jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm", "tpu"):  # on CPU the plain-JAX loops are the fast path
        return "sparse"
    return "pallas" if kernel_fits(backend, vals_bk.shape, w_dec_fd.shape, w_dec_fd.dtype) else "sparse"


def kernel_fits(backend: str, vals_shape, table_shape, dtype) -> bool:
    """Whether the Pallas decode kernel of `backend` takes vals [B, K] against a table [F, D]."""
    from pallas_kernels.topk_decode import can_use_pallas

    (b, k), (f, d) = vals_shape, table_shape
    return can_use_pallas(backend, (b, k, f, d), dtype)


def _topk_decode_bwd(res, g_bd):
    vals_bk, idx_bk, w_dec_fd = res
    d_vals = gather_dot(g_bd, idx_bk, w_dec_fd).astype(vals_bk.dtype)
    d_w = scatter_accumulate(vals_bk, idx_bk, g_bd, w_dec_fd.shape[0]).astype(w_dec_fd.dtype)
    return d_vals, None, d_w


@jax.custom_vjp
def _topk_decode_sparse(vals_bk, idx_bk, w_dec_fd):
    return gather_accumulate(vals_bk, idx_bk, w_dec_fd)


_topk_decode_sparse.defvjp(lambda v, i, w: (gather_accumulate(v, i, w), (v, i, w)), _topk_decode_bwd)


def _kernel_accumulate(v, i, w):
    return gather_accumulate(v, i, w, kernel=True)


@jax.custom_vjp
def _topk_decode_kernel(vals_bk, idx_bk, w_dec_fd):
    return _kernel_accumulate(vals_bk, idx_bk, w_dec_fd)


_topk_decode_kernel.defvjp(lambda v, i, w: (_kernel_accumulate(v, i, w), (v, i, w)), _topk_decode_bwd)


def _encode_fwd_impl(x_bd, b_dec_d, w_enc_df, b_enc_f, k, compute_dtype):
    dt = jnp.dtype(compute_dtype)
    xc = (x_bd - b_dec_d).astype(dt)
    pre = jnp.matmul(xc, w_enc_df.astype(dt), preferred_element_type=jnp.float32) + b_enc_f
    vals, idx = ops.topk(pre, k)
    return jax.nn.relu(vals), idx


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def topk_encode(x_bd: jax.Array, b_dec_d: jax.Array, w_enc_df: jax.Array, b_enc_f: jax.Array, k: int,
                compute_dtype: str = "float32"):
    """(relu(values) [B, K], indices [B, K]) of the top k of `(x - b_dec) @ W_enc + b_enc`; sparse backward.

    `b_dec` is its own argument so that its gradient, `-W_enc @ d_b_enc`, costs a matrix-vector
    product; the per-row input gradient is only computed when something asks for it.
    """
    return _encode_fwd_impl(x_bd, b_dec_d, w_enc_df, b_enc_f, k, compute_dtype)


def _topk_encode_fwd(x_bd, b_dec_d, w_enc_df, b_enc_f, k, compute_dtype):
    vals, idx = _encode_fwd_impl(x_bd, b_dec_d, w_enc_df, b_enc_f, k, compute_dtype)
    return (vals, idx), (x_bd, b_dec_d, w_enc_df, vals, idx)


def _topk_encode_bwd(k, compute_dtype, res, cotangents):
    x_bd, b_dec_d, w_enc_df, vals, idx = res
    g_vals, _ = cotangents
    h_bk = jnp.where(vals > 0, g_vals, 0.0).astype(jnp.float32)
    n_f = w_enc_df.shape[1]
    d_b = jnp.zeros((n_f,), jnp.float32).at[idx.reshape(-1)].add(h_bk.reshape(-1), mode="promise_in_bounds")
    d_w_fd = scatter_accumulate(h_bk, idx, x_bd - b_dec_d, n_f)
    d_x = gather_accumulate(h_bk, idx, w_enc_df.T)  # dead code under jit unless x is differentiated
    d_b_dec = -(w_enc_df.astype(jnp.float32) @ d_b)
    return d_x.astype(x_bd.dtype), d_b_dec.astype(b_dec_d.dtype), d_w_fd.T.astype(w_enc_df.dtype), d_b


topk_encode.defvjp(_topk_encode_fwd, _topk_encode_bwd)


# ---------------------------------------------------------------------------------------------
# dense references


def topk_decode_reference(vals_bk: jax.Array, idx_bk: jax.Array, w_dec_fd: jax.Array) -> jax.Array:
    """The dense formula `topk_decode` equals: scatter into [B, F], then matmul."""
    return scatter_dense(vals_bk, idx_bk, w_dec_fd.shape[0]) @ w_dec_fd


def topk_encode_reference(x_bd: jax.Array, b_dec_d: jax.Array, w_enc_df: jax.Array, b_enc_f: jax.Array, k: int):
    """The dense formula `topk_encode` equals (XLA differentiates the top-k densely)."""
    vals, idx = lax.top_k((x_bd - b_dec_d) @ w_enc_df + b_enc_f, k)
    return jax.nn.relu(vals), idx


def scatter_dense(vals_bk: jax.Array, idx_bk: jax.Array, d_sae: int) -> jax.Array:
    """[B, K] values at [B, K] indices -> dense [B, F]."""
    dense_bf = jnp.zeros((vals_bk.shape[0], d_sae), vals_bk.dtype)
    return dense_bf.at[jnp.arange(vals_bk.shape[0])[:, None], idx_bk].add(vals_bk)
