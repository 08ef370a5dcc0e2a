"""A sparse activation cache written in delphi's on-disk layout, so that delphi reads it unchanged.

Axes: `n` cached (token, latent) entries, `N` contexts, `T` tokens per context.

delphi (EleutherAI/delphi; `delphi/latents/cache.py` `LatentCache.save_splits` and `save_config` write
the layout, `delphi/latents/loader.py` `LatentDataset` and `TensorBuffer.load` read it) keeps, for each
module (hookpoint):

    {out_dir}/{module}/config.json                  the cache settings; `model_name` names the tokenizer
    {out_dir}/{module}/{start}_{end}.safetensors    one file per latent range, `end` inclusive

The ranges cut [0, d_sae) at `floor(linspace(0, d_sae, n_splits + 1))`. Each file holds

    locations    [n, 3]  (context, position, latent - start): rows of `tokens`, positions in a row, and
                         latents relative to the file's first one (the loader adds back the `start` it
                         reads from the file name). uint16 when every value is below 2**16, else uint32.
    activations  [n]     float16.
    tokens       [N, T]  the token ids of every context, the same in each file (the loader casts them
                         to int64; they are kept here in the integer dtype given).

`out_dir` is what delphi calls the latents directory: `results/{run name}/latents` for its command
line, `raw_dir` for `LatentDataset`. delphi reads every folder in it as a module, so keep nothing else
there. The loader takes the ranges from the file names, so a split file left from an export with
another `n_splits` would be read twice: `write_delphi_cache` removes those once the new files are in
place. Each file is written under a temporary name (not ending in `.safetensors`) and renamed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxinterp.errors import UsageError

SPLIT_NAME = re.compile(r"^(\d+)_(\d+)\.safetensors$")


def split_ranges(d_sae: int, n_splits: int) -> list[tuple[int, int]]:
    """delphi's latent ranges: (start, end) pairs, `end` inclusive, covering [0, d_sae)."""
    if d_sae < 1:
        raise UsageError(f"d_sae {d_sae!r} must be at least 1")
    if not 1 <= n_splits <= d_sae:
        raise UsageError(f"n_splits {n_splits!r} must lie in [1, d_sae={d_sae}] so that no split is empty")
    edges = np.linspace(0, d_sae, n_splits + 1).astype(np.int64)
    return [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:])]


def location_dtype(locations_n3: np.ndarray) -> np.dtype:
    """uint16 when every entry fits, else uint32: delphi's choice (its loader accepts both)."""
    top = int(locations_n3.max()) if locations_n3.size else 0
    if top >= 2**32:
        raise UsageError(f"location value {top} does not fit delphi's uint32 locations; use more splits "
                         "(latents) or fewer contexts")
    return np.dtype(np.uint16 if top < 2**16 else np.uint32)


def _check_inputs(module: str, locations_n3: np.ndarray, activations_n: np.ndarray, tokens_nt: np.ndarray,
                  d_sae: int) -> None:
    if not module or module in (".", "..") or "/" in module or os.sep in module:
        raise UsageError(f"module {module!r} names one folder in the latents directory; use a hookpoint name "
                         "without '/' such as 'layers.6'")
    if locations_n3.ndim != 2 or locations_n3.shape[1] != 3:
        raise UsageError(f"locations have shape {locations_n3.shape}; give [n, 3] rows (context, position, latent)")
    if not np.issubdtype(locations_n3.dtype, np.integer):
        raise UsageError(f"locations have dtype {locations_n3.dtype}; give integers (context, position, latent)")
    if activations_n.shape != (len(locations_n3),):
        raise UsageError(f"activations have shape {activations_n.shape} for {len(locations_n3)} locations; "
                         "give one value per location, shape [n]")
    if tokens_nt.ndim != 2 or not np.issubdtype(tokens_nt.dtype, np.integer):
        raise UsageError(f"tokens have shape {tokens_nt.shape} and dtype {tokens_nt.dtype}; give the contexts' "
                         "token ids as an integer array [N, T]")
    if len(locations_n3) == 0:
        return
    for col, (name, bound) in enumerate([("context", tokens_nt.shape[0]), ("position", tokens_nt.shape[1]),
                                         ("latent", d_sae)]):
        lo, hi = int(locations_n3[:, col].min()), int(locations_n3[:, col].max())
        if lo < 0 or hi >= bound:
            raise UsageError(f"location column {col} ({name}) spans [{lo}, {hi}], outside [0, {bound}); "
                             "columns are (context, position, latent) into tokens [N, T] and d_sae")


def _replace_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def cache_config(tokens_nt: np.ndarray, n_splits: int, model_name: str, extra: dict | None) -> dict:
    """config.json: delphi's `CacheConfig` fields and `model_name`, as its `save_config` writes them."""
    n, t = tokens_nt.shape
    config = {"dataset_repo": "", "dataset_split": "", "dataset_name": "", "dataset_column": "text",
              "batch_size": int(n), "cache_ctx_len": int(t), "n_tokens": int(n * t), "n_splits": int(n_splits),
              "model_name": model_name}
    config.update(extra or {})
    return config


def write_delphi_cache(out_dir: str | Path, module: str, locations_n3: np.ndarray, activations_n: np.ndarray,
                       tokens_nt: np.ndarray, d_sae: int, n_splits: int, *, model_name: str = "",
                       config: dict | None = None) -> list[Path]:
    """Write `module`'s entries (rows (context, position, latent) of `locations_n3` with their
    `activations_n`, into the contexts `tokens_nt` [N, T]) as delphi's split files under `out_dir`,
    and its config.json (`model_name`: the Hugging Face tokenizer delphi loads when it is not given one;
    `config`: extra keys, e.g. the dataset's). Returns the split files, lowest latents first."""
    locations_n3, activations_n, tokens_nt = np.asarray(locations_n3), np.asarray(activations_n), np.asarray(tokens_nt)
    ranges = split_ranges(d_sae, n_splits)
    _check_inputs(module, locations_n3, activations_n, tokens_nt, d_sae)
    finite = activations_n[np.isfinite(activations_n)]
    if finite.size and float(np.abs(finite).max()) > float(np.finfo(np.float16).max):
        raise UsageError(f"activations up to {float(np.abs(finite).max())} overflow delphi's float16; "
                         "scale them below 65504")
    values = activations_n.astype(np.float16)
    module_dir = Path(out_dir) / module
    module_dir.mkdir(parents=True, exist_ok=True)
    latent = locations_n3[:, 2]
    written = []
    for start, end in ranges:
        keep = (latent >= start) & (latent <= end)
        rows = locations_n3[keep].astype(np.int64)
        rows[:, 2] -= start
        data = {"locations": np.ascontiguousarray(rows.astype(location_dtype(rows))),
                "activations": np.ascontiguousarray(values[keep]),
                "tokens": np.ascontiguousarray(tokens_nt)}
        path = module_dir / f"{start}_{end}.safetensors"
        _replace_atomic(path, lambda tmp, data=data: save_file(data, str(tmp)))
        written.append(path)
    for stale in module_dir.iterdir():
        if SPLIT_NAME.match(stale.name) and stale not in written:
            stale.unlink()
    text = json.dumps(cache_config(tokens_nt, n_splits, model_name, config), indent=4)
    _replace_atomic(module_dir / "config.json", lambda tmp: tmp.write_text(text))
    return written
