"""Activation sources: `.npy` files through grain, and the synthetic ground-truth stream."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from jaxinterp.config import DataConfig, SyntheticConfig
from jaxinterp.data import DataError, NpySource, SyntheticSource, open_activations, true_directions, write_npy

N_ROWS, D_IN, BATCH = 200, 8, 16  # eval_fraction 0.2 -> 160 train rows = 10 batches per epoch


def _id_matrix(n=N_ROWS, d=D_IN) -> np.ndarray:
    """Row i holds i in column 0 (and i + j / 8 elsewhere), so a batch tells which rows it holds."""
    return (np.arange(n)[:, None] + np.arange(d)[None, :] / 8).astype(np.float32)


def _source(path, *, shuffle=True, seed=0, batch=BATCH, **kw) -> NpySource:
    cfg = DataConfig(source="npy", path=str(path), shuffle=shuffle, eval_fraction=kw.pop("eval_fraction", 0.2), **kw)
    return NpySource(cfg, batch, seed)


def _ids(batch: np.ndarray) -> list[int]:
    return [int(v) for v in np.asarray(batch)[:, 0]]


@pytest.fixture
def id_file(tmp_path):
    p = tmp_path / "acts.npy"
    np.save(p, _id_matrix())
    return p


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_npy_reads_each_dtype(tmp_path, dtype):
    np_dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    # values exactly representable in all three dtypes
    x = (np.arange(64 * 4).reshape(64, 4) % 7 - 3).astype(np.float32) / 4
    p = tmp_path / f"{dtype}.npy"
    np.save(p, x.astype(np_dtype))
    for declared in ("auto", dtype):
        src = _source(p, shuffle=False, batch=16, eval_fraction=0.0, dtype=declared)
        assert src.d_in == 4
        got = next(src)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, x[:16])
        np.testing.assert_array_equal(next(src), x[16:32])


def test_npy_declared_dtype_mismatch_is_a_clear_error(tmp_path):
    p = tmp_path / "f16.npy"
    np.save(p, np.zeros((32, 4), np.float16))
    with pytest.raises(DataError, match=r"dtype float16.*data\.dtype is float32"):
        open_activations(str(p), "float32")


def test_shuffle_covers_every_train_row_once_per_epoch(id_file):
    src = _source(id_file)
    n_train = src.n_train
    assert n_train == 160
    epochs = []
    for _ in range(3):
        rows = [i for _ in range(n_train // BATCH) for i in _ids(next(src))]
        assert sorted(rows) == list(range(n_train))  # every train row exactly once
        epochs.append(rows)
    assert epochs[0] != list(range(n_train))  # shuffled
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch
    # the order is a function of the seed
    same = _source(id_file)
    assert [i for _ in range(n_train // BATCH) for i in _ids(next(same))] == epochs[0]
    other = _source(id_file, seed=1)
    assert [i for _ in range(n_train // BATCH) for i in _ids(next(other))] != epochs[0]


def test_unshuffled_reads_rows_in_order(id_file):
    src = _source(id_file, shuffle=False)
    assert _ids(next(src)) == list(range(16))
    assert _ids(next(src)) == list(range(16, 32))


@pytest.mark.parametrize("consumed", [3, 10, 13])  # mid-epoch, at the boundary, in the second epoch
def test_state_resumes_the_exact_next_batch(id_file, consumed):
    src = _source(id_file)
    for _ in range(consumed):
        next(src)
    state = src.get_state()
    json.dumps(state)  # saved beside the checkpoint as JSON
    expected = [np.array(next(src)) for _ in range(12)]

    resumed = _source(id_file)  # a fresh process: new source, then the saved position
    resumed.set_state(json.loads(json.dumps(state)))
    for want in expected:
        np.testing.assert_array_equal(next(resumed), want)


def test_eval_split_is_disjoint_from_train_rows(id_file):
    src = _source(id_file)
    train_rows = {i for _ in range(2 * src.n_train // BATCH) for i in _ids(next(src))}
    eval_rows = [i for b in src.eval_batches(10_000, BATCH) for i in _ids(b)]
    assert train_rows == set(range(160))
    assert eval_rows == list(range(160, 200))  # the last eval_fraction of the file
    # eval_tokens caps the held-out rows read
    assert sum(len(b) for b in src.eval_batches(24, BATCH)) == 24


def test_missing_file_is_a_data_error(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(DataError, match=r"nope\.npy.*not found"):
        _source(missing)


@pytest.mark.parametrize("shape", [(64,), (4, 8, 8)])
def test_non_matrix_is_a_data_error(tmp_path, shape):
    p = tmp_path / "bad.npy"
    np.save(p, np.zeros(shape, np.float32))
    with pytest.raises(DataError, match=r"bad\.npy.*expected a matrix \[tokens, d_in\]"):
        _source(p)


def test_corrupt_file_is_a_data_error(tmp_path):
    p = tmp_path / "corrupt.npy"
    p.write_bytes(b"this is not an npy file at all" * 10)
    with pytest.raises(DataError, match=r"corrupt\.npy.*not a (readable )?\.npy"):
        _source(p)
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.zeros((1000, 8), np.float32))
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(DataError, match="truncated.npy"):
        _source(truncated)


def test_integer_file_is_a_data_error(tmp_path):
    p = tmp_path / "ints.npy"
    np.save(p, np.zeros((64, 4), np.int32))
    with pytest.raises(DataError, match="expected float16, bfloat16 or float32"):
        _source(p)


def test_fewer_rows_than_a_batch_is_a_data_error(tmp_path):
    p = tmp_path / "small.npy"
    np.save(p, np.zeros((10, 4), np.float32))
    with pytest.raises(DataError, match="fewer than train.batch_size"):
        _source(p, batch=16, eval_fraction=0.0)


SYN = SyntheticConfig(n_features=32, d_in=8, p_active=0.1)


def test_synthetic_is_deterministic_per_step_and_resumes():
    a = SyntheticSource(SYN, 64, seed=3)
    batches = [np.asarray(next(a)) for _ in range(6)]
    b = SyntheticSource(SYN, 64, seed=3)
    for want in batches:
        np.testing.assert_array_equal(np.asarray(next(b)), want)
    assert not np.array_equal(batches[0], batches[1])  # steps differ

    resumed = SyntheticSource(SYN, 64, seed=3)
    resumed.set_state(json.loads(json.dumps({"next_batch": 4})))
    np.testing.assert_array_equal(np.asarray(next(resumed)), batches[4])
    assert resumed.get_state() == {"next_batch": 5}
    assert a.get_state() == {"next_batch": 6}

    other = SyntheticSource(SYN, 64, seed=4)
    assert not np.array_equal(np.asarray(next(other)), batches[0])


def test_synthetic_eval_batches_are_held_out_and_fixed():
    a = SyntheticSource(SYN, 64, seed=0)
    ev1 = [np.asarray(b) for b in a.eval_batches(256, 64)]
    train = [np.asarray(next(a)) for _ in range(8)]
    ev2 = [np.asarray(b) for b in a.eval_batches(256, 64)]
    assert len(ev1) == 4
    for x, y in zip(ev1, ev2):
        np.testing.assert_array_equal(x, y)  # reading training batches does not move the eval set
    for e in ev1:
        assert not any(np.array_equal(e, t) for t in train)


def test_synthetic_samples_are_sparse_combinations_of_true_directions():
    cfg = SyntheticConfig(n_features=32, d_in=8, p_active=0.1, magnitude="constant", magnitude_mean=1.0)
    src = SyntheticSource(cfg, 512, seed=0)
    x = np.asarray(next(src))
    dirs = src.true_directions
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(dirs, true_directions(cfg))
    # E||x||^2 = n_features * p_active * E[c^2] + cross terms (zero mean in expectation, small here)
    mean_sq = np.mean(np.sum(x**2, 1))
    assert mean_sq == pytest.approx(32 * 0.1, rel=0.25)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_npy_writes_rows_and_unit_directions(tmp_path, dtype):
    cfg = SyntheticConfig(n_features=48, d_in=12, p_active=0.05)
    path, dir_path = write_npy(str(tmp_path / "acts.npy"), cfg, 1000, dtype=dtype, batch_size=300)
    assert dir_path == str(tmp_path / "acts.directions.npy")
    dirs = np.load(dir_path)
    assert dirs.shape == (48, 12)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(dirs, true_directions(cfg))
    arr = open_activations(path, "auto")
    assert arr.shape == (1000, 12)
    assert arr.dtype == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    x = np.asarray(arr, np.float32)
    assert np.any(x != 0, axis=1).mean() > 0.5  # every chunk was written (no zero tail)
    assert np.any(x[-100:] != 0)
    # E||x||^2 = n_features * p_active * E[c^2], c ~ U[0, 2]: 48 * 0.05 * 4/3 = 3.2
    assert np.mean(np.sum(x**2, 1)) == pytest.approx(3.2, rel=0.2)
    # and it trains through the npy source with the directions attached
    src = NpySource(DataConfig(source="npy", path=path, true_directions=dir_path), 100, 0)
    np.testing.assert_array_equal(src.true_directions, dirs)
