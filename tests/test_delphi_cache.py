"""The delphi export: files on disk, read back the way delphi's loader reads them.

The reader below follows EleutherAI/delphi `delphi/latents/loader.py` (`TensorBuffer.load`, which
loads each split with `safetensors.numpy.load_file`, takes the first latent from the file name and
adds it to column 2 of `locations`, casts `locations` through `delphi.utils.to_int64_tensor` (uint16,
int16, int32, uint32, int64, uint64 only) and `tokens` with `.astype(np.int64)`; and
`LatentDataset._edges`, which lists `{module}/*.safetensors` and splits each stem at "_"), and the
writer it mirrors is `delphi/latents/cache.py` `LatentCache.save_splits` / `save_config`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxinterp.errors import UsageError
from jaxinterp.features.delphi_cache import split_ranges, write_delphi_cache

LOCATION_DTYPES = (np.uint16, np.int16, np.int32, np.uint32, np.int64, np.uint64)  # delphi.utils.to_int64_tensor


def sparse_cache(n=6, t=16, d_sae=1000, entries=300, seed=0):
    rng = np.random.default_rng(seed)
    flat = rng.choice(n * t * d_sae, size=entries, replace=False)
    context, rest = np.divmod(flat, t * d_sae)
    position, latent = np.divmod(rest, d_sae)
    locations = np.stack([context, position, latent], axis=1).astype(np.int64)
    activations = rng.uniform(0.1, 20.0, size=entries).astype(np.float32)
    tokens = rng.integers(0, 50_000, size=(n, t)).astype(np.int32)
    return locations, activations, tokens


def read_like_delphi(module_dir):
    """(edges, locations with absolute latents, activations, tokens) as delphi's loader builds them."""
    edges = sorted(tuple(int(x) for x in f.stem.split("_")) for f in module_dir.glob("*.safetensors"))
    locations, activations, tokens = [], [], []
    for start, end in edges:
        split = load_file(str(module_dir / f"{start}_{end}.safetensors"))
        assert set(split) == {"locations", "activations", "tokens"}
        assert split["locations"].dtype in LOCATION_DTYPES and split["locations"].shape[1:] == (3,)
        assert split["activations"].dtype == np.float16
        rows = split["locations"].astype(np.int64)
        assert rows.size == 0 or (rows[:, 2].max() <= end - start)  # stored relative to the split's start
        rows[:, 2] += start
        locations.append(rows)
        activations.append(split["activations"])
        tokens.append(split["tokens"].astype(np.int64))
    return edges, np.concatenate(locations), np.concatenate(activations), tokens


def entries(locations, activations):
    return sorted(zip(map(tuple, locations.tolist()), np.asarray(activations, np.float16).tolist()))


def test_splits_hold_exactly_the_input_entries(tmp_path):
    locations, activations, tokens = sparse_cache()
    paths = write_delphi_cache(tmp_path, "layers.3", locations, activations, tokens, d_sae=1000, n_splits=3,
                               model_name="HuggingFaceTB/SmolLM2-135M")
    module_dir = tmp_path / "layers.3"
    # floor(linspace(0, 1000, 4)) = 0, 333, 666, 1000, ends inclusive
    assert [p.name for p in paths] == ["0_332.safetensors", "333_665.safetensors", "666_999.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.3"]  # delphi reads every folder as a module
    assert sorted(p.name for p in module_dir.iterdir()) == sorted([*(p.name for p in paths), "config.json"])
    edges, got_locations, got_activations, got_tokens = read_like_delphi(module_dir)
    assert edges == [(0, 332), (333, 665), (666, 999)]
    assert entries(got_locations, got_activations) == entries(locations, activations)
    for split_tokens in got_tokens:
        np.testing.assert_array_equal(split_tokens, tokens)
    assert load_file(str(paths[0]))["locations"].dtype == np.uint16
    assert load_file(str(paths[0]))["tokens"].dtype == np.int32
    config = json.loads((module_dir / "config.json").read_text())
    assert config["model_name"] == "HuggingFaceTB/SmolLM2-135M"
    assert (config["cache_ctx_len"], config["n_tokens"], config["n_splits"]) == (16, 96, 3)


def test_split_ranges_cover_the_latents():
    for d_sae, n_splits in [(1000, 3), (65536, 5), (7, 7), (10, 1)]:
        ranges = split_ranges(d_sae, n_splits)
        assert len(ranges) == n_splits and ranges[0][0] == 0 and ranges[-1][1] == d_sae - 1
        assert all(b[0] == a[1] + 1 and a[0] <= a[1] for a, b in zip(ranges, ranges[1:]))


def test_wide_latent_ranges_use_uint32_and_empty_splits_are_written(tmp_path):
    locations = np.array([[0, 1, 69_000], [1, 0, 5]])
    paths = write_delphi_cache(tmp_path, "l0", locations, np.array([1.5, 2.5]), np.zeros((2, 4), np.int64),
                               d_sae=70_000, n_splits=1)
    assert load_file(str(paths[0]))["locations"].dtype == np.uint32
    paths = write_delphi_cache(tmp_path, "l1", locations, np.array([1.5, 2.5]), np.zeros((2, 4), np.int64),
                               d_sae=70_000, n_splits=4)
    empty = load_file(str(paths[1]))
    assert empty["locations"].shape == (0, 3) and empty["activations"].shape == (0,)
    _, got_locations, got_activations, _ = read_like_delphi(tmp_path / "l1")
    assert entries(got_locations, got_activations) == entries(locations, [1.5, 2.5])


def test_rewrite_replaces_old_splits_and_leaves_no_temporary_files(tmp_path):
    locations, activations, tokens = sparse_cache()
    write_delphi_cache(tmp_path, "m", locations, activations, tokens, d_sae=1000, n_splits=3)
    (tmp_path / "m" / "notes.txt").write_text("kept")
    paths = write_delphi_cache(tmp_path, "m", locations, activations, tokens, d_sae=1000, n_splits=2)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == sorted([*(p.name for p in paths), "config.json", "notes.txt"])
    assert not list(tmp_path.rglob("*.tmp"))
    _, got_locations, got_activations, _ = read_like_delphi(tmp_path / "m")
    assert entries(got_locations, got_activations) == entries(locations, activations)


@pytest.mark.parametrize("change, message", [
    (dict(locations=np.zeros((3, 2), np.int64)), r"give \[n, 3\] rows"),
    (dict(locations=np.zeros((3, 3), np.float32)), "give integers"),
    (dict(activations=np.ones(4)), r"one value per location, shape \[n\]"),
    (dict(tokens=np.zeros(8, np.int64)), r"integer array \[N, T\]"),
    (dict(locations=np.array([[0, 0, 10], [0, 1, 2], [1, 3, 0]])), r"column 2 \(latent\) spans \[0, 10\]"),
    (dict(locations=np.array([[2, 0, 1], [0, 1, 2], [1, 3, 0]])), r"column 0 \(context\) spans \[0, 2\]"),
    (dict(n_splits=11), r"n_splits 11 must lie in \[1, d_sae=10\]"),
    (dict(module="a/b"), "without '/'"),
    (dict(activations=np.array([1.0, 2.0, 1e6])), "overflow delphi's float16"),
])
def test_bad_inputs_name_the_fix(tmp_path, change, message):
    args = dict(locations=np.array([[0, 0, 1], [0, 1, 2], [1, 3, 9]]), activations=np.ones(3),
                tokens=np.zeros((2, 4), np.int64), n_splits=2, module="m")
    args.update(change)
    with pytest.raises(UsageError, match=message):
        write_delphi_cache(tmp_path, args["module"], args["locations"], args["activations"], args["tokens"],
                           d_sae=10, n_splits=args["n_splits"])
