"""A preallocated key/value cache for incremental decoding.

Axes: `L` layers, `B` batch, `T` new positions, `S` cache slots, `G` key/value heads, `K` head_dim.

Slots are filled left to right: a prefill writes its T (left-padded) prompt positions at slots
[0, T), each decode step writes one more. `valid` marks slots holding real tokens (padding never
is), `pos` their positions; a query at slot q sees slot s when s <= q and s is valid (and, in a
sliding-window layer, when its position is within the window). The cache is a pytree of arrays,
so it lives in a `lax.while_loop` carry and can be donated.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]
    """Per layer: keys [B, S, G, K] (after RoPE)."""
    v: tuple[jax.Array, ...]
    """Per layer: values [B, S, G, K]."""
    pos: jax.Array
    """[B, S] int32 position of the token in each slot."""
    valid: jax.Array
    """[B, S] bool: the slot holds a real token."""
    length: jax.Array
    """[] int32: slots written so far."""


def empty_cache(cfg, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, slots, cfg.n_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
                   pos=jnp.zeros((batch, slots), jnp.int32), valid=jnp.zeros((batch, slots), jnp.bool_),
                   length=jnp.zeros((), jnp.int32))


class CacheWriter:
    """Writes one forward's keys/values into a cache while the forward is traced."""

    def __init__(self, cache: KVCache, positions_bt: jax.Array, valid_bt: jax.Array):
        t = positions_bt.shape[1]
        slots = cache.pos.shape[1]
        self.start = cache.length
        self.pos = jax.lax.dynamic_update_slice(cache.pos, positions_bt.astype(jnp.int32), (0, self.start))
        self.valid = jax.lax.dynamic_update_slice(cache.valid, valid_bt.astype(jnp.bool_), (0, self.start))
        q_slot = self.start + jnp.arange(t)
        causal_ts = jnp.arange(slots)[None, :] <= q_slot[:, None]
        self.mask_bts = self.valid[:, None, :] & causal_ts[None]
        self.k, self.v = list(cache.k), list(cache.v)
        self._t = t

    def write(self, layer: int, k_btgk: jax.Array, v_btgk: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Store this forward's keys/values for `layer`; return the layer's whole cache [B, S, G, K]."""
        at = (0, self.start, 0, 0)
        self.k[layer] = jax.lax.dynamic_update_slice(self.k[layer], k_btgk.astype(self.k[layer].dtype), at)
        self.v[layer] = jax.lax.dynamic_update_slice(self.v[layer], v_btgk.astype(self.v[layer].dtype), at)
        return self.k[layer], self.v[layer]

    def result(self) -> KVCache:
        return KVCache(k=tuple(self.k), v=tuple(self.v), pos=self.pos, valid=self.valid,
                       length=self.start + self._t)
