"""The device mesh, and the logical axes of a dictionary's parameters.

Parameters carry logical axes (`PARAM_AXES`, declared by the dictionary kinds); `jaxinterp.sharding.LOGICAL_RULES` maps each logical
axis to a mesh axis (`data`, `model`) or to None (replicated). Optimizer state and any pytree that mirrors the
parameters get the same shardings by matching the parameter name in their tree path.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinterp import dictionaries as dl
from jaxinterp.config import ConfigError, MeshConfig
from jaxinterp.sharding import LOGICAL_RULES, named

PARAM_AXES: dict[str, tuple[str, ...]] = dl.PARAM_AXES | {"tokens_since_fired": ("d_sae",)}
"""Logical axes of the parameters (declared by the dictionary kinds) and of the train state's
per-feature counters."""


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (`data`, `model`) mesh over `devices` (default: all), -1 taking the rest."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    data, model = cfg.data, cfg.model
    if data == -1:
        data = n // model
    if model == -1:
        model = n // data
    if data < 1 or model < 1 or data * model > n:
        raise ConfigError(
            f"mesh: data={cfg.data} x model={cfg.model} does not fit the {n} devices present; "
            "set mesh.data: -1 to use them all"
        )
    grid = np.array(devices[: data * model]).reshape(data, model)
    return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def _param_name(path, axes: dict[str, tuple] = PARAM_AXES) -> str | None:
    for entry in reversed(path):
        key = getattr(entry, "key", None)
        if isinstance(key, str) and key in axes:
            return key
        name = getattr(entry, "name", None)
        if isinstance(name, str) and name in axes:
            return name
    return None


def tree_shardings(mesh: Mesh, tree, axes: dict[str, tuple] = PARAM_AXES):
    """Shardings for every leaf of a pytree of arrays (or ShapeDtypeStructs) by parameter name,
    the names' logical axes read from `axes` (default: the SAE kinds' table)."""

    def leaf(path, x):
        name = _param_name(path, axes)
        shape = tuple(getattr(x, "shape", ()))
        if name is None or len(axes[name]) != len(shape):
            return NamedSharding(mesh, P())
        return named(mesh, axes[name], shape, name=name)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    return named(mesh, ("batch", "d_model"), (batch_size, 1), name="the batch")


def describe(mesh: Mesh) -> str:
    return f"mesh data={mesh.shape['data']} x model={mesh.shape['model']} on {mesh.devices.flat[0].platform}"


def n_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape.values())
