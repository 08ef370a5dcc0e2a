"""Converting a dictionary between formats: `convert(sources, out, to=...)` (`launch/convert.py`).

Any folder `load_dictionary` reads (or a run's training checkpoint) is written as a jaxinterp
directory, a SAELens folder, a sparsify hookpoint folder, or circuit-tracer's CLT / transcoder set,
and read back from what was written to check that it computes the same outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxinterp.dictionaries.artifact import CLTDictionary, Dictionary, DictionaryError, load_dictionary, save
from jaxinterp.interop import hooks

TARGETS = ("jaxinterp", "saelens", "sparsify", "circuit-tracer")


def read_source(path: str | Path, *, step: int | None = None) -> Dictionary | CLTDictionary:
    """The dictionary at `path`; a run directory's training checkpoint (its latest, or `step`) when
    the run has no finished dictionary or a step is asked for."""
    p = Path(path)
    if (p / "checkpoints").is_dir() and (p / "config.yaml").is_file() and (step is not None or not (p / "dictionary").is_dir()):
        from jaxinterp.train.loop import checkpoint_artifact

        return checkpoint_artifact(p, step)
    if step is not None:
        raise DictionaryError(f"--step {step}: {p} is not a run directory with checkpoints/")
    return load_dictionary(p)


def write(d: Dictionary | CLTDictionary | list, out: str | Path, to: str) -> Path:
    """Write `d` (a list: circuit-tracer's per-layer transcoder set) in format `to`; returns the
    folder that holds it (sparsify: `out/<hookpoint>`)."""
    from jaxinterp.interop import circuit_tracer as ct
    from jaxinterp.interop.saelens import export_saelens
    from jaxinterp.interop.sparsify import export_sparsify

    if to not in TARGETS:
        raise DictionaryError(f"--to {to!r}: choose one of {list(TARGETS)}")
    if isinstance(d, list):
        if to != "circuit-tracer":
            raise DictionaryError(f"several sources make a circuit-tracer transcoder set; --to {to} takes one")
        return ct.export_transcoder_set(out, d, model_name=d[0].model or "")
    if to == "jaxinterp":
        return save(out, d)
    if isinstance(d, CLTDictionary):
        if to != "circuit-tracer":
            raise DictionaryError(f"a cross-layer transcoder has no {to} format; convert it --to circuit-tracer or "
                                  "--to jaxinterp")
        return ct.export_clt(out, d.spec, d.params, model_name=d.model or "")
    if to == "circuit-tracer":  # a set of one: a one-layer model's (the set's own check names the rule)
        return ct.export_transcoder_set(out, [d], model_name=d.model or "")
    if to == "saelens":
        return export_saelens(out, d.spec, d.params, hook_name=hooks.hook_for_site(d.site),
                              hook_name_out=hooks.hook_for_site(d.target_site) if d.target_site else None,
                              model_name=d.model or "unknown")
    if d.spec.row_norm != "none":
        raise DictionaryError(f"sparsify has no per-row normalisation ({d.spec.row_norm}); convert --to saelens")
    site = d.target_site or d.site
    return export_sparsify(out, d.spec, d.params, hookpoint=hooks.sparsify_hookpoint(site) if site else "unknown")


def max_difference(a: Dictionary | CLTDictionary, b: Dictionary | CLTDictionary, *, rows: int = 64, seed: int = 0) -> float:
    """The largest difference between the two dictionaries' reconstructions of the same random rows,
    relative to the largest output."""
    rng = np.random.default_rng(seed)
    if isinstance(a, CLTDictionary):
        x = rng.normal(size=(rows, a.spec.n_layers, a.spec.d_model)).astype(np.float32)
    else:
        x = rng.normal(size=(rows, a.d_in)).astype(np.float32) * 2.0
    ya, yb = np.asarray(a.reconstruct(x), np.float64), np.asarray(b.reconstruct(x), np.float64)
    return float(np.abs(ya - yb).max() / max(np.abs(ya).max(), 1e-12))
