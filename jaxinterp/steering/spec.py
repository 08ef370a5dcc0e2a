"""Friendly steering specs, the dictionary registry, and their compilation to arrays.

`SteeringVector` is what a user writes; `compile_steering` turns a batch's specs (the same for every
row, or one list per row) into the plan edits and the `SiteSteering` arrays the jitted forward and
generation loop take. Everything is checked here, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxinterp import dictionaries as dl
from jaxinterp.errors import JaxinterpError
from jaxinterp.models.intercept import parse_site
from jaxinterp.steering.edits import (FEATURE_MODES, NO_END, SLOT_QUANTUM, VECTOR_MODES, FeatureSlots,
                                      SiteSteering, VectorSlots, steer_fn)


class SteeringError(JaxinterpError):
    """A steering spec that cannot apply; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class SteeringVector:
    """One intervention at one site.

    Feature steering (through the dictionary attached to `site`): `features={id: value}` with
    `mode` add (value = amount), clamp (value = activation), scale (value = factor) or ablate.
    Raw-vector steering: `vector` [D] with `mode` add (x + scale * v), add_normed (x + scale *
    ||x|| * v / ||v||), remove (project v out) or cap (projection onto v capped at `scale`).
    """

    site: str
    features: Mapping[int, float] | None = None
    mode: str = "add"
    vector: Any = None
    scale: float = 1.0
    positions: str | tuple[int, int] = "all"
    """all, prompt, generated, or an absolute [lo, hi) window of token positions."""
    units: str = "raw"
    """Feature values in raw activation units, or `max_activation`: multiples of the feature's
    typical maximum activation (the registry's `max_acts`)."""

    def __post_init__(self):
        if (self.features is None) == (self.vector is None):
            raise SteeringError(f"SteeringVector at {self.site!r}: give exactly one of features= or vector=")
        modes = FEATURE_MODES if self.features is not None else VECTOR_MODES
        if self.mode not in modes:
            kind = "feature" if self.features is not None else "vector"
            raise SteeringError(f"{kind} steering mode {self.mode!r} unknown; choose one of {sorted(modes)}")
        if self.units not in ("raw", "max_activation"):
            raise SteeringError(f"units {self.units!r} unknown; choose raw or max_activation")
        if isinstance(self.positions, str) and self.positions not in ("all", "prompt", "generated"):
            raise SteeringError(f"positions {self.positions!r} unknown; use all, prompt, generated or (lo, hi)")


@dataclasses.dataclass
class Entry:
    spec: dl.DictionarySpec
    params: dl.Params
    max_acts: np.ndarray | None = None
    """[F] typical maximum activation per feature (for `units="max_activation"`)."""
    target_site: str | None = None
    """A transcoder's target site: feature edits read the entry's site and write this one."""


class DictionaryRegistry:
    """Dictionaries attached to intercept sites (several sites, several kinds)."""

    def __init__(self):
        self.entries: dict[str, Entry] = {}

    def add(self, site: str, spec: dl.DictionarySpec | None = None, params: dl.Params | None = None, *, max_acts=None,
            target_site: str | None = None) -> DictionaryRegistry:
        """Attach a dictionary that reads `site` (a transcoder: and writes `target_site`). With one
        argument, a dictionary folder or a name of the local dictionary index
        (`jaxinterp.interop.index`), attached at its own site: `add("gemma-scope-2b-res-20-16k")`."""
        if spec is None or params is None:
            if spec is not None or params is not None:
                raise SteeringError("pass site, spec and params, or one dictionary path or index name")
            return self.add_run(site)
        if spec.arch.reads_target and target_site is None:
            raise SteeringError(f"the {spec.architecture} at {site!r} needs the site it writes: pass target_site")
        self.entries[site] = Entry(spec, dict(params), None if max_acts is None else np.asarray(max_acts, np.float32),
                                   target_site=target_site if spec.arch.reads_target else None)
        return self

    def add_dictionary(self, dictionary: dl.Dictionary, site: str | None = None, *, max_acts=None
                       ) -> DictionaryRegistry:
        """Attach a dictionary artifact at its own site, or at `site`."""
        site = site or dictionary.site
        if site is None:
            raise SteeringError("the dictionary names no site; attach it with an explicit site")
        return self.add(site, dictionary.spec, dictionary.params, max_acts=max_acts, target_site=dictionary.target_site)

    def add_run(self, path: str | Path, site: str | None = None) -> DictionaryRegistry:
        """Attach the dictionary at `path` (any folder `load_dictionary` reads, or a name of the
        dictionary index) at its own site or at `site`."""
        return self.add_dictionary(dl.load_site_dictionary(path, use="steering specs"), site)

    def get(self, site: str) -> Entry:
        if site not in self.entries:
            have = ", ".join(self.entries) or "none"
            raise SteeringError(f"no dictionary attached at {site!r} (attached: {have}); add one with "
                                f"DictionaryRegistry.add / add_run, or --dictionary on the command line")
        return self.entries[site]

    def check(self, model_cfg) -> None:
        for site, e in self.entries.items():
            dl.Dictionary(e.spec, e.params, site=site, target_site=e.target_site).check_model(
                model_cfg.d_model, model_cfg.n_layers)


def feature_max_acts(model, spec: dl.DictionarySpec, params: dl.Params, site: str, contexts_nt: np.ndarray,
                     *, batch: int = 16) -> np.ndarray:
    """[F] each feature's largest activation at `site` over the contexts (BOS excluded): the unit of
    `SteeringVector(units="max_activation")`. Features that never fire get 1."""
    import jax.numpy as jnp

    from jaxinterp.models.decoder import forward
    from jaxinterp.models.intercept import Plan

    parse_site(site, model.cfg.n_layers)
    best = np.zeros(spec.d_sae, np.float32)
    for s in range(0, len(contexts_nt), batch):
        res = forward(model, jnp.asarray(contexts_nt[s : s + batch]), plan=Plan(capture=(site,), stop_early=True))
        x = res.captured[site][:, 1:]
        f = dl.encode(spec, params, x.reshape(-1, x.shape[-1]))
        best = np.maximum(best, np.asarray(f.max(axis=0)))
    return np.where(best > 0, best, 1.0).astype(np.float32)


def _window(positions, prompt_len: int) -> tuple[int, int]:
    if positions == "all":
        return 0, NO_END
    if positions == "prompt":
        return 0, prompt_len
    if positions == "generated":
        return prompt_len, NO_END
    lo, hi = positions
    return int(lo), int(hi)


def _pad(n: int) -> int:
    return max(SLOT_QUANTUM, -(-n // SLOT_QUANTUM) * SLOT_QUANTUM)


def rows_of(steering, batch: int) -> list[list[SteeringVector]]:
    """Per-row spec lists from None, one SteeringVector, a list for every row, or a list per row."""
    if steering is None:
        return [[] for _ in range(batch)]
    if isinstance(steering, SteeringVector):
        steering = [steering]
    steering = list(steering)
    if all(isinstance(s, SteeringVector) for s in steering):
        return [steering for _ in range(batch)]
    if len(steering) != batch:
        raise SteeringError(f"per-row steering has {len(steering)} rows for a batch of {batch}")
    return [[s] if isinstance(s, SteeringVector) else list(s or []) for s in steering]


def compile_steering(steering, registry: DictionaryRegistry | None, model_cfg, prompt_lens: Sequence[int],
                     *, encode: str = "full") -> tuple[tuple, dict[str, SiteSteering]]:
    """(plan edits, edit params) for a batch whose rows have `prompt_lens` real prompt tokens."""
    if encode not in ("full", "selected"):
        raise SteeringError(f"encode {encode!r} unknown; choose full or selected")
    batch = len(prompt_lens)
    rows = rows_of(steering, batch)
    registry = registry or DictionaryRegistry()
    sites = list(dict.fromkeys(s.site for row in rows for s in row))
    edits, params = [], {}
    for site in sites:
        parse_site(site, model_cfg.n_layers)
        feats = [[(f, v, s) for s in row if s.site == site and s.features is not None for f, v in s.features.items()]
                 for row in rows]
        vecs = [[s for s in row if s.site == site and s.vector is not None] for row in rows]
        entry = None
        if any(feats):
            entry = registry.get(site)
            registry.check(model_cfg)
        fs = _feature_slots(feats, entry, prompt_lens) if any(feats) else None
        vs = _vector_slots(vecs, model_cfg.d_model, prompt_lens) if any(vecs) else None
        dparams = None if entry is None else {k: np.asarray(v) for k, v in entry.params.items()}
        if entry is not None and entry.target_site is not None:  # a transcoder: read here, write there
            if entry.target_site in sites:
                raise SteeringError(f"the transcoder at {site!r} writes {entry.target_site!r}, which is also steered "
                                    "directly; steer one of them")
            params[entry.target_site] = SiteSteering(features=fs, vectors=None, dictionary=dparams)
            edits.append((entry.target_site, steer_fn(entry.spec, encode), site))
            fs = dparams = None
            if vs is None:
                continue
        params[site] = SiteSteering(features=fs, vectors=vs, dictionary=dparams)
        edits.append((site, steer_fn(None if fs is None else entry.spec, encode)))
    return tuple(edits), params


def _feature_slots(feats, entry: Entry, prompt_lens) -> FeatureSlots:
    n = _pad(max(len(r) for r in feats))
    b = len(feats)
    ids, vals, modes = np.zeros((b, n), np.int32), np.zeros((b, n), np.float32), np.zeros((b, n), np.int32)
    lo, hi = np.zeros((b, n), np.int32), np.zeros((b, n), np.int32)
    d_sae = entry.spec.d_sae
    for i, row in enumerate(feats):
        for j, (f, v, s) in enumerate(row):
            if not 0 <= int(f) < d_sae:
                raise SteeringError(f"feature id {f} at {s.site!r} is out of range; the dictionary has d_sae={d_sae}")
            if s.units == "max_activation":
                if entry.max_acts is None:
                    raise SteeringError(f"units='max_activation' at {s.site!r} needs the registry's max_acts for "
                                        "that dictionary; pass max_acts= to DictionaryRegistry.add")
                v = float(v) * float(entry.max_acts[int(f)])
            ids[i, j], vals[i, j], modes[i, j] = int(f), float(v), FEATURE_MODES[s.mode]
            lo[i, j], hi[i, j] = _window(s.positions, prompt_lens[i])
    return FeatureSlots(ids, vals, modes, lo, hi)


def _vector_slots(vecs, d_model: int, prompt_lens) -> VectorSlots:
    n = _pad(max(len(r) for r in vecs))
    b = len(vecs)
    vectors = np.zeros((b, n, d_model), np.float32)
    vals, modes = np.zeros((b, n), np.float32), np.zeros((b, n), np.int32)
    lo, hi = np.zeros((b, n), np.int32), np.zeros((b, n), np.int32)
    for i, row in enumerate(vecs):
        for j, s in enumerate(row):
            v = np.asarray(s.vector, np.float32)
            if v.shape != (d_model,):
                raise SteeringError(f"steering vector at {s.site!r} has shape {v.shape}; the model's width is "
                                    f"{d_model}, so it must be [{d_model}]")
            vectors[i, j], vals[i, j], modes[i, j] = v, float(s.scale), VECTOR_MODES[s.mode]
            lo[i, j], hi[i, j] = _window(s.positions, prompt_lens[i])
    return VectorSlots(vectors, vals, modes, lo, hi)


def load_vector(path: str | Path, what: str) -> np.ndarray:
    """A steering vector [D] from a .npy file; anything else is one `SteeringError` line naming the
    file (`what` says where it was given)."""
    p = Path(path)
    fix = "save a 1-D float array with numpy.save(path, vector)"
    if not p.is_file():
        raise SteeringError(f"{what}: vector file {str(p)!r} not found; {fix}")
    try:
        vec = np.load(p, allow_pickle=False)
    except Exception as e:  # empty, truncated, pickled or not-.npy files each raise their own type
        reason = "it is empty" if p.stat().st_size == 0 else f"not a .npy file: {str(e).splitlines()[0]}"
        raise SteeringError(f"{what}: cannot read the vector file {str(p)!r} ({reason}); {fix}") from None
    if not isinstance(vec, np.ndarray):
        vec.close()
        raise SteeringError(f"{what}: {str(p)!r} is a .npz archive, not one array; {fix}")
    if vec.dtype.kind not in "fiu" or vec.size == 0:
        raise SteeringError(f"{what}: {str(p)!r} holds a {vec.dtype} array of shape {vec.shape}; {fix}")
    if vec.ndim != 1:
        if vec.ndim == 2 and 1 in vec.shape:
            return vec.reshape(-1).astype(np.float32)
        raise SteeringError(f"{what}: {str(p)!r} has shape {vec.shape}; {fix}")
    return vec.astype(np.float32)


def load_spec_file(path: str | Path) -> list[SteeringVector]:
    """Steering specs from JSON: a list of objects with the fields of `SteeringVector` (`vector` may
    be a list of numbers or the path of a .npy file)."""
    p = Path(path)
    try:
        items = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SteeringError(f"steering spec file {str(p)!r} unreadable ({e}); it must hold a JSON list") from None
    out = []
    for it in items if isinstance(items, list) else [items]:
        it = dict(it)
        if isinstance(it.get("vector"), str):
            it["vector"] = load_vector(it["vector"], f"steering spec file {str(p)!r}")
        if it.get("features") is not None:
            it["features"] = {int(k): float(v) for k, v in it["features"].items()}
        if isinstance(it.get("positions"), list):
            it["positions"] = tuple(it["positions"])
        try:
            out.append(SteeringVector(**it))
        except TypeError as e:
            raise SteeringError(f"steering spec file {str(p)!r}: {e}") from None
    return out


def parse_steer(arg: str) -> SteeringVector:
    """A command-line spec: `SITE:feature=ID:add=V` (or clamp=V, scale=V, ablate),
    `SITE:vector=FILE.npy[:scale=V][:mode=add|add_normed|remove|cap]`, each optionally with
    `:positions=all|prompt|generated|LO-HI` and `:units=raw|max_activation`."""
    site, *parts = arg.split(":")
    kv: dict[str, str] = {}
    for part in parts:
        key, _, val = part.partition("=")
        kv[key.strip()] = val.strip()
    usage = (f"--steer {arg!r}: expected SITE:feature=ID:add=V (or clamp=V, scale=V, ablate) or "
             "SITE:vector=FILE.npy:scale=V")
    extra = {}
    if "positions" in kv:
        pos = kv.pop("positions")
        if "-" in pos:
            lo, _, hi = pos.partition("-")
            extra["positions"] = (int(lo), int(hi))
        else:
            extra["positions"] = pos
    if "units" in kv:
        extra["units"] = kv.pop("units")
    try:
        if "feature" in kv:
            ids = [int(f) for f in kv.pop("feature").split(",")]
            modes = [m for m in ("add", "clamp", "scale", "ablate") if m in kv]
            if len(modes) != 1 or kv.keys() - set(modes):
                raise SteeringError(usage)
            value = 0.0 if modes[0] == "ablate" else float(kv[modes[0]])
            return SteeringVector(site, features={f: value for f in ids}, mode=modes[0], **extra)
        if "vector" in kv:
            vec = load_vector(kv.pop("vector"), f"--steer {arg!r}")
            mode, scale = kv.pop("mode", "add"), float(kv.pop("scale", 1.0))
            if kv:
                raise SteeringError(usage)
            return SteeringVector(site, vector=vec, mode=mode, scale=scale, **extra)
    except ValueError as e:
        if isinstance(e, SteeringError):
            raise
        raise SteeringError(f"{usage} ({e})") from None
    raise SteeringError(usage)
