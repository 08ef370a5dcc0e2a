"""Steering at one intercept site, as a pure function of the site's value and arrays of data.

Axes: `B` batch, `T` positions, `D` d_model, `F` d_sae, `S` feature slots, `V` vector slots.

A site's steering is a `SiteSteering` pytree: feature slots (through the dictionary attached to
the site) and raw-vector slots, each with a mode, a value and a position window [lo, hi). Every
sequence has its own slots; unused slots have mode OFF. Changing any value, id, mode or window is
new data for the same compiled function; only the number of slots (padded to a multiple of
`SLOT_QUANTUM`) and the dictionary's shape are structure.

Feature edits keep the dictionary's reconstruction error: x' = x + decode(f') - decode(f), which
is sum_s (f'_s - f_s) W_dec[id_s] / norm_scale, with f' = f + v (ADD), v (CLAMP), f * v (SCALE)
or 0 (ABLATE). Through a transcoder the features are read at its input site and the difference
is written at its target site (the edit reads the earlier site, see `models.intercept.Plan`). With `encode="selected"`, only the steered features' encoder columns are used: exact
for relu, jumprelu, batchtopk and gated dictionaries, and for ADD with any; for topk it takes a
feature as active when its pre-activation is positive, without the top-k competition.

Vector edits, in slot order: ADD x + v * a; ADD_NORMED x + v * a * ||x|| / ||a||; REMOVE
x - (x . u) u with u = a / ||a||; CAP x - max(x . u - v, 0) u (projection capped at v).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinterp import dictionaries as dl

OFF, ADD, CLAMP, SCALE, ABLATE = 0, 1, 2, 3, 4
FEATURE_MODES = {"add": ADD, "clamp": CLAMP, "scale": SCALE, "ablate": ABLATE}
V_ADD, V_ADD_NORMED, V_REMOVE, V_CAP = 1, 2, 3, 4
VECTOR_MODES = {"add": V_ADD, "add_normed": V_ADD_NORMED, "remove": V_REMOVE, "cap": V_CAP}
SLOT_QUANTUM = 4
NO_END = 2**30
"""`hi` of a window that never ends."""


class FeatureSlots(NamedTuple):
    ids: jax.Array
    """[B, S] int32 feature ids."""
    values: jax.Array
    """[B, S] float32: the amount added, the clamp value, or the scale factor."""
    modes: jax.Array
    """[B, S] int32: OFF, ADD, CLAMP, SCALE, ABLATE."""
    lo: jax.Array
    """[B, S] int32: first position steered."""
    hi: jax.Array
    """[B, S] int32: one past the last position steered."""


class VectorSlots(NamedTuple):
    vectors: jax.Array
    """[B, V, D] float32 directions."""
    values: jax.Array
    """[B, V] float32: the coefficient (ADD, ADD_NORMED) or the cap (CAP)."""
    modes: jax.Array
    """[B, V] int32: OFF, V_ADD, V_ADD_NORMED, V_REMOVE, V_CAP."""
    lo: jax.Array
    hi: jax.Array


class SiteSteering(NamedTuple):
    features: FeatureSlots | None
    vectors: VectorSlots | None
    dictionary: dl.Params | None
    """The site's dictionary (needed by feature slots)."""


def _in_window(pos_bt, lo_bs, hi_bs, modes_bs):
    """[B, T, S] bool: slot s applies at position t."""
    p = pos_bt[:, :, None]
    return (modes_bs[:, None, :] != OFF) & (p >= lo_bs[:, None, :]) & (p < hi_bs[:, None, :])


def feature_delta(spec: dl.DictionarySpec, params: dl.Params, x_btd, pos_bt, slots: FeatureSlots,
                  encode: str) -> jax.Array:
    """decode(f') - decode(f) [B, T, O] in the written site's raw units, for features read from
    `x_btd` [B, T, D]."""
    b, t, d = x_btd.shape
    x32 = x_btd.astype(jnp.float32)
    if encode == "selected":
        f = dl.encode_selected(spec, params, x32, slots.ids)
    else:
        dense = dl.encode(spec, params, x32.reshape(b * t, d)).reshape(b, t, -1)
        f = jnp.take_along_axis(dense, jnp.broadcast_to(slots.ids[:, None, :], (b, t, slots.ids.shape[1])), axis=-1)
    v, m = slots.values[:, None, :], slots.modes[:, None, :]
    new = jnp.select([m == ADD, m == CLAMP, m == SCALE, m == ABLATE], [f + v, v, f * v, 0.0 * f], f)
    coef = jnp.where(_in_window(pos_bt, slots.lo, slots.hi, slots.modes), new - f, 0.0)
    return dl.decode_selected(spec, params, coef, slots.ids)


def vector_edit(x_btd, pos_bt, slots: VectorSlots) -> jax.Array:
    x = x_btd.astype(jnp.float32)
    active = _in_window(pos_bt, slots.lo, slots.hi, slots.modes)  # [B, T, V]
    for j in range(slots.modes.shape[1]):
        a = slots.vectors[:, j][:, None, :]  # [B, 1, D]
        u = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        c = slots.values[:, j][:, None, None]
        mode = slots.modes[:, j][:, None, None]
        proj = jnp.sum(x * u, axis=-1, keepdims=True)
        xn = jnp.linalg.norm(x, axis=-1, keepdims=True)
        new = jnp.select(
            [mode == V_ADD, mode == V_ADD_NORMED, mode == V_REMOVE, mode == V_CAP],
            [x + c * a, x + c * xn * u, x - proj * u, x - jnp.maximum(proj - c, 0.0) * u],
            x,
        )
        x = jnp.where(active[:, :, j, None], new, x)
    return x


@functools.lru_cache(maxsize=None)
def steer_fn(spec: dl.DictionarySpec | None, encode: str):
    """The edit function of a site (cached per static structure, so plans holding it compare equal
    and never recompile)."""

    def steer(x_btd, st: SiteSteering, pos_bt, read_btd=None):
        out = x_btd.astype(jnp.float32)
        if st.features is not None:
            src = x_btd if read_btd is None else read_btd  # a transcoder's input site
            out = out + feature_delta(spec, st.dictionary, src, pos_bt, st.features, encode)
        if st.vectors is not None:
            out = vector_edit(out, pos_bt, st.vectors)
        return out.astype(x_btd.dtype)

    return steer
