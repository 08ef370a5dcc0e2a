"""Pallas kernels for the sparse dictionaries, with the plain-JAX code each one equals.

Standalone: nothing here imports `jaxinterp`.
"""

from pallas_kernels import topk_decode

__all__ = ["topk_decode"]
