"""Indexed batch streams: batch `i` is a pure function of `i`, read ahead by a background thread.

Axes: `B` batch, `D` d_in.

Every on-disk and synthetic source computes its batch `i` from `i` alone: rows of a file are
visited in a seeded order, epoch after epoch, and batch `i` holds stream positions
`[i B, (i + 1) B)`. So the state of a stream is one integer (the next batch), a resumed run reads
the batches an uninterrupted one would, and a row that turns out bad is named from (batch, row).

The visiting order is a keyed permutation evaluated on the positions of one batch (a Feistel
network over the next even power of two, walked back into `[0, n)`): O(B) time and memory per
batch whatever the file size, where a stored permutation of a billion rows would take 8 GB and
grain's per-element shuffle costs ~45 ms of Python per 4,096-row batch. A grain pipeline over the
batch indices reads `prefetch` batches ahead on one thread, so the train step never waits for the
host and a second core is not taken from XLA for long.

In a multi-process run each process reads only its rows of every global batch (`RowShare`): the
batch is cut into one block of rows per data shard of the mesh, and a process reads the blocks its
devices hold. The global batch is the same whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import grain
import numpy as np

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(v: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective 64-bit hash."""
    v = (v ^ (v >> np.uint64(30))) * _M1
    v = (v ^ (v >> np.uint64(27))) * _M2
    return v ^ (v >> np.uint64(31))


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The images of `positions` (ints in [0, n)) under a random permutation of [0, n) fixed by
    (seed, epoch)."""
    positions = np.asarray(positions, np.int64)
    if n <= 1:
        return positions
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng([seed, epoch, 0xF157E1]).integers(0, 2**63, _ROUNDS, dtype=np.uint64)

    def encrypt(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = encrypt(positions.astype(np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():  # cycle walking: a permutation of the larger domain, restricted to [0, n)
        out[outside] = encrypt(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


def batch_rows(i: int, batch_size: int, n: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The row indices [B] (into a table of `n` rows) of batch `i` of a stream that visits the rows
    in a new seeded order each epoch, batches running on across epoch ends. Unsorted: entry `r`
    is the row that lands at row `r` of the batch."""
    pos = i * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, offset = np.divmod(pos, n)
    if not shuffle:
        return offset
    rows = np.empty_like(offset)
    for e in np.unique(epoch):
        here = epoch == e
        rows[here] = permute(offset[here], n, seed, int(e))
    return rows


class BatchStream:
    """`batch_fn(0), batch_fn(1), ...`, computed `prefetch` ahead by a background thread."""

    def __init__(self, batch_fn: Callable[[int], np.ndarray], prefetch: int = 2):
        self._fn, self._prefetch = batch_fn, prefetch
        self._next = 0
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._it is None:
            ds = grain.MapDataset.range(self._next, 2**62).map(self._fn)
            self._it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self._prefetch)))
        x = next(self._it)
        self._next += 1
        return x

    @property
    def next_index(self) -> int:
        """Index of the batch the next `next()` returns."""
        return self._next

    def get_state(self) -> dict:
        return {"next_batch": self._next}

    def set_state(self, state: dict) -> None:
        self._next = int(state["next_batch"])
        self._it = None


@dataclasses.dataclass(frozen=True)
class RowShare:
    """A process's part of every global batch: the batch is `groups` equal blocks of rows (one per
    data shard of the mesh) and the process reads blocks [first, last). The default is the whole
    batch as one block: a single-process run."""

    groups: int = 1
    first: int = 0
    last: int = 1

    def rows(self, batch_size: int) -> tuple[int, int]:
        """The rows [lo, hi) of a batch of `batch_size` that the process reads."""
        per = batch_size // self.groups
        return self.first * per, self.last * per

    @classmethod
    def of(cls, groups: int, lo: int, hi: int, batch_size: int) -> RowShare:
        """The share of rows [lo, hi) of a batch of `batch_size` cut in `groups` blocks."""
        per = batch_size // groups
        if batch_size % groups or lo % per or hi % per or not 0 <= lo < hi <= batch_size:
            raise ValueError(f"rows [{lo}, {hi}) of a batch of {batch_size} are not whole blocks of {groups} groups")
        return cls(groups, lo // per, hi // per)


class IndexedSource:
    """Base of the sources whose batch `i` is a pure function of `i` (`batch`): iteration,
    read-ahead and the resumable state come from a `BatchStream` over this process's rows of each
    batch (`share`)."""

    host_side = True
    """Batches are computed on the host, so the next ones are read while a train step runs."""

    batch_size: int
    share = RowShare()
    """The rows of each batch this process reads (`set_share`)."""

    def batch(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, i: int, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of batch `i`; sources that can read fewer rows than a batch override this."""
        x = self.batch(i)
        return x if (lo, hi) == (0, len(x)) else x[lo:hi]

    def local_batch(self, i: int) -> np.ndarray:
        """This process's rows of batch `i`."""
        return self.read(i, *self.share.rows(self.batch_size))

    def set_share(self, share: RowShare) -> None:
        """Read only `share` of each batch from now on (call before the first batch is read)."""
        if "stream" in self.__dict__ and self.stream.next_index:
            raise RuntimeError("set_share: batches were already read")
        self.share = share

    def describe(self, i: int, row: int) -> str:  # pragma: no cover - abstract
        """Where row `row` of batch `i` comes from, for error messages."""
        raise NotImplementedError

    @functools.cached_property
    def stream(self) -> BatchStream:
        return BatchStream(self.local_batch)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return next(self.stream)

    def get_state(self) -> dict:
        return self.stream.get_state()

    def set_state(self, state: dict) -> None:
        self.stream.set_state(state)
