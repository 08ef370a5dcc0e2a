"""jaxinterp: sparse dictionaries for mechanistic interpretability, in JAX."""

__version__ = "0.1.0"
