"""Sparse top-k decode kernels: `x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] + b_dec`.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_model.

`topk_decode` dispatches (TPU: Mosaic kernel, GPU: Triton kernel, CPU: plain-JAX reference) and
carries a sparse custom VJP; `fused_topk_decode` selects the top k of pre-activations first. The
kernels themselves are `topk_decode_tpu` and `topk_decode_gpu`; `topk_decode_reference` and
`fused_reference` are the plain-JAX code they equal.
"""

from pallas_kernels.topk_decode.autodiff import topk_decode
from pallas_kernels.topk_decode.dispatch import (
    IMPLS,
    can_use_pallas,
    current_platform,
    pallas_unsupported_reason,
    resolve_impl,
)
from pallas_kernels.topk_decode.fused import FusedDecode, fused_topk_decode
from pallas_kernels.topk_decode.gpu import topk_decode_gpu
from pallas_kernels.topk_decode.reference import fused_reference, select_topk, topk_decode_reference
from pallas_kernels.topk_decode.tpu import topk_decode_tpu

__all__ = [
    "IMPLS",
    "FusedDecode",
    "can_use_pallas",
    "current_platform",
    "fused_reference",
    "fused_topk_decode",
    "pallas_unsupported_reason",
    "resolve_impl",
    "select_topk",
    "topk_decode",
    "topk_decode_gpu",
    "topk_decode_reference",
    "topk_decode_tpu",
]
