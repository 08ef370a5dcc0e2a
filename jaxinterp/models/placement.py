"""Placing a model's parameters on a device mesh by their logical axes.

Each weight's name (its last part, as in `decoder.param_names`) gives its logical axes; the rules
table in `jaxinterp.sharding` maps those onto the mesh: attention heads, the MLP's hidden units and
the vocabulary are split over `model` (Megatron-style column/row splits), everything else is
replicated. XLA inserts the collectives; the forward is the same function on one device or many.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding

from jaxinterp.models.decoder import Decoder, param_names
from jaxinterp.sharding import named

AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "d_model"),
    "pos_embed": ("positions", "d_model"),
    "lm_head": ("d_model", "vocab"),
    "wq": ("d_model", "heads"), "wk": ("d_model", "heads"), "wv": ("d_model", "heads"),
    "bq": ("heads",), "bk": ("heads",), "bv": ("heads",),
    "wo": ("heads", "d_model"), "bo": ("d_model",),
    "w_gate": ("d_model", "d_ff"), "w_up": ("d_model", "d_ff"), "b_up": ("d_ff",),
    "w_down": ("d_ff", "d_model"), "b_down": ("d_model",),
    "weight": ("d_model",), "bias": ("d_model",),
    "q_norm": (None,), "k_norm": (None,),
}


def param_shardings(model: Decoder, mesh: Mesh) -> dict[str, NamedSharding]:
    """Flat weight name -> its declared sharding on `mesh`."""
    return {name: named(mesh, AXES[name.split(".")[-1]], p[...].shape, name=name) for name, p in param_names(model)}


def place(model: Decoder, mesh: Mesh) -> Decoder:
    """The model with every weight placed on `mesh` with its declared sharding (in place)."""
    shardings = param_shardings(model, mesh)
    for name, p in param_names(model):
        p[...] = jax.device_put(p[...], shardings[name])
    return model


def shardings_of(model: Decoder) -> dict[str, object]:
    """Flat weight name -> the sharding its array has now."""
    return {name: p[...].sharding for name, p in param_names(model)}


__all__ = ["AXES", "param_shardings", "place", "shardings_of"]
