"""Top-k decode as a Pallas Mosaic (TPU) kernel.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_model.

The indices live in SMEM through scalar prefetch; W_dec stays in HBM (`memory_space=pl.ANY`)
and the kernel copies the `block_b * K` rows it needs, each a `[1, block_d]` DMA, into a VMEM
buffer laid out [K, block_b, block_d], so that step j of the reduction is one
`[block_b, block_d]` multiply-add with the column `vals[:, j]` of the [block_b, K] vals block.
The grid is (D blocks, batch blocks); the batch axis runs in order so that the rows of batch
block i + 1 are copied while block i is reduced (two buffer slots, one DMA semaphore each).

TPU tiling: blocks of the last two dims must be multiples of (8, 128) or the full dims, so the
wrapper pads B to a multiple of `block_b` and D to a multiple of 128 -- the padded columns of
W_dec cost one copy of W_dec, made only when D % 128 != 0 (d_model is a multiple of 128 in the
models this is for). SMEM holds about 1 MiB, so batches whose indices need more than
`MAX_PREFETCH_INDICES` are split into several calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
# 256 KiB of int32 indices per call: a quarter of SMEM, leaving room for Mosaic's own scalars.
MAX_PREFETCH_INDICES = 64 * 1024
# Scoped VMEM the kernel may use: under v5e's 16 MiB default (v6e and v7x default to 32 MiB).
VMEM_BUDGET_BYTES = 12 * 1024 * 1024
# Two slots of the [K, block_b, block_d] row buffer; wider column blocks mean fewer grid steps.
ROW_BUFFER_BYTES = 4 * 1024 * 1024
MAX_BLOCK_D = 2048


def tpu_block_b(dtype) -> int:
    """Rows per batch block: one full sublane tile of W_dec's dtype (8 for 32-bit, 16 for bf16)."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def tpu_vmem_bytes(k: int, block_d: int, dtype) -> int:
    """VMEM the kernel holds for K and a column block: the double-buffered [block_b, K] vals block
    (K lane-padded to 128), the two row-buffer slots, the output and bias blocks."""
    item, block_b = jnp.dtype(dtype).itemsize, tpu_block_b(dtype)
    vals = 2 * block_b * pl.cdiv(k, LANES) * LANES * 4
    rows = 2 * k * block_b * block_d * item
    out_bias = 2 * block_b * block_d * item + 2 * 8 * block_d * 4
    return vals + rows + out_bias


def tpu_block_d(k: int, d_padded: int, dtype) -> int:
    """Largest multiple of 128 that divides `d_padded` and keeps the row buffer in budget."""
    item = jnp.dtype(dtype).itemsize
    block_b = tpu_block_b(dtype)
    best = LANES
    for lanes in range(LANES, min(d_padded, MAX_BLOCK_D) + 1, LANES):
        if (d_padded % lanes == 0 and 2 * k * block_b * lanes * item <= ROW_BUFFER_BYTES
                and tpu_vmem_bytes(k, lanes, dtype) <= VMEM_BUDGET_BYTES):
            best = lanes
    return best


def _kernel(idx_smem, vals_ref, w_hbm, b_ref, o_ref, rows_vmem, sems, *, k: int, block_b: int, block_d: int):
    d_blk, b_blk, n_b = pl.program_id(0), pl.program_id(1), pl.num_programs(1)
    col0 = pl.multiple_of(d_blk * block_d, LANES)

    def row_copy(slot, b, j, row):
        return pltpu.make_async_copy(w_hbm.at[pl.ds(row, 1), pl.ds(col0, block_d)],
                                     rows_vmem.at[slot, j, pl.ds(b, 1)], sems.at[slot])

    def start_block(block, slot):
        base = block * (block_b * k)

        def body(t, carry):
            # lax.div / lax.rem, not // and %: Python's floor semantics lower through `sign`,
            # whose Mosaic rule asks for the TPU generation (and fails when exporting off-TPU)
            b, j = lax.div(t, k), lax.rem(t, k)
            row_copy(slot, b, j, idx_smem[base + t]).start()
            return carry

        lax.fori_loop(0, block_b * k, body, 0)

    def wait_block(slot):
        # every copy into this slot signals the same semaphore by the same byte count
        def body(t, carry):
            row_copy(slot, 0, 0, 0).wait()
            return carry

        lax.fori_loop(0, block_b * k, body, 0)

    slot = lax.rem(b_blk, 2)

    @pl.when(b_blk == 0)
    def _():
        start_block(b_blk, slot)

    @pl.when(b_blk + 1 < n_b)
    def _():
        start_block(b_blk + 1, 1 - slot)

    wait_block(slot)

    vals_bk = vals_ref[...]
    lane = lax.broadcasted_iota(jnp.int32, vals_bk.shape, 1)

    def accumulate(j, acc):
        # column j as [block_b, 1] by a masked lane reduction: Mosaic has no dynamic lane slice
        v_b1 = jnp.sum(jnp.where(lane == j, vals_bk, 0.0), axis=1, keepdims=True)
        return acc + v_b1 * rows_vmem[slot, j].astype(jnp.float32)

    acc = lax.fori_loop(0, k, accumulate, jnp.zeros((block_b, block_d), jnp.float32))
    o_ref[...] = (acc + b_ref[...]).astype(o_ref.dtype)


def _call(vals_bk, idx_flat, w_dec_fd, b_dec_1d, *, block_b, block_d, interpret):
    n_rows, k = vals_bk.shape
    d_padded = w_dec_fd.shape[1]
    kernel = functools.partial(_kernel, k=k, block_b=block_b, block_d=block_d)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(d_padded // block_d, n_rows // block_b),
        in_specs=[
            pl.BlockSpec((block_b, k), lambda d, i, idx: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((1, block_d), lambda d, i, idx: (0, d)),
        ],
        out_specs=pl.BlockSpec((block_b, block_d), lambda d, i, idx: (i, d)),
        scratch_shapes=[
            pltpu.VMEM((2, k, block_b, block_d), w_dec_fd.dtype),
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_rows, d_padded), w_dec_fd.dtype),
        grid_spec=grid_spec,
        # the batch axis carries the prefetch of the next block, so it must run in order
        compiler_params=pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL, pltpu.ARBITRARY)),
        interpret=interpret,
        name="topk_decode_tpu",
    )(idx_flat, vals_bk, w_dec_fd, b_dec_1d)


@functools.partial(jax.jit, static_argnames=("block_d", "interpret"))
def topk_decode_tpu(vals_bk: jax.Array, idx_bk: jax.Array, w_dec_fd: jax.Array, b_dec_d: jax.Array, *,
                    block_d: int | None = None, interpret=False) -> jax.Array:
    """Mosaic TPU kernel equal to

        x_hat = (jnp.einsum("bk,bkd->bd", vals.astype(f32), W_dec[idx].astype(f32))
                 + b_dec.astype(f32)).astype(W_dec.dtype)

    vals [B, K] (any float dtype), idx [B, K] int32 in [0, F), W_dec [F, D], b_dec [D] -> [B, D] in
    W_dec's dtype. An index outside [0, F) is a DMA out of bounds (a runtime error on TPU).
    `interpret=True` or a `pltpu.InterpretParams()` runs it on CPU.
    """
    n_rows, k = vals_bk.shape
    n_feat, d_model = w_dec_fd.shape
    if idx_bk.shape != (n_rows, k) or b_dec_d.shape != (d_model,):
        raise ValueError(f"shapes vals {vals_bk.shape}, idx {idx_bk.shape}, W_dec {w_dec_fd.shape}, "
                         f"b_dec {b_dec_d.shape} do not fit [B, K], [B, K], [F, D], [D]")
    block_b = tpu_block_b(w_dec_fd.dtype)
    d_padded = pl.cdiv(d_model, LANES) * LANES
    block_d = block_d or tpu_block_d(k, d_padded, w_dec_fd.dtype)
    if block_d % LANES or d_padded % block_d:
        raise ValueError(f"block_d={block_d} must be a multiple of {LANES} dividing the padded D={d_padded}")
    if d_padded != d_model:
        w_dec_fd = jnp.pad(w_dec_fd, ((0, 0), (0, d_padded - d_model)))
        b_dec_d = jnp.pad(b_dec_d, (0, d_padded - d_model))

    # calls of at most MAX_PREFETCH_INDICES indices (rounded down to whole batch blocks)
    chunk = max(block_b, MAX_PREFETCH_INDICES // k // block_b * block_b)
    n_padded = pl.cdiv(n_rows, block_b) * block_b
    pad = ((0, n_padded - n_rows), (0, 0))
    vals_bk = jnp.pad(vals_bk.astype(jnp.float32), pad)
    idx_bk = jnp.pad(idx_bk.astype(jnp.int32), pad)   # padded rows decode row 0 times 0
    b_dec_1d = b_dec_d.astype(jnp.float32)[None, :]
    outs = [
        _call(vals_bk[s:s + chunk], idx_bk[s:s + chunk].reshape(-1), w_dec_fd, b_dec_1d,
              block_b=block_b, block_d=block_d, interpret=interpret)
        for s in range(0, n_padded, chunk)
    ]
    out_bd = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return out_bd[:n_rows, :d_model]
