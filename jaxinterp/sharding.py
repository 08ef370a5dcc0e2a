"""The one table that maps logical axis names onto the mesh axes (`data`, `model`).

Dictionaries, language models and training all name their array axes logically (`batch`, `d_sae`,
`vocab`, `heads`, `d_ff`, ...); `LOGICAL_RULES` says which mesh axis each is split over (None:
replicated). A dimension that does not divide its mesh axis is replicated instead.
"""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "d_sae": "model",
    "d_model": None,
    "layer": None,
    "vocab": "model",
    "heads": "model",
    "d_ff": "model",
    "positions": None,
}


def logical_spec(axes: tuple[str | None, ...]) -> P:
    return P(*(LOGICAL_RULES.get(a) if a else None for a in axes))


def _fits(mesh: Mesh, shape: tuple[int, ...], spec: P) -> bool:
    for dim, ax in zip(shape, spec):
        if ax is not None and dim % mesh.shape[ax]:
            return False
    return True


def named(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    """Sharding of an array with logical `axes`; replicated where a dimension does not divide."""
    spec = logical_spec(axes)
    if len(spec) != len(shape) or not _fits(mesh, shape, spec):
        spec = P()
    return NamedSharding(mesh, spec)
