"""Sparse top-k encode/decode (`dictionaries/sparse.py`) against their dense references, and the
mesh-aware top-k / k-th largest (`dictionaries/ops.py`) against `lax.top_k` and NumPy."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinterp import dictionaries as dl
from jaxinterp.config import MeshConfig
from jaxinterp.dictionaries import ops
from jaxinterp.train.sharding import make_mesh

SIZES = [(7, 5, 33, 3), (16, 8, 64, 4)]  # (B, D, F, K): not / are powers of two
F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=3e-2, atol=3e-2)


def _decode_inputs(b, d, f, k, seed=0):
    rng = np.random.default_rng(seed)
    vals = rng.uniform(0.1, 2.0, size=(b, k)).astype(np.float32)
    idx = np.stack([rng.permutation(f)[:k] for _ in range(b)]).astype(np.int32)
    w = rng.normal(size=(f, d)).astype(np.float32)
    return vals, idx, w


def _encode_inputs(b, d, f, seed=0):
    rng = np.random.default_rng(seed)
    xc = rng.normal(size=(b, d)).astype(np.float32)
    w = (rng.normal(size=(d, f)) / np.sqrt(d)).astype(np.float32)
    b_enc = (0.3 * rng.normal(size=(f,))).astype(np.float32)
    return xc, w, b_enc


# ---------------------------------------------------------------------------------------------
# topk_decode


@pytest.mark.parametrize("b,d,f,k", SIZES)
def test_topk_decode_matches_reference(b, d, f, k):
    vals, idx, w = _decode_inputs(b, d, f, k)
    got = dl.topk_decode(jnp.asarray(vals), jnp.asarray(idx), jnp.asarray(w))
    want = dl.topk_decode_reference(jnp.asarray(vals), jnp.asarray(idx), jnp.asarray(w))
    np.testing.assert_allclose(got, want, **F32)
    np.testing.assert_allclose(got, np.einsum("bk,bkd->bd", vals, w[idx]), **F32)

    g = np.random.default_rng(1).normal(size=(b, d)).astype(np.float32)
    loss = lambda fn: (lambda v, w_: jnp.sum(fn(v, jnp.asarray(idx), w_) * g))
    args = (jnp.asarray(vals), jnp.asarray(w))
    got_g = jax.jit(jax.grad(loss(dl.topk_decode), argnums=(0, 1)))(*args)
    want_g = jax.grad(loss(dl.topk_decode_reference), argnums=(0, 1))(*args)
    for name, a, e in zip(("vals", "W_dec"), got_g, want_g):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        np.testing.assert_allclose(a, e, err_msg=name, **F32)


@pytest.mark.parametrize("b,d,f,k", SIZES)
def test_topk_decode_bfloat16(b, d, f, k):
    vals, idx, w = _decode_inputs(b, d, f, k)
    vals16, w16 = jnp.asarray(vals, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    got = dl.topk_decode(vals16, jnp.asarray(idx), w16)
    want = dl.topk_decode_reference(vals16, jnp.asarray(idx), w16)
    assert got.dtype == want.dtype == jnp.bfloat16
    exact = np.einsum("bk,bkd->bd", np.asarray(vals16, np.float64), np.asarray(w16, np.float64)[idx])
    np.testing.assert_allclose(np.asarray(got, np.float32), exact, **BF16)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **BF16)


# ---------------------------------------------------------------------------------------------
# topk_encode


@pytest.mark.parametrize("b,d,f,k", SIZES)
def test_topk_encode_matches_reference(b, d, f, k):
    xc, w, b_enc = _encode_inputs(b, d, f)
    b_dec = np.random.default_rng(2).normal(size=(d,)).astype(np.float32) * 0.1
    args = (jnp.asarray(xc + b_dec), jnp.asarray(b_dec), jnp.asarray(w), jnp.asarray(b_enc))
    vals, idx = dl.topk_encode(*args, k)
    ref_vals, ref_idx = dl.topk_encode_reference(*args, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(vals, ref_vals, **F32)
    pre = xc.astype(np.float64) @ w + b_enc
    np.testing.assert_allclose(vals, np.maximum(np.sort(pre, -1)[:, ::-1][:, :k], 0), **F32)

    # a cotangent on the values only; idx has no gradient
    g = np.random.default_rng(1).normal(size=(b, k)).astype(np.float32)
    loss = lambda fn: (lambda x_, bd_, w_, b_: jnp.sum(fn(x_, bd_, w_, b_, k)[0] * g))
    got_g = jax.jit(jax.grad(loss(dl.topk_encode), argnums=(0, 1, 2, 3)))(*args)
    want_g = jax.grad(loss(dl.topk_encode_reference), argnums=(0, 1, 2, 3))(*args)
    for name, a, e in zip(("x", "b_dec", "W_enc", "b_enc"), got_g, want_g):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert np.abs(np.asarray(e)).max() > 0, name
        np.testing.assert_allclose(a, e, err_msg=name, **F32)


def test_topk_encode_gradient_zero_where_relu_clips():
    """Selected features with negative pre-activation (relu'd to 0) pass no gradient."""
    b, d, f, k = 4, 3, 9, 5
    xc, w, _ = _encode_inputs(b, d, f)
    b_enc = np.full((f,), -5.0, np.float32)  # every pre-activation negative
    args = (jnp.asarray(xc), jnp.zeros((d,), jnp.float32), jnp.asarray(w), jnp.asarray(b_enc))
    vals, _ = dl.topk_encode(*args, k)
    np.testing.assert_array_equal(vals, np.zeros((b, k)))
    grads = jax.grad(lambda *a: jnp.sum(dl.topk_encode(*a, k)[0]), argnums=(0, 1, 2, 3))(*args)
    for gr in grads:
        np.testing.assert_array_equal(gr, np.zeros_like(gr))


@pytest.mark.parametrize("b,d,f,k", SIZES)
def test_topk_encode_bfloat16(b, d, f, k):
    xc, w, b_enc = _encode_inputs(b, d, f)
    x16, w16 = jnp.asarray(xc, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    zero = jnp.zeros((d,), jnp.bfloat16)
    vals, idx = dl.topk_encode(x16, zero, w16, jnp.asarray(b_enc), k, "bfloat16")
    ref_vals, _ = dl.topk_encode_reference(x16, zero, w16, jnp.asarray(b_enc), k)
    pre = np.asarray(x16, np.float64) @ np.asarray(w16, np.float64) + b_enc
    top = np.sort(pre, -1)[:, ::-1][:, :k]
    np.testing.assert_allclose(np.asarray(vals, np.float32), np.maximum(top, 0), **BF16)
    np.testing.assert_allclose(np.asarray(vals, np.float32), np.asarray(ref_vals, np.float32), **BF16)
    # the returned indices point at the values returned (robust to near-ties after rounding)
    picked = np.take_along_axis(pre, np.asarray(idx), axis=1)
    np.testing.assert_allclose(np.asarray(vals, np.float32), np.maximum(picked, 0), **BF16)
    assert all(len(set(row)) == k for row in np.asarray(idx).tolist())


# ---------------------------------------------------------------------------------------------
# ops.topk / ops.kth_largest under a (4, 2) mesh


@pytest.fixture(scope="module")
def mesh():
    m = make_mesh(MeshConfig(data=4, model=2))
    assert dict(m.shape) == {"data": 4, "model": 2}
    assert tuple(m.axis_types) == (AxisType.Auto, AxisType.Auto)
    return m


def _rand(b, f, seed=0):
    return np.random.default_rng(seed).normal(size=(b, f)).astype(np.float32)


def _under_mesh(mesh, fn, x, spec=P("data", "model")):
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(fn)(xs))
        return jax.jit(fn)(xs), jaxpr


@pytest.mark.parametrize("b,f,k", [(8, 64, 5), (16, 8, 6), (4, 34, 34), (6, 64, 3), (8, 33, 4)])
def test_topk_under_mesh_matches_lax(mesh, b, f, k):
    """(16, 8, 6): k exceeds a model shard's 4 columns; (6, 64) and (8, 33) do not divide the mesh."""
    x = _rand(b, f)
    (vals, idx), jaxpr = _under_mesh(mesh, partial(ops.topk, k=k), x, P())
    want_vals, want_idx = lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(vals, want_vals)
    np.testing.assert_array_equal(idx, want_idx)
    if b % 4 == 0 or f % 2 == 0:
        assert "shard_map" in jaxpr, "the sharded selection path must be exercised"


def test_topk_under_mesh_sharded_input(mesh):
    x = _rand(8, 64, seed=5)
    (vals, idx), jaxpr = _under_mesh(mesh, partial(ops.topk, k=7), x)
    assert "shard_map" in jaxpr
    want_vals, want_idx = lax.top_k(jnp.asarray(x), 7)
    np.testing.assert_array_equal(vals, want_vals)
    np.testing.assert_array_equal(idx, want_idx)


def _np_kth(x, m):
    return np.sort(x.ravel())[::-1][m - 1]


def _nonneg(b, f, seed=0):
    """Non-negative, as `kth_largest` takes (relu'd pre-activations): a third exact zeros."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(b, f))).astype(np.float32)
    x[rng.uniform(size=(b, f)) < 1 / 3] = 0.0
    return x


@pytest.mark.parametrize("b,f,m", [(8, 64, 1), (8, 64, 32), (8, 64, 100), (8, 64, 512), (16, 8, 40)])
def test_kth_largest_under_mesh(mesh, b, f, m):
    x = _nonneg(b, f, seed=m)
    got, jaxpr = _under_mesh(mesh, partial(ops.kth_largest, m=m), x)
    assert "shard_map" in jaxpr
    assert float(got) == _np_kth(x, m)
    if m == b * f:
        assert float(got) == 0.0


@pytest.mark.parametrize("under_mesh", [False, True])
def test_kth_largest_exact_when_one_row_holds_the_top(mesh, under_mesh):
    """One row of huge values holds all top-m entries: more than any per-row share of the batch."""
    b, f, k = 6, 64, 3  # 6 rows do not divide data=4, so the mesh also takes the local path
    x = _nonneg(b, f, seed=7)
    x[2] = 1000.0 + np.arange(f, dtype=np.float32)
    m = k * b
    if under_mesh:
        got, _ = _under_mesh(mesh, partial(ops.kth_largest, m=m), x, P())
    else:
        got = jax.jit(partial(ops.kth_largest, m=m))(jnp.asarray(x))
    assert float(got) == _np_kth(x, m) == 1000.0 + f - m


def test_kth_largest_local_with_ties():
    """Without a mesh; duplicated values, tiny and huge magnitudes, and the m = B*F corner."""
    rng = np.random.default_rng(9)
    x = rng.integers(0, 5, size=(32, 48)).astype(np.float32)
    x[0, :3] = [1e-30, 3e30, 2.5]
    for m in (1, 2, 32 * 4, 32 * 20, 32 * 48):
        assert float(jax.jit(partial(ops.kth_largest, m=m))(jnp.asarray(x))) == _np_kth(x, m), m


def test_paths_are_the_kernel_packages_names_and_auto_takes_the_kernel_only_where_one_compiles():
    from jaxinterp.dictionaries.sparse import resolve_path

    v, w = jnp.zeros((8, 32), jnp.float32), jnp.zeros((16384, 768), jnp.float32)
    assert resolve_path("auto", v, w) == ({"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "sparse"))
    assert resolve_path("sparse", v, w) == "sparse" and resolve_path("dense", v, w) == "dense"
    assert resolve_path("pallas", v, w) in ("pallas_gpu", "pallas_tpu")
    with pytest.raises(ValueError, match="impl='fast'; choose one of"):
        resolve_path("fast", v, w)


@pytest.mark.parametrize("path", ["sparse", "dense", "pallas"])
def test_one_device_training_runs_the_kernel_packages_own_backward(path, monkeypatch):
    """Where no mesh axis splits the decode, the library calls `pallas_kernels.topk_decode` itself:
    its custom VJP (not a second one) differentiates the step."""
    from pallas_kernels.topk_decode import autodiff

    from jaxinterp.dictionaries.sparse import topk_decode

    calls = []
    real = autodiff.decode_backward
    monkeypatch.setattr(autodiff, "decode_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    vals = jnp.asarray(rng.uniform(size=(8, 4)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, 64, size=(8, 4)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    g = jax.grad(lambda v, w: jnp.sum(topk_decode(v, idx, w, path=path) ** 2), argnums=(0, 1))(vals, w)
    want = jax.grad(lambda v, w: jnp.sum((dl.scatter_dense(v, idx, 64) @ w) ** 2), argnums=(0, 1))(vals, w)
    assert calls, "the kernel package's backward did not run"
    for a, b in zip(g, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("under_mesh", [False, True])
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_ragged_rows_skip_the_entries_past_each_rows_count(mesh, under_mesh, path, monkeypatch):
    """With `counts` (BatchTopK's kept candidates lead each row), the decode equals the full one,
    the kept entries' gradients are the full ones and the rest get none; the encode's `ragged`
    backward equals the full backward for a cotangent that is zero past the counts. Blocks of 8
    rows, so rows are sorted and cut into several blocks (each device its own under the mesh)."""
    from pallas_kernels.topk_decode import dispatch

    from jaxinterp.dictionaries.sparse import topk_decode, topk_encode

    monkeypatch.setattr(dispatch, "RAGGED_BLOCK_ROWS", 8)
    b, d, f, k = 64, 8, 32, 6
    rng = np.random.default_rng(3)
    counts = jnp.asarray(rng.integers(0, k + 1, size=b), jnp.int32)
    lead = jnp.arange(k) < counts[:, None]
    vals = jnp.where(lead, jnp.asarray(rng.uniform(0.1, 2.0, size=(b, k)), jnp.float32), 0.0)
    idx = jnp.asarray(rng.integers(0, f, size=(b, k)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(f, d)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)

    def loss(v, w_, c):
        return jnp.sum(topk_decode(v, idx, w_, path=path, counts=c) * g)

    x, w_enc, b_enc = _encode_inputs(b, d, f)

    def enc_loss(w_e, ragged):
        v, _ = topk_encode(jnp.asarray(x), jnp.zeros(d), w_e, jnp.asarray(b_enc), k, "float32", ragged)
        return jnp.sum(jnp.where(lead, v, 0.0) * vals)

    def run():
        out = jax.jit(lambda v, w_: topk_decode(v, idx, w_, path=path, counts=counts))(vals, w)
        full = jax.jit(lambda v, w_: topk_decode(v, idx, w_, path=path))(vals, w)
        got = jax.jit(jax.grad(loss, argnums=(0, 1)))(vals, w, counts)
        want = jax.jit(jax.grad(loss, argnums=(0, 1)))(vals, w, None)
        enc = [jax.jit(jax.grad(partial(enc_loss, ragged=r)))(jnp.asarray(w_enc)) for r in (True, False)]
        return out, full, got, want, enc

    if under_mesh:
        with jax.set_mesh(mesh):
            out, full, got, want, enc = run()
    else:
        out, full, got, want, enc = run()
    np.testing.assert_allclose(out, full, **F32)
    np.testing.assert_allclose(got[0], jnp.where(lead, want[0], 0.0), **F32)
    np.testing.assert_allclose(got[1], want[1], **F32)
    assert float(jnp.max(jnp.abs(want[0] * ~lead))) > 0  # the full decode differentiates them
    np.testing.assert_allclose(enc[0], enc[1], **F32)
