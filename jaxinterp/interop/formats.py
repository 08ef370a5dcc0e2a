"""Which dictionary format a folder holds, and reading any of them as a `Dictionary`.

`detect(path)` names the format from the files present; `load(path)` reads it. A folder that
matches no format, or matches one but lacks a file, fails with one line naming what was found and
what each format needs (`FORMATS`).
"""

from __future__ import annotations

from pathlib import Path

from jaxinterp.dictionaries.artifact import META, CLTDictionary, Dictionary, DictionaryError
from jaxinterp.errors import JaxinterpError
from jaxinterp.interop import scopes

FORMATS: dict[str, str] = {
    "jaxinterp": f"{META} + weights/ (or a run directory holding dictionary/)",
    "circuit-tracer": "config.yaml (model_kind) + W_enc_*.safetensors / layer_*.safetensors",
    "saelens": "cfg.json + sae_weights.safetensors",
    "sparsify": "cfg.json + sae.safetensors (a folder per hookpoint)",
    "clt-training": "config.json + layers.N.mlp/ folders (cfg.json naming n_targets, sae.safetensors)",
    "gemma-scope": "params.npz",
    "gemma-scope-2": "params.safetensors (+ config.json)",
    "llama-scope": "hyperparams.json + checkpoints/final.safetensors",
}
"""Every format `load` reads and the files that identify it."""


def _expected() -> str:
    return "; ".join(f"{name}: {files}" for name, files in FORMATS.items())


def _found(p: Path) -> str:
    names = sorted(c.name + ("/" if c.is_dir() else "") for c in p.iterdir())
    return ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "") if names else "nothing"


def _hookpoint_folders(p: Path) -> list[str]:
    return sorted(c.name for c in p.iterdir() if c.is_dir() and (c / "cfg.json").is_file()
                  and ((c / "sae.safetensors").is_file() or (c / "sae_weights.safetensors").is_file()))


def _n_targets(cfg_path: Path) -> int:
    import json

    try:
        return int(json.loads(cfg_path.read_text()).get("n_targets") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0


def detect(path: str | Path) -> str:
    """The format name (a key of `FORMATS`) of the folder at `path`; raises `DictionaryError`."""
    p = Path(path)
    if not p.exists():
        from jaxinterp.interop.index import DictionaryIndex

        index = DictionaryIndex()
        try:
            names = ", ".join(index.names()[:8]) or "none yet"
        except JaxinterpError:
            names = "unreadable"
        raise DictionaryError(f"{p} not found; pass a dictionary folder ({_expected()}) or a name of the dictionary "
                              f"index {index.path} (names: {names})")
    if p.is_file():
        raise DictionaryError(f"{p} is a file; pass the folder that holds it ({_expected()})")
    has = lambda *names: all((p / n).exists() for n in names)  # noqa: E731
    if has(META) or (p / "dictionary" / META).is_file() or has("checkpoints", "config.yaml"):
        return "jaxinterp"
    if has("config.yaml"):
        return "circuit-tracer"
    if has("cfg.json"):
        if has("sae_weights.safetensors"):
            return "saelens"
        if has("sae.safetensors"):
            if _n_targets(p / "cfg.json"):
                raise DictionaryError(f"{p} is one source layer of a clt-training cross-layer transcoder (cfg.json "
                                      f"names n_targets); pass the run folder that holds every layer ({p.parent})")
            return "sparsify"
        raise DictionaryError(f"{p} has cfg.json but neither sae_weights.safetensors (SAELens) nor sae.safetensors "
                              f"(sparsify); found {_found(p)}")
    if has("sae_weights.safetensors") or has("sae.safetensors"):
        raise DictionaryError(f"{p} has dictionary weights but no cfg.json (SAELens and sparsify keep the shape and "
                              f"kind there); found {_found(p)}")
    if has("hyperparams.json"):
        if has("checkpoints/final.safetensors"):
            return "llama-scope"
        raise DictionaryError(f"{p} has hyperparams.json but no checkpoints/final.safetensors (Llama Scope); "
                              f"found {_found(p)}")
    if has("params.safetensors"):
        return "gemma-scope-2"
    if has("params.npz"):
        return "gemma-scope"
    from jaxinterp.interop.clt_training import layer_folders

    if layer_folders(p):
        return "clt-training"
    folders = _hookpoint_folders(p)
    if folders:
        raise DictionaryError(f"{p} holds one dictionary per hookpoint ({', '.join(folders[:8])}"
                              f"{' ...' if len(folders) > 8 else ''}); pass one of those folders")
    raise DictionaryError(f"{p} matches no dictionary format (found {_found(p)}); expected {_expected()}")


def load(path: str | Path) -> Dictionary | CLTDictionary:
    """The dictionary at `path` in any format of `FORMATS` (see `jaxinterp.load_dictionary`)."""
    import dataclasses

    from jaxinterp.interop.index import resolve

    try:
        folder, entry = resolve(path)
    except JaxinterpError as e:
        raise DictionaryError(str(e)) from None
    p = folder.absolute()
    fmt = detect(p)
    try:
        d = _READERS[fmt](p)
    except DictionaryError:
        raise
    except JaxinterpError as e:  # the readers' one-line errors, as the dictionary error callers catch
        raise DictionaryError(str(e)) from None
    if entry is not None and isinstance(d, Dictionary):  # the index fills in what the folder does not say
        d = dataclasses.replace(d, site=entry.get("site") or d.site, model=entry.get("model") or d.model)
    return d


def _saelens(p: Path) -> Dictionary:
    from jaxinterp.interop import hooks
    from jaxinterp.interop.saelens import load_saelens

    spec, params, cfg = load_saelens(p)
    meta = cfg.get("metadata") or {}
    sites = []
    for hook in (meta.get("hook_name"), meta.get("hook_name_out") if spec.arch.reads_target else None):
        try:
            sites.append(hooks.site_for_hook(hook) if hook else None)
        except hooks.HookNameError:
            sites.append(None)
    return Dictionary(spec=spec, params=params, site=sites[0], target_site=sites[1], model=meta.get("model_name"),
                      metadata={"format": "saelens", "architecture": cfg.get("architecture"),
                                "hook_name": meta.get("hook_name"), "source": str(p)})


def _sparsify(p: Path) -> Dictionary:
    from jaxinterp.interop.sparsify import hook_sites, load_sparsify

    spec, params, cfg = load_sparsify(p)
    read, written = hook_sites(p.name, transcode=bool(cfg.get("transcode")))
    return Dictionary(spec=spec, params=params, site=read, target_site=written if spec.arch.reads_target else None,
                      metadata={"format": "sparsify", "hookpoint": p.name, "source": str(p)})


def _scope(reader):
    def read(p: Path) -> Dictionary:
        spec, params, info = reader(p)
        return Dictionary(spec=spec, params=params, site=info.get("site"),
                          target_site=info.get("target_site") if spec.arch.reads_target else None,
                          model=info.get("model"), metadata={k: v for k, v in info.items()
                                                             if k not in ("site", "target_site", "model")}
                          | {"source": str(p)})
    return read


def _clt_training(p: Path) -> CLTDictionary:
    from jaxinterp.interop import clt_training

    spec, params, run = clt_training.load(p)
    return CLTDictionary(spec=spec, params=params, model=run.get("model"),
                         metadata={"format": "clt-training", "source": str(p)})


def _jaxinterp(p: Path):
    from jaxinterp.dictionaries.artifact import load_jaxinterp

    return load_jaxinterp(p)


def _circuit_tracer(p: Path) -> CLTDictionary:
    from jaxinterp.dictionaries.artifact import _load_circuit_tracer

    return _load_circuit_tracer(p)


_READERS = {"jaxinterp": _jaxinterp, "circuit-tracer": _circuit_tracer, "saelens": _saelens, "sparsify": _sparsify,
            "clt-training": _clt_training, "gemma-scope": _scope(scopes.load_gemma_scope_1),
            "gemma-scope-2": _scope(scopes.load_gemma_scope_2), "llama-scope": _scope(scopes.load_llama_scope)}
