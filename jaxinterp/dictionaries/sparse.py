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

from jaxinterp.dictionaries import ops
from pallas_kernels.topk_decode import autodiff as kd
from pallas_kernels.topk_decode import dispatch


# The loops (K gathers or scatter-adds of [B, D] rows) and the decode's backward are defined once,
# in `pallas_kernels.topk_decode` (`dispatch.gather_accumulate`, `autodiff.gather_dot`,
# `autodiff.scatter_rows`, `autodiff.decode_backward`); this module runs them on a device mesh.


def _forward_local(impl: str):
    """The per-device decode [B, D] float32 (no bias) of a resolved implementation."""
    if impl == "sparse":
        return kd.gather_accumulate

    def forward(vals_bk, idx_bk, table_fd, counts_b=None):  # the kernels compute the zeros past counts
        bias = jnp.zeros((table_fd.shape[1],), table_fd.dtype)
        return dispatch.decode_forward(vals_bk, idx_bk, table_fd, bias, impl, None).astype(jnp.float32)

    return forward


# Under a mesh the loops run inside shard_map, each operand split as its logical axes say (rows
# `batch`, the table's rows `d_sae`; see `ops.local_spec`). Each device handles the indices that
# fall in its own F block (the rest masked to zero) and partial results are summed over the other
# axis. Left to XLA's partitioner, the scatters are replicated on every device instead. `counts_b`
# (rows' counts of leading nonzero entries, see `pallas_kernels.topk_decode.dispatch.ragged_blocks`)
# travels with the rows; each device sorts its own.

ROWS = ("batch", None)
"""[B, K] codes and [B, D] activations."""
TABLE = ("d_sae", None)
"""[F, D] decoder (and transposed encoder) rows, and the [F, D] gradients scattered into them."""


def _mesh_split(n_rows: int, n_features: int) -> tuple[str | None, str | None]:
    return ops.mesh_axis("batch", n_rows), ops.mesh_axis("d_sae", n_features)


def _local_ids(idx_bk, vals_bk, f_local, model):
    if model is None:
        return idx_bk, vals_bk
    local = idx_bk - lax.axis_index(model) * f_local
    inside = (local >= 0) & (local < f_local)
    return jnp.clip(local, 0, f_local - 1), jnp.where(inside, vals_bk, jnp.zeros_like(vals_bk))


def _on_mesh(local, operands, axes, out_axes, out_shape, counts_b):
    """shard_map `local(*operands, counts)`: specs from each operand's logical `axes`; the optional
    counts split over rows like the codes."""
    in_specs = tuple(ops.local_spec(a, x.shape) for a, x in zip(axes, operands, strict=True))
    out_spec = ops.local_spec(out_axes, out_shape)
    if counts_b is None:
        return jax.shard_map(lambda *a: local(*a, None), in_specs=in_specs, out_specs=out_spec,
                             check_vma=False)(*operands)
    return jax.shard_map(local, in_specs=(*in_specs, ops.local_spec(ROWS[:1], counts_b.shape)), out_specs=out_spec,
                         check_vma=False)(*operands, counts_b)


def gather_accumulate(vals_bk: jax.Array, idx_bk: jax.Array, table_fd: jax.Array, *, impl: str = "sparse",
                      counts_b: jax.Array | None = None) -> jax.Array:
    """out[b] = sum_k vals[b, k] * table[idx[b, k]]  -> [B, D] float32, by the resolved `impl`
    (`sparse` loops, a Pallas kernel, or the `dense` formula) on each device's block."""
    accumulate = _forward_local(impl)
    data, model = _mesh_split(vals_bk.shape[0], table_fd.shape[0])
    if data is None and model is None:
        return accumulate(vals_bk, idx_bk, table_fd, counts_b)

    def local(v, i, t, c):
        i, v = _local_ids(i, v, t.shape[0], model)
        out = accumulate(v, i, t, c)
        return lax.psum(out, model) if model else out

    return _on_mesh(local, (vals_bk, idx_bk, table_fd), (ROWS, ROWS, TABLE), ROWS,
                    (vals_bk.shape[0], table_fd.shape[1]), counts_b)


def scatter_accumulate(vals_bk: jax.Array, idx_bk: jax.Array, rows_bd: jax.Array, n_rows: int,
                       counts_b: jax.Array | None = None) -> jax.Array:
    """out[idx[b, k]] += vals[b, k] * rows[b]  -> [F, D] (float32)."""
    data, model = _mesh_split(vals_bk.shape[0], n_rows)
    if data is None and model is None:
        return kd.scatter_rows(vals_bk, idx_bk, rows_bd, n_rows, counts_b)
    f_local = n_rows // ops.mesh_axis_size(model)

    def local(v, i, r, c):
        i, v = _local_ids(i, v, f_local, model)
        out = kd.scatter_rows(v, i, r, f_local, c)
        return lax.psum(out, data) if data else out

    return _on_mesh(local, (vals_bk, idx_bk, rows_bd), (ROWS, ROWS, ROWS), TABLE, (n_rows, rows_bd.shape[1]), counts_b)


def gather_dot(rows_bd: jax.Array, idx_bk: jax.Array, table_fd: jax.Array,
               counts_b: jax.Array | None = None) -> jax.Array:
    """out[b, k] = <rows[b], table[idx[b, k]]>  -> [B, K] (float32); zero past a row's count."""
    data, model = _mesh_split(rows_bd.shape[0], table_fd.shape[0])
    if data is None and model is None:
        return kd.gather_dot(rows_bd, idx_bk, table_fd, counts_b)

    def local(r, i, t, c):
        if model is None:
            return kd.gather_dot(r, i, t, c)
        li, ones = _local_ids(i, jnp.ones(i.shape, jnp.float32), t.shape[0], model)
        return lax.psum(kd.gather_dot(r, li, t, c) * ones, model)

    return _on_mesh(local, (rows_bd, idx_bk, table_fd), (ROWS, ROWS, TABLE), ROWS, idx_bk.shape, counts_b)


# ---------------------------------------------------------------------------------------------


def topk_decode(vals_bk: jax.Array, idx_bk: jax.Array, w_dec_fd: jax.Array, *, path: str = "sparse",
                counts: jax.Array | None = None) -> jax.Array:
    """`x_hat[b] = sum_k vals[b, k] * W_dec[idx[b, k]]` (no bias) [B, D] in the operands' promoted
    dtype (accumulated in float32), with the sparse backward of `pallas_kernels.topk_decode`.

    `path` is the kernel package's vocabulary: `auto` (the Pallas kernel where the backend and sizes
    allow it, else `sparse`), `pallas` (force the kernel; interpret mode on CPU), `sparse` (the
    plain-JAX loops), `dense` (the [B, K, D] formula). On one device, or where no mesh axis splits
    the problem, this is the kernel package's own differentiable `topk_decode`; under a mesh the same
    forward and the same backward run on each device's block (`decode_backward` with the loops
    wrapped in `shard_map`). `counts` [B]: rows hold only that many leading nonzero entries (the
    loops skip the rest, which get no gradient)."""
    impl = resolve_path(path, vals_bk, w_dec_fd)
    dtype = jnp.promote_types(vals_bk.dtype, w_dec_fd.dtype)
    data, model = _mesh_split(vals_bk.shape[0], w_dec_fd.shape[0])
    if data is None and model is None:
        bias = jnp.zeros((w_dec_fd.shape[1],), w_dec_fd.dtype)
        return kd.topk_decode(vals_bk, idx_bk, w_dec_fd, bias, impl=impl, counts=counts).astype(dtype)
    return _topk_decode_mesh(vals_bk, idx_bk, w_dec_fd, counts, impl).astype(dtype)


def resolve_path(path: str, vals_bk: jax.Array, w_dec_fd: jax.Array) -> str:
    """The concrete implementation (`pallas_tpu`, `pallas_gpu`, `sparse`, `dense`) for `path`."""
    return dispatch.resolve_impl(path, dispatch.problem_shapes(vals_bk, w_dec_fd), w_dec_fd.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _topk_decode_mesh(vals_bk, idx_bk, w_dec_fd, counts_b, impl):
    return gather_accumulate(vals_bk, idx_bk, w_dec_fd, impl=impl, counts_b=counts_b)


def _topk_decode_mesh_fwd(vals_bk, idx_bk, w_dec_fd, counts_b, impl):
    out = gather_accumulate(vals_bk, idx_bk, w_dec_fd, impl=impl, counts_b=counts_b)
    return out, (vals_bk, idx_bk, w_dec_fd, counts_b)


def _topk_decode_mesh_bwd(impl, res, g_bd):
    vals_bk, idx_bk, w_dec_fd, counts_b = res
    d_vals, d_w = kd.decode_backward(vals_bk, idx_bk, w_dec_fd, g_bd, counts_b, dot=gather_dot,
                                     scatter=scatter_accumulate)
    return d_vals, None, d_w, None


_topk_decode_mesh.defvjp(_topk_decode_mesh_fwd, _topk_decode_mesh_bwd)


def _encode_fwd_impl(x_bd, b_dec_d, w_enc_df, b_enc_f, k, compute_dtype):
    dt = jnp.dtype(compute_dtype)
    xc = (x_bd - b_dec_d).astype(dt)
    pre = jnp.matmul(xc, w_enc_df.astype(dt), preferred_element_type=jnp.float32) + b_enc_f
    vals, idx = ops.topk(pre, k)
    return jax.nn.relu(vals), idx


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def topk_encode(x_bd: jax.Array, b_dec_d: jax.Array, w_enc_df: jax.Array, b_enc_f: jax.Array, k: int,
                compute_dtype: str = "float32", ragged: bool = False):
    """(relu(values) [B, K], indices [B, K]) of the top k of `(x - b_dec) @ W_enc + b_enc`; sparse backward.

    `b_dec` is its own argument so that its gradient, `-W_enc @ d_b_enc`, costs a matrix-vector
    product; the per-row input gradient is only computed when something asks for it. `ragged`: the
    caller keeps only a leading part of each row (BatchTopK's threshold over its candidates), so the
    backward's loops stop at each row's last nonzero cotangent.
    """
    return _encode_fwd_impl(x_bd, b_dec_d, w_enc_df, b_enc_f, k, compute_dtype)


def _topk_encode_fwd(x_bd, b_dec_d, w_enc_df, b_enc_f, k, compute_dtype, ragged):
    vals, idx = _encode_fwd_impl(x_bd, b_dec_d, w_enc_df, b_enc_f, k, compute_dtype)
    return (vals, idx), (x_bd, b_dec_d, w_enc_df, vals, idx)


def _topk_encode_bwd(k, compute_dtype, ragged, res, cotangents):
    x_bd, b_dec_d, w_enc_df, vals, idx = res
    g_vals, _ = cotangents
    h_bk = jnp.where(vals > 0, g_vals, 0.0).astype(jnp.float32)
    n_f = w_enc_df.shape[1]
    d_b = jnp.zeros((n_f,), jnp.float32).at[idx.reshape(-1)].add(h_bk.reshape(-1), mode="promise_in_bounds")
    counts = jnp.max(jnp.where(h_bk != 0, jnp.arange(1, k + 1), 0), axis=1) if ragged else None
    d_w_fd = scatter_accumulate(h_bk, idx, x_bd - b_dec_d, n_f, counts)
    d_x = gather_accumulate(h_bk, idx, w_enc_df.T, counts_b=counts)  # dead code under jit unless x is differentiated
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
