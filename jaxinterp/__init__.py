"""jaxinterp: sparse dictionaries for mechanistic interpretability, in JAX."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `jaxinterp.generate(...)` without importing JAX when only the config or CLI is needed.
    if name in ("generate", "Sampling", "GenerateResult"):
        from jaxinterp import generation

        return getattr(generation, name)
    if name in ("load_dictionary", "Dictionary", "CLTDictionary", "DictionaryError"):
        from jaxinterp.dictionaries import artifact

        return getattr(artifact, name)
    if name == "DictionaryRegistry":
        from jaxinterp.interop.registry import DictionaryRegistry

        return DictionaryRegistry
    raise AttributeError(f"module 'jaxinterp' has no attribute {name!r}")
