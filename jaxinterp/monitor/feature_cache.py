"""A byte-bounded LRU cache of requests' sparse feature codes, per site.

Axes: `T` tokens of a request, `K` cached features per token, `F` d_sae, `D` d_in.

For each request id and site the cache keeps the top-k code of the request's tokens: feature ids
[T, K] (int32) and their activations [T, K] (float32 or float16), on the host. A request is the unit
of eviction: when a `put` would take the arrays' bytes past `max_bytes`, the least recently used
requests (by `put`, `get` or `reconstruct`) are dropped whole until it fits.

`reconstruct` rebuilds the dictionary's output from a cached code without a dense [T, F] matrix:

    x_hat[t] = (sum_k values[t, k] * W_dec[ids[t, k]] + b_dec) / norm_scale

which equals `sae.decode(spec, params, scatter_dense(values, ids, F))`, and for a `topk` dictionary
with K = spec.k, cached from `from_dense(sae.encode(spec, params, x), K)`, equals
`sae.reconstruct(spec, params, x)`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.errors import UsageError
from jaxinterp import dictionaries as dl
from jaxinterp.dictionaries.sae import DictionarySpec, Params

VALUE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
"""Activation dtypes kept as given; others are stored as float32."""


class SparseCode(NamedTuple):
    ids: np.ndarray
    """[T, K] int32 feature ids."""
    values: np.ndarray
    """[T, K] float32 or float16 activations of those features."""

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.values.nbytes


def from_dense(acts_tf: jax.Array | np.ndarray, k: int, dtype=np.float32) -> SparseCode:
    """The k largest activations of each token of dense [T, F] activations, as a `SparseCode`."""
    if acts_tf.ndim != 2:
        raise UsageError(f"acts must be [T, F], got shape {tuple(acts_tf.shape)}")
    if not 0 < k <= acts_tf.shape[1]:
        raise UsageError(f"k={k} must be in [1, F={acts_tf.shape[1]}]")
    values, ids = jax.lax.top_k(jnp.asarray(acts_tf), k)
    return SparseCode(ids=np.asarray(ids, np.int32), values=np.asarray(values, dtype))


def sparse_code(ids_tk, values_tk) -> SparseCode:
    """Host copies of a code in the cache's dtypes, checked for shape; read-only."""
    ids, values = np.asarray(ids_tk), np.asarray(values_tk)
    if ids.ndim != 2 or ids.shape != values.shape:
        raise UsageError(f"ids and values must both be [T, K]; got {ids.shape} and {values.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise UsageError(f"ids must lie in [0, 2**31); got [{ids.min()}, {ids.max()}]")
    ids = np.array(ids, np.int32)
    values = np.array(values, values.dtype if values.dtype in VALUE_DTYPES else np.float32)
    ids.flags.writeable = values.flags.writeable = False
    return SparseCode(ids=ids, values=values)


def decode_sparse(spec: DictionarySpec, params: Params, code: SparseCode) -> jax.Array:
    """Reconstruction [T, D] in raw units from a sparse code, as `sae.decode` on its dense form."""
    if code.ids.size and code.ids.max() >= spec.d_sae:
        raise UsageError(f"cached feature id {int(code.ids.max())} is out of range for d_sae={spec.d_sae}; "
                         f"reconstruct with the dictionary the code came from")
    return dl.decode_sparse(spec, params, jnp.asarray(code.values, jnp.float32), jnp.asarray(code.ids))


class FeatureCache:
    """Requests' top-k feature codes per site, at most `max_bytes` of arrays, least recently used
    requests evicted first."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise UsageError(f"max_bytes={max_bytes} must be > 0")
        self.max_bytes = int(max_bytes)
        self._requests: OrderedDict[Hashable, dict[str, SparseCode]] = OrderedDict()
        self._nbytes = 0

    from_dense = staticmethod(from_dense)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached arrays."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._requests

    def sites(self, request_id: Hashable) -> list[str]:
        """The sites cached for a request (does not count as a use)."""
        return list(self._lookup(request_id))

    def put(self, request_id: Hashable, site: str, ids_tk, values_tk) -> None:
        """Cache a request's code at a site (replacing one already there) and mark the request used."""
        code = sparse_code(ids_tk, values_tk)
        sites = self._requests.get(request_id, {})
        request_bytes = sum(c.nbytes for s, c in sites.items() if s != site) + code.nbytes
        if request_bytes > self.max_bytes:
            what = "entry" if request_bytes == code.nbytes else f"request {request_id!r} with this entry"
            raise UsageError(f"{what} needs {request_bytes} bytes (this entry {code.nbytes}: ids {code.ids.nbytes} + "
                             f"values {code.values.nbytes}), over max_bytes={self.max_bytes}; raise max_bytes, "
                             f"cache fewer tokens or a smaller K, or store float16 values")
        if site in sites:
            self._nbytes -= sites[site].nbytes
        self._requests[request_id] = sites | {site: code}
        self._requests.move_to_end(request_id)
        self._nbytes += code.nbytes
        while self._nbytes > self.max_bytes:
            _, evicted = self._requests.popitem(last=False)
            self._nbytes -= sum(c.nbytes for c in evicted.values())

    def get(self, request_id: Hashable, site: str) -> SparseCode:
        """The cached (ids [T, K], values [T, K]) of a request at a site; marks the request used."""
        sites = self._lookup(request_id)
        if site not in sites:
            raise KeyError(f"site {site!r} not cached for request {request_id!r}; its sites are {sorted(sites)}")
        self._requests.move_to_end(request_id)
        return sites[site]

    def pop(self, request_id: Hashable) -> dict[str, SparseCode]:
        """Remove a request, returning its codes by site."""
        sites = self._lookup(request_id)
        del self._requests[request_id]
        self._nbytes -= sum(c.nbytes for c in sites.values())
        return sites

    def reconstruct(self, request_id: Hashable, site: str, spec: DictionarySpec, params: Params) -> jax.Array:
        """The dictionary's reconstruction [T, D] (raw units) of a request's tokens at a site."""
        return decode_sparse(spec, params, self.get(request_id, site))

    def _lookup(self, request_id: Hashable) -> dict[str, SparseCode]:
        if request_id not in self._requests:
            raise KeyError(f"request {request_id!r} not cached (never put, or evicted); "
                           f"{len(self._requests)} requests cached in {self._nbytes} of {self.max_bytes} bytes")
        return self._requests[request_id]
