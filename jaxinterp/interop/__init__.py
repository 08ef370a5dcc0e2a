"""Interchange with the PyTorch world's dictionary formats."""

from jaxinterp.interop.saelens import export_saelens, folded_weights, hook_name_for_site, load_saelens

__all__ = ["export_saelens", "folded_weights", "hook_name_for_site", "load_saelens"]
