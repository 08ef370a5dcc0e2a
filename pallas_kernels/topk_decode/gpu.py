"""Top-k decode as a Pallas kernel for the Triton (GPU) backend.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_model.

Each program owns a tile of `block_b` rows and `block_d` columns of the output and loops over the
K selected features, gathering the `block_b` rows `W_dec[idx[:, j], d-tile]` with one indexed load
and accumulating in float32. Triton wants power-of-two tiles: the batch is padded in the wrapper
(vals and idx are small), the D tail is masked in the kernel (padding W_dec would copy it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# The register tile is block_b x block_d float32 per program: 16 x 256 with 4 warps is 32 values a
# thread, which leaves room for the gathered rows in flight.
MAX_BLOCK_B = 16
MAX_BLOCK_D = 256


def _kernel(vals_ref, idx_ref, w_ref, b_ref, o_ref, *, k: int, d_model: int, block_b: int, block_d: int):
    row0 = pl.program_id(0) * block_b
    col0 = pl.program_id(1) * block_d
    cols = col0 + lax.broadcasted_iota(jnp.int32, (block_d,), 0)
    col_ok = cols < d_model
    tile_ok = jnp.broadcast_to(col_ok[None, :], (block_b, block_d))
    rows = pl.ds(row0, block_b)

    def body(j, acc):
        ids = idx_ref[rows, j]                                        # [block_b] int32
        v = vals_ref[rows, j].astype(jnp.float32)                     # [block_b]
        # two broadcast integer indexers (not an array and a slice): the form both the Triton
        # lowering and the interpreter's discharge rule accept
        w = plt.load(w_ref.at[ids[:, None], cols[None, :]], mask=tile_ok, other=0)
        return acc + v[:, None] * w.astype(jnp.float32)

    acc = lax.fori_loop(0, k, body, jnp.zeros((block_b, block_d), jnp.float32))
    bias = plt.load(b_ref.at[pl.ds(col0, block_d)], mask=col_ok, other=0).astype(jnp.float32)
    plt.store(o_ref.at[rows, pl.ds(col0, block_d)], (acc + bias[None, :]).astype(o_ref.dtype), mask=tile_ok)


def gpu_tiles(n_rows: int, d_model: int) -> tuple[int, int]:
    """Default (block_b, block_d): powers of two, no larger than the problem needs."""
    return min(MAX_BLOCK_B, pl.next_power_of_2(n_rows)), min(MAX_BLOCK_D, pl.next_power_of_2(d_model))


@functools.partial(jax.jit, static_argnames=("block_b", "block_d", "num_warps", "num_stages", "interpret"))
def topk_decode_gpu(vals_bk: jax.Array, idx_bk: jax.Array, w_dec_fd: jax.Array, b_dec_d: jax.Array, *,
                    block_b: int | None = None, block_d: int | None = None, num_warps: int = 4,
                    num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """Triton-backend Pallas kernel equal to

        x_hat = (jnp.einsum("bk,bkd->bd", vals.astype(f32), W_dec[idx].astype(f32))
                 + b_dec.astype(f32)).astype(W_dec.dtype)

    vals [B, K] (any float dtype), idx [B, K] int32 in [0, F), W_dec [F, D], b_dec [D] -> [B, D] in
    W_dec's dtype. Indices are not bounds-checked (as in `mode="promise_in_bounds"`). `interpret=True`
    runs it on CPU through Pallas' HLO interpreter.
    """
    n_rows, k = vals_bk.shape
    n_feat, d_model = w_dec_fd.shape
    if idx_bk.shape != (n_rows, k) or b_dec_d.shape != (d_model,):
        raise ValueError(f"shapes vals {vals_bk.shape}, idx {idx_bk.shape}, W_dec {w_dec_fd.shape}, "
                         f"b_dec {b_dec_d.shape} do not fit [B, K], [B, K], [F, D], [D]")
    default_b, default_d = gpu_tiles(n_rows, d_model)
    block_b, block_d = block_b or default_b, block_d or default_d
    for name, size in (("block_b", block_b), ("block_d", block_d)):
        if size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two (Triton tiles); leave it None for the default")

    padded_rows = pl.cdiv(n_rows, block_b) * block_b
    pad = ((0, padded_rows - n_rows), (0, 0))
    vals_bk = jnp.pad(vals_bk, pad)              # padded rows decode zeros times row 0
    idx_bk = jnp.pad(idx_bk.astype(jnp.int32), pad)

    kernel = functools.partial(_kernel, k=k, d_model=d_model, block_b=block_b, block_d=block_d)
    out_bd = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, d_model), w_dec_fd.dtype),
        grid=(padded_rows // block_b, pl.cdiv(d_model, block_d)),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="topk_decode_gpu",
    )(vals_bk, idx_bk, w_dec_fd, b_dec_d)
    return out_bd[:n_rows]
