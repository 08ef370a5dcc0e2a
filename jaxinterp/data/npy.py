"""Activations on disk: a `.npy` matrix [tokens, d_in] read through a memory map with grain.

A transcoder's targets come from a second file (`data.target_path`) of the same number of rows:
each batch holds input and target rows side by side, [B, D_in + D_out].

The train split is the first `1 - eval_fraction` of the rows, the eval split the rest. Rows are
shuffled (a new order each epoch), batched, and read with one sorted fancy-index per batch, ahead
of the step on a background thread (`batches.py`). The stream's state (the next batch index) is
saved with each checkpoint, so a resumed run reads the same batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxinterp.config import DataConfig
from jaxinterp.data.batches import IndexedSource, batch_rows
from jaxinterp.errors import JaxinterpError

_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


class DataError(JaxinterpError):
    """Unreadable or mismatched activation data; the message names the file and the fix."""


def check_finite(x: np.ndarray, where: Callable[[int], str]) -> None:
    """Raise `DataError` naming (through `where(row)`) the first row of `x` [B, D] that holds a NaN
    or an infinity, or values so large that its squared norm overflows float32."""
    x = np.asarray(x, np.float32)
    finite = np.isfinite(x).all(axis=-1)
    if not finite.all():
        row = int(np.argmin(finite))
        value = "NaN" if np.isnan(x[row]).any() else "an infinity"
        raise DataError(f"bad data: {where(row)} holds {value}; remove or repair that row")
    with np.errstate(over="ignore"):
        sq = np.einsum("bd,bd->b", x, x)
    if not np.isfinite(sq).all():
        row = int(np.argmin(np.isfinite(sq)))
        raise DataError(f"bad data: {where(row)} holds values too large for float32 (|x| up to "
                        f"{float(np.abs(x[row]).max()):.3g}; its squared norm overflows); rescale the activations "
                        f"or remove that row")


def memmap_npy(path: Path, fix: str) -> np.ndarray:
    """Memory-map a .npy file; 2-byte raw values (how numpy saves bfloat16) come back as bfloat16.
    An unreadable file is a DataError naming it and `fix`."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror}); {fix}") from None
    if magic != b"\x93NUMPY":
        raise DataError(f"{path} is not a .npy file (it lacks the .npy header); {fix}")
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:  # numpy raises several types for corrupt headers
        raise DataError(f"{path} is not a readable .npy file ({e}); {fix}") from None
    if arr.dtype.kind == "V" and arr.dtype.itemsize == 2:
        arr = arr.view(ml_dtypes.bfloat16)
    return arr


def open_activations(path: str, dtype: str = "auto") -> np.ndarray:
    """Memory-map an activation file [tokens, d_in], checking its shape and dtype."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path {str(p)!r} not found; point data.path at an existing .npy activation file")
    arr = memmap_npy(p, "re-create it with numpy.save")
    if arr.ndim != 2:
        raise DataError(f"data.path {str(p)!r} has shape {arr.shape}; expected a matrix [tokens, d_in]")
    if arr.dtype == np.dtype(ml_dtypes.bfloat16) and dtype not in ("bfloat16", "auto"):
        raise DataError(f"data.path {str(p)!r} holds 2-byte raw values; set data.dtype: bfloat16")
    if dtype != "auto" and arr.dtype != np.dtype(_DTYPES[dtype]):
        raise DataError(f"data.path {str(p)!r} has dtype {arr.dtype}, but data.dtype is {dtype}; set data.dtype: auto")
    if arr.dtype not in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)):
        raise DataError(f"data.path {str(p)!r} has dtype {arr.dtype}; expected float16, bfloat16 or float32")
    return arr


class NpySource(IndexedSource):
    """Shuffled, batched, resumable rows of an activation file."""

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int):
        assert cfg.path is not None
        self.path, self.target_path = cfg.path, cfg.target_path
        self._arr = open_activations(cfg.path, cfg.dtype)
        n = self._arr.shape[0]
        self.d_in = int(self._arr.shape[1])
        self._target = None if cfg.target_path is None else open_activations(cfg.target_path, cfg.dtype)
        self.d_out = None if self._target is None else int(self._target.shape[1])
        if self._target is not None and self._target.shape[0] != n:
            raise DataError(f"data.target_path {cfg.target_path!r} has {self._target.shape[0]} rows, data.path "
                            f"{cfg.path!r} {n}; the target file needs one row per input row")
        self.n_train = n - int(n * cfg.eval_fraction)
        if self.n_train < batch_size:
            raise DataError(
                f"data.path {cfg.path!r} has {self.n_train} training rows, fewer than train.batch_size={batch_size}; "
                "lower the batch size or provide more activations"
            )
        self.true_directions = np.load(cfg.true_directions) if cfg.true_directions else None
        if self.true_directions is not None and self.true_directions.shape[-1] != self.d_in:
            raise DataError(
                f"data.true_directions has width {self.true_directions.shape[-1]}, the activations {self.d_in}"
            )
        self.batch_size, self.seed, self.shuffle = batch_size, seed, cfg.shuffle

    def rows(self, i: int) -> np.ndarray:
        """File rows [B] of training batch `i`, in the order the batch holds them (ascending, so the
        memory map is read front to back)."""
        return np.sort(batch_rows(i, self.batch_size, self.n_train, self.seed, self.shuffle))

    def _read(self, rows) -> np.ndarray:
        x = np.asarray(self._arr[rows], dtype=np.float32)
        if self._target is None:
            return x
        return np.concatenate([x, np.asarray(self._target[rows], dtype=np.float32)], axis=-1)

    def batch(self, i: int) -> np.ndarray:
        return self._read(self.rows(i))

    def read(self, i: int, lo: int, hi: int) -> np.ndarray:
        return self._read(self.rows(i)[lo:hi])

    def describe(self, i: int, row: int) -> str:
        files = self.path if self.target_path is None else f"{self.path} (or its target file {self.target_path})"
        return f"{files} row {int(self.rows(i)[row])} (training batch {i}, row {row} of the batch)"

    def eval_batches(self, n_tokens: int, batch_size: int):
        start, stop = self.n_train, self._arr.shape[0]
        if stop == start:  # no held-out rows: evaluate on the head of the file
            start, stop = 0, self.n_train
        stop = min(stop, start + n_tokens)
        for s in range(start, stop, batch_size):
            x = self._read(slice(s, min(s + batch_size, stop)))
            check_finite(x, lambda r, s=s: f"{self.path} row {s + r} (held out for the final evaluation)")
            yield x
