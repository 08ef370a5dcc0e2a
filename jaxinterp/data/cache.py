"""An on-disk activation cache: a model's activations at a site, computed once, read by many runs.

Axes: `N` contexts, `T` context length, `D` d_model, `R` rows of a chunk (its contexts x (T - 1)).

A cache directory holds

    manifest.json      the settings it was harvested with and the list of completed chunks
    chunk_000000.npy   activations [R, D] (float32, float16 or bfloat16): the non-BOS positions of
    chunk_000001.npy   `chunk_contexts` train contexts, rows shuffled within the chunk
    ...

Chunk i holds the contexts `visit_order(N, seed, 0)[i*C : (i+1)*C]` with its rows in the order of
`chunk_rows`, so it equals chunk i of a `ModelSource` with the same settings. A transcoder's cache
(`target_site` in the manifest) holds both sites side by side, [R, 2 D], harvested in one forward. `harvest` writes each
chunk under a temporary name and renames it, then rewrites the manifest the same way: a chunk
counts once the manifest lists it, and a re-run carries on after the last one. `CacheSource` reads
rows shuffled across all chunks, a new order each epoch, ahead of the step (`batches.py`).

A harvest on P processes (`jaxinterp.distributed`) of L forward devices each (every local
accelerator) runs in rounds of P L chunks: process p computes the round's chunks p L ... p L + L - 1,
one on each of its devices at once, and writes their files; after each round process 0 lists the
round's chunks in the manifest. The files are those a one-process, one-device harvest writes, chunk
for chunk, and a job that crashes resumes after the last listed round (on any number of processes).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import ml_dtypes
import numpy as np
from tqdm import tqdm

from jaxinterp import distributed
from jaxinterp.config import Config, DataConfig
from jaxinterp.data.activations import (chunk_order, clt_sites, eval_activation_batches, forward_devices,
                                        model_copies, open_site_model, site_activations_many, source_sites,
                                        visit_order)
from jaxinterp.data.batches import IndexedSource, batch_rows
from jaxinterp.data.corpus import corpus_documents, held_out_contexts, split_documents, token_contexts
from jaxinterp.data.npy import DataError, memmap_npy

FORMAT = 1
"""Version of the manifest layout; a cache of another version is refused."""
MANIFEST = "manifest.json"
CACHE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
SETTINGS = ("format", "model", "site", "target_site", "sites", "corpus", "context_length", "eval_fraction", "seed", "chunk_contexts",
            "dtype", "train_contexts", "contexts_digest", "contexts_planned", "d_model")
"""Manifest keys that a resumed harvest must agree with."""


def chunk_name(i: int) -> str:
    return f"chunk_{i:06d}.npy"


def plan_chunks(n_contexts: int, n_planned: int, chunk_contexts: int, seed: int) -> list[np.ndarray]:
    """Sorted context indices of each chunk: the first `n_planned` of epoch 0's visit order, cut in chunks."""
    order = visit_order(n_contexts, seed, 0)[:n_planned]
    return [np.sort(order[s : s + chunk_contexts]) for s in range(0, n_planned, chunk_contexts)]


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through a temporary file and a rename, so readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_text(manifest: dict) -> str:
    """JSON with one setting per line and one line per chunk."""
    settings = json.dumps({k: v for k, v in manifest.items() if k != "chunks"}, indent=1)
    chunks = ",\n".join("  " + json.dumps(c) for c in manifest["chunks"])
    return settings[: -len("\n}")] + ',\n "chunks": [\n' + chunks + "\n ]\n}\n"


def write_manifest(directory: Path, manifest: dict) -> None:
    _write_atomic(directory / MANIFEST, lambda f: f.write(manifest_text(manifest).encode()))


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a cache directory, checked for the keys the readers need."""
    path = Path(directory) / MANIFEST
    harvest_hint = "write one with python launch/harvest.py --config CONFIG --out " + str(directory)
    if not path.is_file():
        what = "not found" if not Path(directory).exists() else f"holds no {MANIFEST}"
        raise DataError(f"activation cache {str(directory)!r} {what}; {harvest_hint}")
    try:
        manifest = json.loads(path.read_text())
        manifest.setdefault("target_site", None)  # caches of one site written before transcoders
        if "site" in manifest:  # caches written before CLTs name their sites only as site and target_site
            manifest.setdefault("sites", [s for s in (manifest["site"], manifest["target_site"]) if s is not None])
        missing = [k for k in (*SETTINGS, "chunks") if k not in manifest]
        chunks = manifest["chunks"] if not missing else []
        bad = missing or [c for c in chunks if not {"file", "n_rows", "contexts"} <= set(c)]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        bad = [str(e).splitlines()[0]]
    if bad:
        raise DataError(f"{path} is not a readable cache manifest (bad or missing: {bad[0]}); "
                        f"re-harvest with python launch/harvest.py ... --out {directory} --force")
    if manifest["format"] != FORMAT:
        raise DataError(f"{path} has format {manifest['format']!r}, this jaxinterp reads {FORMAT}; "
                        f"re-harvest with python launch/harvest.py ... --out {directory} --force")
    return manifest


def _digest(contexts_nt: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(contexts_nt, np.int32).tobytes()).hexdigest()[:16]


def _clear(directory: Path) -> None:
    """Remove what a harvest writes (chunks, manifest, temporaries) and nothing else."""
    for p in [*directory.glob("chunk_*.npy"), *directory.glob("chunk_*.npy.tmp"), *directory.glob(MANIFEST + "*")]:
        p.unlink()


def _resume_manifest(out: Path, settings: dict, plan: list[np.ndarray], force: bool, clean: bool = True) -> dict:
    """The manifest to continue from: the existing one if it was made with `settings`, else a new one
    (`clean`: remove the temporaries a crashed harvest left)."""
    if force:
        _clear(out)
    if not (out / MANIFEST).exists():
        return {**settings, "chunks": []}
    manifest = read_manifest(out)
    for key in SETTINGS:
        if manifest[key] != settings[key]:
            raise DataError(f"{out / MANIFEST} was harvested with {key}={manifest[key]!r}, this run has "
                            f"{key}={settings[key]!r}; pass --force to start over, or choose another --out")
    for i, c in enumerate(manifest["chunks"]):
        if i >= len(plan) or c["file"] != chunk_name(i) or c["contexts"] != plan[i].tolist():
            raise DataError(f"{out / MANIFEST}: chunk {i} does not match the harvest plan; pass --force to start over")
        if not (out / c["file"]).is_file():
            raise DataError(f"{out / c['file']} is listed in the manifest but missing; pass --force to start over")
    for tmp in [*out.glob("chunk_*.npy.tmp"), *out.glob(MANIFEST + ".tmp")] if clean else []:
        tmp.unlink()
    return manifest


def harvest(cfg: Config, out: str | Path, *, contexts: int | None = None, dtype: str = "float32",
            force: bool = False, progress: bool = True, model=None, tokenizer=None, devices: list | None = None) -> dict:
    """Write (or finish writing) the cache of `cfg.data`'s train contexts to `out`; returns its manifest.
    The forwards run on `devices` (default: `forward_devices`, every local accelerator), one chunk each
    at a time."""
    data, seed, out = cfg.data, cfg.train.seed, Path(out)
    from jaxinterp.dictionaries import clt as clt_kind

    clt = clt_kind.configured(cfg.dictionary)
    if data.site is None and not clt:
        raise DataError("data.site: required to harvest activations, for example blocks.15.resid_post")
    if dtype not in CACHE_DTYPES:
        raise DataError(f"--dtype {dtype!r}: allowed: {', '.join(CACHE_DTYPES)}")
    model, tokenizer = open_site_model(data.model, (), model=model, tokenizer=tokenizer)
    sites = source_sites(cfg, model.cfg.n_layers)
    open_site_model(data.model, sites, model=model, tokenizer=tokenizer)
    train_docs, _ = split_documents(corpus_documents(data.corpus), data.eval_fraction)
    train_nt = token_contexts(train_docs, tokenizer, data.context_length)
    n_planned = len(train_nt) if contexts is None else contexts
    if not 1 <= n_planned <= len(train_nt):
        raise DataError(f"--contexts {contexts}: the corpus has {len(train_nt)} train contexts of "
                        f"{data.context_length} tokens; pass a number from 1 to {len(train_nt)}")
    settings = {
        "format": FORMAT, "model": data.model, "site": sites[0] if not clt else None,
        "target_site": data.target_site, "sites": list(sites), "corpus": data.corpus,
        "context_length": data.context_length, "eval_fraction": data.eval_fraction, "seed": seed,
        "chunk_contexts": data.chunk_contexts, "dtype": dtype, "train_contexts": len(train_nt),
        "contexts_digest": _digest(train_nt), "contexts_planned": n_planned, "d_model": int(model.cfg.d_model),
    }
    plan = plan_chunks(len(train_nt), n_planned, data.chunk_contexts, seed)
    me, n_proc = distributed.process_index(), distributed.process_count()
    if me == 0:  # the first process prepares the directory, the others read what it made
        out.mkdir(parents=True, exist_ok=True)
        manifest = _resume_manifest(out, settings, plan, force)
        if not manifest["chunks"]:
            write_manifest(out, manifest)
    distributed.barrier("jaxinterp harvest plan")
    if me != 0:
        manifest = _resume_manifest(out, settings, plan, force=False, clean=False)
    done = manifest["chunks"]
    bar = tqdm(total=n_planned, initial=sum(len(c["contexts"]) for c in done), unit="ctx",
               disable=not progress or me != 0, dynamic_ncols=True)
    # Rounds of L chunks per process (L its forward devices): process p computes chunks
    # start + p L ... start + p L + L - 1 of each round, one on each device at once; after each round
    # the first process lists the round's chunks in the manifest, in order.
    copies = model_copies(model, forward_devices(devices))
    per = len(copies)
    for start in range(len(done), len(plan), n_proc * per):
        mine = [i for i in range(start + me * per, start + (me + 1) * per) if i < len(plan)]
        n_rows = []
        for i, rows in zip(mine, site_activations_many(copies, [train_nt[plan[i]] for i in mine], sites)):
            rows = rows[chunk_order(seed, 0, i, len(rows))].astype(CACHE_DTYPES[dtype], copy=False)
            if dtype != "float32" and not np.isfinite(rows).all():
                raise DataError(f"chunk {i}: activations at {' and '.join(sites)} overflow {dtype}; harvest with "
                                "--dtype float32")
            _write_atomic(out / chunk_name(i), lambda f: np.save(f, rows))
            n_rows.append(len(rows))
        for p, counts in enumerate(distributed.allgather_json(n_rows)):
            for j, n in enumerate(counts):
                i = start + p * per + j
                done.append({"file": chunk_name(i), "n_rows": n, "contexts": plan[i].tolist()})
                bar.update(len(plan[i]))
        if me == 0:
            write_manifest(out, manifest)
    bar.close()
    return manifest


def open_chunk(directory: Path, entry: dict, manifest: dict) -> np.ndarray:
    """Memory-map one chunk [R, D], checking it against its manifest entry."""
    path = directory / entry["file"]
    fix = f"re-harvest with python launch/harvest.py ... --out {directory} --force"
    if not path.is_file():
        raise DataError(f"{path} is listed in the manifest but missing; {fix}")
    arr = memmap_npy(path, fix)
    want = CACHE_DTYPES.get(manifest["dtype"])
    expected = (entry["n_rows"], manifest["d_model"] * len(manifest["sites"]))
    if arr.shape != expected or want is None or arr.dtype != np.dtype(want):
        raise DataError(f"{path} holds {arr.dtype} {arr.shape}, the manifest says {manifest['dtype']} {expected}; "
                        f"{fix}")
    return arr


class CacheSource(IndexedSource):
    """Shuffled, batched, resumable rows of an activation cache; the cache's model (when it loads)
    gives the held-out evaluation and loss recovered."""

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, *, clt=None):
        assert cfg.path is not None
        self.path = Path(cfg.path)
        self.manifest = read_manifest(self.path)
        self.site: str | None = self.manifest["site"]
        self.model_name: str = self.manifest["model"]
        self.target_site: str | None = self.manifest["target_site"]
        self.sites = tuple(self.manifest["sites"])
        self.d_in = int(self.manifest["d_model"])
        self.d_out = None if self.target_site is None else self.d_in
        self.true_directions = None
        if clt is not None:
            self._check_clt_sites(clt)
        elif self.site is None:
            raise DataError(f"the cache {str(self.path)!r} holds a CLT's sites ({self.sites[0]} ... {self.sites[-1]}); "
                            "train it with dictionary.architecture: clt")
        self._chunks = [open_chunk(self.path, c, self.manifest) for c in self.manifest["chunks"]]
        if clt is None and cfg.site is not None and cfg.site != self.site:
            raise DataError(f"data.site is {cfg.site!r}, but the cache {str(self.path)!r} holds {self.site!r}; "
                            "drop data.site or point data.path at a cache of that site")
        if clt is None and cfg.target_site != self.target_site:
            held = "no target site" if self.target_site is None else f"target site {self.target_site!r}"
            raise DataError(f"data.target_site is {cfg.target_site!r}, but the cache {str(self.path)!r} holds {held}; "
                            "harvest a cache with that data.target_site, or set it to match")
        self._starts = np.cumsum([0, *(len(c) for c in self._chunks)])
        self.n_rows = int(self._starts[-1])
        if self.n_rows == 0:
            raise DataError(f"activation cache {str(self.path)!r} holds no completed chunks; run (or finish) "
                            f"python launch/harvest.py --config CONFIG --out {self.path}")
        if self.n_rows < batch_size:
            raise DataError(f"activation cache {str(self.path)!r} holds {self.n_rows} rows, fewer than "
                            f"train.batch_size={batch_size}; lower the batch size or harvest more contexts")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, cfg.shuffle

    def _check_clt_sites(self, clt) -> None:
        n = clt.n_layers if clt.n_layers is not None else len(self.sites) // 2
        try:
            want = clt_sites(clt, clt.first_layer + n)
        except DataError:
            want = ()
        if self.sites != want:
            held = f"{self.sites[0]} ... {self.sites[-1]} ({len(self.sites)} sites)"
            raise DataError(f"the cache {str(self.path)!r} holds {held}, dictionary.clt wants "
                            f"{want[0] if want else '?'} ... {want[-1] if want else '?'} ({len(want)} sites); harvest "
                            "with this config (launch/harvest.py --config CONFIG), or match dictionary.clt to the cache")

    def rows(self, i: int) -> np.ndarray:
        """Global row indices [B] (over the chunks in order) of training batch `i`, ascending."""
        return np.sort(batch_rows(i, self.batch_size, self.n_rows, self.seed, self.shuffle))

    def _chunk_of(self, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, idx, side="right") - 1

    def batch(self, i: int) -> np.ndarray:
        """Rows [B, D] of training batch `i`, read chunk by chunk in ascending order."""
        return self.read(i, 0, self.batch_size)

    def read(self, i: int, lo: int, hi: int) -> np.ndarray:
        idx = self.rows(i)[lo:hi]
        which = self._chunk_of(idx)
        cuts = np.flatnonzero(np.diff(which)) + 1
        parts = [np.asarray(self._chunks[c][part - self._starts[c]], np.float32)
                 for part, c in zip(np.split(idx, cuts), which[np.r_[0, cuts]])]
        return np.concatenate(parts)

    def describe(self, i: int, row: int) -> str:
        g = int(self.rows(i)[row])
        c = int(self._chunk_of(np.array([g]))[0])
        return (f"{self.path / self.manifest['chunks'][c]['file']} row {g - int(self._starts[c])} "
                f"(training batch {i}, row {row} of the batch)")

    def get_state(self) -> dict:
        return {**super().get_state(), "cache_rows": self.n_rows}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        rows = state.pop("cache_rows", self.n_rows)
        if rows != self.n_rows:
            raise DataError(f"the checkpoint read a cache of {rows} rows, {str(self.path)!r} now holds {self.n_rows}; "
                            "point data.path at the cache the run started with, or train afresh")
        super().set_state(state)

    @functools.cached_property
    def _language_model(self) -> tuple[object, np.ndarray] | None:
        """(model, held-out contexts) of the cache's model and corpus, or None when they cannot be loaded."""
        m = self.manifest
        try:
            model, tokenizer = open_site_model(m["model"], self.sites)
            train_docs, eval_docs = split_documents(corpus_documents(m["corpus"]), m["eval_fraction"])
            contexts_nt = held_out_contexts(train_docs, eval_docs, tokenizer, m["context_length"])
        except (OSError, ValueError, ImportError) as e:
            warnings.warn(f"activation cache {str(self.path)!r}: model {m['model']!r} or corpus {m['corpus']!r} "
                          f"cannot be loaded ({e}); evaluating on the last chunk, without loss recovered", stacklevel=2)
            return None
        if model.cfg.d_model != self.d_in:
            warnings.warn(f"activation cache {str(self.path)!r}: model {m['model']!r} has d_model "
                          f"{model.cfg.d_model}, the cache {self.d_in}; evaluating on the last chunk", stacklevel=2)
            return None
        return model, contexts_nt

    @property
    def model(self):
        """The cache's language model (loaded on first use), or None."""
        lm = self._language_model
        return None if lm is None else lm[0]

    @property
    def eval_contexts(self) -> np.ndarray | None:
        """Held-out contexts [N, T] of the cache's corpus, split as `ModelSource` splits them, or None."""
        lm = self._language_model
        return None if lm is None else lm[1]

    def eval_batches(self, n_tokens: int, batch_size: int) -> Iterator[np.ndarray]:
        """The held-out contexts' activations, or the last chunk's rows when the model cannot be loaded."""
        if self.model is not None:
            return eval_activation_batches(self.model, self.eval_contexts, self.sites, self.manifest["chunk_contexts"],
                                           n_tokens, batch_size)
        last = self._chunks[-1][:n_tokens]
        return (np.asarray(last[s : s + batch_size], np.float32) for s in range(0, len(last), batch_size))
