"""Indexed batch streams: the keyed permutation, batches across epochs, read-ahead and resuming."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxinterp.config import DataConfig, SyntheticConfig
from jaxinterp.data import NpySource
from jaxinterp.data.batches import BatchStream, batch_rows, permute
from jaxinterp.data.synthetic import active_features


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_permutation_fixed_by_seed_and_epoch(n):
    p = permute(np.arange(n), n, seed=3, epoch=0)
    np.testing.assert_array_equal(np.sort(p), np.arange(n))
    np.testing.assert_array_equal(permute(np.arange(n), n, seed=3, epoch=0), p)
    # any subset of positions maps as the whole does (a batch is evaluated on its own positions)
    sub = np.arange(n)[::3]
    np.testing.assert_array_equal(permute(sub, n, seed=3, epoch=0), p[sub])
    if n >= 64:
        assert not np.array_equal(permute(np.arange(n), n, 3, 1), p)
        assert not np.array_equal(permute(np.arange(n), n, 4, 0), p)


def test_permute_looks_uniform():
    # where position 0 lands over 4000 epochs: every tenth of [0, 100) about equally often
    lands = np.array([permute(np.array([0, 1]), 100, 0, e) for e in range(4000)])
    counts = np.histogram(lands[:, 0], bins=10, range=(0, 100))[0]
    assert counts.min() > 300 and counts.max() < 500, counts
    assert abs(np.corrcoef(lands[:, 0], lands[:, 1])[0, 1]) < 0.1  # neighbours land independently


def test_batches_visit_every_row_once_per_epoch_and_run_across_epoch_ends():
    n, b = 1000, 128
    first = np.concatenate([batch_rows(i, b, n, seed=0) for i in range(n // b)])  # 7 full batches
    assert len(np.unique(first)) == len(first) == 7 * b
    rows = np.concatenate([batch_rows(i, b, n, seed=0) for i in range(16)])  # 2048 positions: 2 epochs + 48
    for e in range(2):
        np.testing.assert_array_equal(np.sort(rows[e * n : (e + 1) * n]), np.arange(n))
    assert not np.array_equal(rows[:n], rows[n : 2 * n])  # a new order each epoch
    np.testing.assert_array_equal(batch_rows(7, b, n, 0, shuffle=False), (7 * b + np.arange(b)) % n)


def test_stream_reads_ahead_and_resumes_from_its_index():
    calls = []

    def fn(i):
        calls.append(i)
        return np.full((2, 3), i, np.float32)

    s = BatchStream(fn, prefetch=2)
    assert [int(next(s)[0, 0]) for _ in range(4)] == [0, 1, 2, 3]
    assert s.get_state() == {"next_batch": 4}
    again = BatchStream(fn)
    again.set_state(json.loads(json.dumps(s.get_state())))
    assert int(next(again)[0, 0]) == 4


def test_npy_source_names_the_file_row_of_a_batch_row(tmp_path):
    x = np.arange(600 * 4, dtype=np.float32).reshape(600, 4)
    np.save(tmp_path / "a.npy", x)
    src = NpySource(DataConfig(source="npy", path=str(tmp_path / "a.npy"), eval_fraction=0.0), 64, seed=1)
    batch = src.batch(3)
    for r in (0, 17, 63):
        file_row = int(src.describe(3, r).split(" row ")[1].split(" ")[0])
        np.testing.assert_array_equal(x[file_row], batch[r])
    assert "training batch 3, row 17" in src.describe(3, 17)


def test_groups_with_full_correlation_fire_together():
    cfg = SyntheticConfig(n_features=40, d_in=8, p_active=0.1, group_size=4, group_correlation=1.0)
    rows, feats = active_features(np.random.default_rng(0), cfg, 2000)
    on = np.zeros((2000, 40), bool)
    on[rows, feats] = True
    groups = on.reshape(2000, 10, 4)
    assert np.all(groups.all(-1) == groups.any(-1))  # a group is all on or all off
    assert on.mean() == pytest.approx(0.1, abs=0.01)


def test_independent_features_fire_at_p_active():
    cfg = SyntheticConfig(n_features=300, d_in=8, p_active=0.02)
    rows, feats = active_features(np.random.default_rng(1), cfg, 5000)
    on = np.zeros((5000, 300), bool)
    on[rows, feats] = True
    assert on.sum() == len(rows)  # no pair drawn twice
    assert on.mean() == pytest.approx(0.02, rel=0.03)
    assert np.all(np.diff(rows) >= 0)  # sorted by row, as the sparse product wants
