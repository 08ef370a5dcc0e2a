"""Circuits: the replacement model (and, next, attribution graphs over it)."""

from jaxinterp.circuits.replacement import replacement_forward, replacement_params, replacement_plan

__all__ = ["replacement_forward", "replacement_params", "replacement_plan"]
