"""The one table that maps logical axis names onto the mesh axes (`data`, `model`).

Dictionaries, language models and training all name their array axes logically (`batch`, `d_sae`,
`vocab`, `heads`, `d_ff`, ...); `LOGICAL_RULES` says which mesh axis each is split over (None:
replicated). A dimension that does not divide its mesh axis is replicated instead, alone, and the
log says so.
"""

from __future__ import annotations

import logging
import math

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("jaxinterp.sharding")

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


def named(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...], *, name: str = "an array") -> NamedSharding:
    """Sharding of an array with logical `axes`: each dimension split over its mesh axis, except
    one that does not divide it, which alone is replicated (logged once per array and mesh)."""
    spec = logical_spec(axes)
    if len(spec) != len(shape):
        raise ValueError(f"{name}: logical axes {axes} do not match its shape {shape}")
    parts = []
    for ax_name, dim, ax in zip(axes, shape, spec):
        if ax is not None and dim % mesh.shape[ax]:
            _log_replicated(name, ax_name, dim, ax, mesh.shape[ax])
            ax = None
        parts.append(ax)
    return NamedSharding(mesh, P(*parts))


_logged: set[tuple] = set()


def _log_replicated(name: str, axis: str, dim: int, mesh_axis: str, size: int) -> None:
    key = (name, axis, dim, mesh_axis, size)
    if key not in _logged:
        _logged.add(key)
        log.warning("%s: its %s axis (%d) does not divide mesh axis %r (%d devices); that axis is replicated, "
                    "the others stay sharded", name, axis, dim, mesh_axis, size)


def declared_spec(mesh: Mesh, axes: tuple[str | None, ...]) -> P:
    """The partition spec `axes` declare on `mesh` (mesh axes of size 1 dropped)."""
    return P(*(ax if ax is not None and mesh.shape[ax] > 1 else None for ax in logical_spec(axes)))


def check_sharded_as_declared(mesh: Mesh, named_axes: dict[str, tuple[str | None, ...]], shardings: dict,
                              shapes: dict[str, tuple[int, ...]], *, min_size: int = 1 << 16) -> None:
    """Raise when a parameter of at least `min_size` elements is not sharded as its logical axes
    declare on `mesh` (a dimension that does not divide its mesh axis is the one allowed exception,
    already logged by `named`)."""
    for name, axes in named_axes.items():
        shape = shapes[name]
        if math.prod(shape) < min_size:
            continue
        want = [ax if ax is not None and mesh.shape[ax] > 1 and dim % mesh.shape[ax] == 0 else None
                for dim, ax in zip(shape, logical_spec(axes))]
        got = [ax if ax is not None and mesh.shape[ax] > 1 else None
               for ax in list(shardings[name].spec) + [None] * (len(shape) - len(shardings[name].spec))]
        if got != want:
            raise ValueError(f"{name} {shape} is sharded as {tuple(got)}, its axes {axes} declare {tuple(want)} on "
                             f"{dict(mesh.shape)}")
