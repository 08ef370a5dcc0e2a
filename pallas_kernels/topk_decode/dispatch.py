"""Which implementation of the top-k decode runs where.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_model.

  impl="auto"       TPU -> Mosaic kernel, GPU -> Triton kernel (when `can_use_pallas`), else sparse
  impl="pallas"     the kernel for this platform; on CPU the Triton kernel in interpret mode
  impl="pallas_tpu" / "pallas_gpu"   that kernel, interpreted unless running on its own hardware
  impl="sparse"     plain JAX, K gathers of [B, D] rows accumulated in a loop (the fast path on CPU)
  impl="dense"      `topk_decode_reference` (plain JAX, one [B, K, D] gather: the formula itself)

The same names serve `jaxinterp` (`dictionary.topk_path`), whose sharded training step runs these
forwards and the one backward in `autodiff.py` on each device's block.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.topk_decode import gpu, tpu
from pallas_kernels.topk_decode.reference import topk_decode_reference

Impl = Literal["auto", "pallas", "pallas_tpu", "pallas_gpu", "sparse", "dense"]
IMPLS = ("auto", "pallas", "pallas_tpu", "pallas_gpu", "sparse", "dense")

_DTYPES = {"tpu": ("float32", "bfloat16"), "gpu": ("float32", "bfloat16", "float16")}


def current_platform() -> str:
    """'tpu', 'gpu' (CUDA or ROCm) or 'cpu': the platform of the default backend."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def pallas_unsupported_reason(platform: str, shapes: tuple[int, int, int, int], dtype="float32") -> str | None:
    """Why the kernel for `platform` cannot take `shapes` = (B, K, F, D) with W_dec of `dtype`, or None."""
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if platform not in _DTYPES:
        return f"no compiled Pallas kernel for platform {platform!r} (platforms: {sorted(_DTYPES)}; CPU only interprets)"
    if len(shapes) != 4 or min(shapes) < 1:
        return f"shapes {shapes} must be four positive sizes (B, K, F, D)"
    n_rows, k, n_feat, d_model = shapes
    name = jnp.dtype(dtype).name
    if name not in _DTYPES[platform]:
        return f"W_dec dtype {name} not supported on {platform}; use one of {_DTYPES[platform]}"
    if n_feat >= 2**31:
        return f"F={n_feat} does not fit int32 indices"
    if platform == "tpu" and (need := tpu.tpu_vmem_bytes(k, tpu.LANES, dtype)) > tpu.VMEM_BUDGET_BYTES:
        return (f"K={k} needs {need / 2**20:.1f} MiB of VMEM at the narrowest column block, over the "
                f"{tpu.VMEM_BUDGET_BYTES / 2**20:.0f} MiB budget; use impl='reference' or a smaller K")
    return None


def can_use_pallas(platform: str, shapes: tuple[int, int, int, int], dtype="float32") -> bool:
    """Whether `platform` ('tpu', 'gpu'/'cuda'/'rocm', 'cpu') has a kernel for (B, K, F, D) and `dtype`."""
    return pallas_unsupported_reason(platform, shapes, dtype) is None


def resolve_impl(impl: str, shapes: tuple[int, int, int, int], dtype, platform: str | None = None) -> str:
    """The concrete implementation, one of 'pallas_tpu', 'pallas_gpu', 'sparse', 'dense', for `impl`."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; choose one of {IMPLS}")
    platform = platform or current_platform()
    if impl in ("sparse", "dense"):
        return impl
    if impl == "auto":
        if platform in ("tpu", "gpu") and can_use_pallas(platform, shapes, dtype):
            return f"pallas_{platform}"
        return "sparse"
    kernel = impl if impl != "pallas" else ("pallas_tpu" if platform == "tpu" else "pallas_gpu")
    kernel_platform = kernel.removeprefix("pallas_")
    reason = pallas_unsupported_reason(kernel_platform, shapes, dtype)
    if reason is not None:
        raise ValueError(f"impl={impl!r}: {reason}")
    return kernel


def gather_accumulate(vals_bk: jax.Array, idx_bk: jax.Array, table_fd: jax.Array, counts_b=None) -> jax.Array:
    """out[b] = sum_j vals[b, j] * table[idx[b, j]] -> [B, D] float32: K gathers of [B, D] rows
    accumulated in a loop (XLA's one-shot [B, K, D] gather runs ~10x slower on CPU).

    `counts_b` [B] (optional): row b holds only `counts[b]` leading entries (the rest are zero);
    the loops then visit those only (see `ragged_blocks`)."""
    if counts_b is not None:
        perm, outs = by_blocks(counts_b, lambda v, i, trips: gather_accumulate_n(v, i, table_fd, trips), vals_bk, idx_bk)
        return unsort_rows(jnp.concatenate(outs), perm)
    return gather_accumulate_n(vals_bk, idx_bk, table_fd, vals_bk.shape[1])


def gather_accumulate_n(vals_bk, idx_bk, table_fd, n_cols) -> jax.Array:
    """`gather_accumulate` over the first `n_cols` columns (a traced count is allowed)."""

    def body(j, acc_bd):
        rows_bd = table_fd.at[column(idx_bk, j)].get(mode="promise_in_bounds").astype(jnp.float32)
        return acc_bd + column(vals_bk, j).astype(jnp.float32)[:, None] * rows_bd

    return lax.fori_loop(0, n_cols, body, jnp.zeros((vals_bk.shape[0], table_fd.shape[1]), jnp.float32))


RAGGED_BLOCK_ROWS = 512
"""Rows per block of the ragged loops (at most RAGGED_MAX_BLOCKS blocks: larger blocks beyond)."""
RAGGED_MAX_BLOCKS = 16


def ragged_blocks(counts_b: jax.Array):
    """Rows sorted by their count of entries, most first, cut into blocks: (perm [B], [(lo, hi,
    trips)]) where a block's loops run `trips` = its first row's count columns, not K. When a
    batch's rows hold between none and 2k entries but k on average (BatchTopK's candidates after the
    batch threshold), the loops visit about the kept entries instead of every candidate."""
    n = counts_b.shape[0]
    n_blocks = max(1, min(RAGGED_MAX_BLOCKS, -(-n // RAGGED_BLOCK_ROWS)))
    size = -(-n // n_blocks)
    perm = jnp.argsort(-counts_b.astype(jnp.int32))
    sorted_b = counts_b[perm].astype(jnp.int32)
    return perm, [(lo, min(lo + size, n), sorted_b[lo]) for lo in range(0, n, size)]


def by_blocks(counts_b: jax.Array, fn, *rows):
    """(perm, [fn(*block_rows, trips) for each block of `ragged_blocks`]): `rows` ([B, ...] arrays,
    counts included if `fn` wants them) sorted by count, most first, and cut into blocks."""
    perm, blocks = ragged_blocks(counts_b)
    rows = [a[perm] for a in rows]
    return perm, [fn(*(a[lo:hi] for a in rows), trips) for lo, hi, trips in blocks]


def unsort_rows(a_b_: jax.Array, perm: jax.Array) -> jax.Array:
    """Rows of `a` (in `perm`'s order) back in the original order."""
    return a_b_[jnp.argsort(perm)]


def column(a_bk: jax.Array, j) -> jax.Array:
    return lax.dynamic_index_in_dim(a_bk, j, axis=1, keepdims=False)


def decode_forward(vals_bk, idx_bk, w_dec_fd, b_dec_d, impl: str, interpret, counts_b=None) -> jax.Array:
    """Run the resolved `impl` ('pallas_tpu', 'pallas_gpu', 'sparse', 'dense'); interpret=None: iff
    off its hardware. `counts_b` (rows' counts of leading nonzero entries) only saves work: the
    sparse loops use it, the others compute the zeros."""
    if impl == "dense":
        return topk_decode_reference(vals_bk, idx_bk, w_dec_fd, b_dec_d)
    if impl == "sparse":
        acc = gather_accumulate(vals_bk, idx_bk, w_dec_fd, counts_b) + b_dec_d.astype(jnp.float32)
        return acc.astype(w_dec_fd.dtype)
    if interpret is None:
        interpret = current_platform() != impl.removeprefix("pallas_")
    if impl == "pallas_tpu":
        return tpu.topk_decode_tpu(vals_bk, idx_bk, w_dec_fd, b_dec_d, interpret=interpret)
    return gpu.topk_decode_gpu(vals_bk, idx_bk, w_dec_fd, b_dec_d, interpret=bool(interpret))


def problem_shapes(vals_bk: jax.Array, w_dec_fd: jax.Array) -> tuple[int, int, int, int]:
    """(B, K, F, D) of a decode; leading batch axes of vals are folded into B."""
    return (math.prod(vals_bk.shape[:-1]), vals_bk.shape[-1], *w_dec_fd.shape)
