"""Circuits: the replacement model (and, next, attribution graphs over it)."""

from jaxinterp.circuits.fidelity import replacement_fidelity
from jaxinterp.circuits.replacement import (replacement_forward, replacement_intercepts, replacement_params,
                                             replacement_plan)

__all__ = ["replacement_fidelity", "replacement_forward", "replacement_intercepts", "replacement_params", "replacement_plan"]
