"""pallas_kernels.topk_decode: kernels vs the plain-JAX reference, the sparse VJP, dispatch, and
lowering for CUDA and TPU from this CPU-only machine.

Axes: `B` batch, `K` active features per row, `F` d_sae, `D` d_model.

On CPU the kernels run in interpret mode: the Triton kernel through Pallas' HLO interpreter, the
TPU kernel through the TPU interpreter (`pltpu.InterpretParams`), which simulates the DMAs and
semaphores -- a read of a row buffer before its copy was waited on returns NaN there -- and
checks for races. Sizes stay small: interpreting is slow.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import topk_decode as tkd
from pallas_kernels.topk_decode import tpu as tpu_kernel

F32, BF16 = jnp.float32, jnp.bfloat16
# bf16 outputs: both sides sum the same products in float32 and round once to bf16, so they may
# differ by one bf16 ulp (2**-8 relative) where the float32 sums straddle a rounding boundary.
TOL = {F32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=2**-7, atol=2**-7)}
# Custom-call targets of Triton kernels: jax.export refuses them by default because Triton IR has
# no compatibility guarantee (jaxlib <= 0.10.2 emits the first, later ones the second).
TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


def make_problem(n_rows, k, n_feat, d_model, dtype, seed=0):
    """vals, idx, W_dec, b_dec; row 0 repeats one feature K times, every row repeats idx[:, 0] once."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    vals = jax.random.normal(k1, (n_rows, k), F32).astype(dtype)
    idx = np.array(jax.random.randint(k2, (n_rows, k), 0, n_feat, jnp.int32))
    if k > 1:
        idx[:, 1] = idx[:, 0]
        idx[0, :] = idx[0, 0]
    w_dec = jax.random.normal(k3, (n_feat, d_model), F32).astype(dtype)
    b_dec = jax.random.normal(k4, (d_model,), F32).astype(dtype)
    return vals, jnp.asarray(idx), w_dec, b_dec


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **TOL[dtype])


def tpu_interpreter():
    return pltpu.InterpretParams(detect_races=True)


def assert_no_races():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # the interpreter's own record

    races = getattr(interpret_pallas_call, "races", None)
    assert races is None or not races.races_found


# (B, K, F, D, dtype): B, D and F both powers of two and not; bf16 for W_dec, b_dec and vals.
CASES = [
    (1, 1, 256, 64, F32),
    (5, 4, 1000, 100, F32),
    (8, 32, 256, 128, BF16),
    (33, 4, 1000, 100, BF16),
]


@pytest.mark.parametrize("n_rows,k,n_feat,d_model,dtype", CASES)
def test_gpu_kernel_matches_reference(n_rows, k, n_feat, d_model, dtype):
    vals, idx, w_dec, b_dec = make_problem(n_rows, k, n_feat, d_model, dtype)
    out = tkd.topk_decode_gpu(vals, idx, w_dec, b_dec, interpret=True)
    assert_close(out, tkd.topk_decode_reference(vals, idx, w_dec, b_dec), dtype)


def test_gpu_kernel_small_tiles_mask_the_tails():
    # 9 row blocks (the last padded) x 4 column tiles (the last 4 of 32 columns valid)
    vals, idx, w_dec, b_dec = make_problem(33, 4, 1000, 100, F32, seed=1)
    out = tkd.topk_decode_gpu(vals, idx, w_dec, b_dec, block_b=4, block_d=32, interpret=True)
    assert_close(out, tkd.topk_decode_reference(vals, idx, w_dec, b_dec), F32)


def test_gpu_kernel_rejects_non_power_of_two_tiles():
    vals, idx, w_dec, b_dec = make_problem(5, 4, 256, 64, F32)
    with pytest.raises(ValueError, match="block_d=48 must be a power of two"):
        tkd.topk_decode_gpu(vals, idx, w_dec, b_dec, block_d=48, interpret=True)


@pytest.mark.parametrize("n_rows,k,n_feat,d_model,dtype", CASES)
def test_tpu_kernel_matches_reference(n_rows, k, n_feat, d_model, dtype):
    vals, idx, w_dec, b_dec = make_problem(n_rows, k, n_feat, d_model, dtype)
    out = tkd.topk_decode_tpu(vals, idx, w_dec, b_dec, interpret=tpu_interpreter())
    assert_close(out, tkd.topk_decode_reference(vals, idx, w_dec, b_dec), dtype)
    assert_no_races()


def test_tpu_kernel_prefetches_across_blocks_on_two_cores(monkeypatch):
    # 3 batch blocks x 2 column blocks, split over 2 simulated cores in random order; the batch
    # is cut into calls of 2 and 1 blocks because at most 32 indices fit the (shrunk) prefetch budget
    monkeypatch.setattr(tpu_kernel, "MAX_PREFETCH_INDICES", 32)
    vals, idx, w_dec, b_dec = make_problem(20, 2, 300, 256, F32, seed=2)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=3)
    out = tkd.topk_decode_tpu(vals, idx, w_dec, b_dec, block_d=128, interpret=params)
    assert_close(out, tkd.topk_decode_reference(vals, idx, w_dec, b_dec), F32)
    assert_no_races()


def test_fused_matches_fused_reference():
    pre_acts = jax.random.normal(jax.random.PRNGKey(4), (6, 300), F32)
    pre_acts = pre_acts.at[0].set(-jnp.abs(pre_acts[0])).at[0, 7].set(1.0)  # row 0: one positive entry
    _, _, w_dec, b_dec = make_problem(1, 1, 300, 100, F32, seed=5)
    for impl in ("pallas", "pallas_tpu"):
        got = tkd.fused_topk_decode(pre_acts, 8, w_dec, b_dec, impl=impl)
        x_hat, idx, vals = tkd.fused_reference(pre_acts, 8, w_dec, b_dec)
        np.testing.assert_array_equal(got.idx, idx)
        np.testing.assert_array_equal(got.vals, vals)
        assert_close(got.x_hat, x_hat, F32)
    assert float(got.vals[0, 0]) == 1.0 and not np.any(np.asarray(got.vals[0, 1:]))


def _loss(decode, cot):
    return lambda vals, w_dec, b_dec, idx: jnp.sum(decode(vals, idx, w_dec, b_dec) * cot)


@pytest.mark.parametrize("impl", ["dense", "sparse", "pallas"])
def test_vjp_matches_grad_of_reference(impl):
    vals, idx, w_dec, b_dec = make_problem(6, 4, 1000, 100, F32, seed=6)
    cot = jax.random.normal(jax.random.PRNGKey(7), (6, 100), F32)
    got = jax.grad(_loss(lambda *a: tkd.topk_decode(*a, impl=impl), cot), argnums=(0, 1, 2))(vals, w_dec, b_dec, idx)
    want = jax.grad(_loss(tkd.topk_decode_reference, cot), argnums=(0, 1, 2))(vals, w_dec, b_dec, idx)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # rows that are never selected get exactly zero gradient; row 0's feature got 4 rows' worth
    unused = np.setdiff1d(np.arange(1000), np.asarray(idx))
    assert not np.any(np.asarray(got[1])[unused])


def _all_shapes(jaxpr):
    shapes = set()
    for eqn in jaxpr.eqns:
        for v in (*eqn.invars, *eqn.outvars):
            aval = getattr(v, "aval", None)
            shapes.add(tuple(getattr(aval, "shape", ())))
            inner = getattr(aval, "inner_aval", None)  # refs inside kernels
            if inner is not None:
                shapes.add(tuple(inner.shape))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    shapes |= _all_shapes(sub)
    return shapes


@pytest.mark.parametrize("impl", ["dense", "sparse", "pallas"])
def test_backward_forms_no_dense_batch_by_features_matrix(impl):
    vals, idx, w_dec, b_dec = make_problem(6, 4, 1000, 100, F32)
    cot = jnp.ones((6, 100), F32)
    grad = jax.grad(_loss(lambda *a: tkd.topk_decode(*a, impl=impl), cot), argnums=(0, 1, 2))
    shapes = _all_shapes(jax.make_jaxpr(grad)(vals, w_dec, b_dec, idx).jaxpr)
    assert (1000, 100) in shapes  # the walk does see the d_W_dec accumulator
    assert (6, 1000) not in shapes
    if impl != "dense":  # the dense forward gathers [B, K, D]; the loops, the kernel and the backward do not
        assert (6, 4, 100) not in shapes


def test_dispatch_choices():
    shapes = (4096, 32, 16384, 768)
    assert tkd.resolve_impl("auto", shapes, F32, platform="cpu") == "sparse"
    assert tkd.resolve_impl("auto", shapes, BF16, platform="tpu") == "pallas_tpu"
    assert tkd.resolve_impl("auto", shapes, BF16, platform="gpu") == "pallas_gpu"
    assert tkd.resolve_impl("pallas", shapes, F32, platform="cpu") == "pallas_gpu"
    assert tkd.resolve_impl("auto", (8, 2048, 16384, 768), F32, platform="tpu") == "sparse"
    with pytest.raises(ValueError, match="K=2048 needs 16.1 MiB of VMEM"):
        tkd.resolve_impl("pallas_tpu", (8, 2048, 16384, 768), F32, platform="tpu")
    assert tkd.can_use_pallas("tpu", (8, 1024, 16384, 768), "bfloat16")
    with pytest.raises(ValueError, match="impl='fast'; choose one of"):
        tkd.resolve_impl("fast", shapes, F32)
    assert tkd.can_use_pallas("cuda", shapes, "float16") and not tkd.can_use_pallas("tpu", shapes, "float16")
    assert not tkd.can_use_pallas("cpu", shapes) and not tkd.can_use_pallas("gpu", (0, 32, 16384, 768))


def test_auto_on_cpu_is_the_sparse_loop_and_keeps_leading_axes():
    assert tkd.current_platform() == "cpu"
    vals, idx, w_dec, b_dec = make_problem(6, 4, 256, 64, BF16)
    out = tkd.topk_decode(vals.reshape(2, 3, 4), idx.reshape(2, 3, 4), w_dec, b_dec)
    assert out.shape == (2, 3, 64) and out.dtype == BF16
    np.testing.assert_array_equal(out.reshape(6, 64), tkd.topk_decode_reference(vals, idx, w_dec, b_dec))


# ---------------------------------------------------------------------------------------------
# Lowering without the hardware: jax.export for another platform runs the Pallas -> Triton / Mosaic
# lowering (and its checks: power-of-two Triton tensors, the TPU (8, 128) block rule, MLIR
# verification), so a kernel that no longer lowers fails here, in CI, on a CPU.


def _shape_structs(n_rows, k, n_feat, d_model, dtype):
    return (jax.ShapeDtypeStruct((n_rows, k), F32), jax.ShapeDtypeStruct((n_rows, k), jnp.int32),
            jax.ShapeDtypeStruct((n_feat, d_model), dtype), jax.ShapeDtypeStruct((d_model,), dtype))


def _train_step(impl):
    def step(vals, idx, w_dec, b_dec):
        def loss(vals, w_dec, b_dec):
            x_hat = tkd.topk_decode(vals, idx, w_dec, b_dec, impl=impl, interpret=False)
            return jnp.sum(jnp.square(x_hat.astype(F32)))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(vals, w_dec, b_dec)
    return step


def _check_serialized(exported, platform, n_out):
    assert exported.platforms == (platform,) and len(exported.mlir_module_serialized) > 0
    if importlib.util.find_spec("flatbuffers") is None:
        return  # Exported.serialize needs the optional `flatbuffers` package
    restored = jax.export.deserialize(exported.serialize())
    assert restored.platforms == (platform,) and len(restored.out_avals) == n_out


def _export_cuda(fn, args):
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_TARGETS]
    try:
        return jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=checks)(*args)
    except RuntimeError as e:
        # jaxlib > 0.10.2 compiles Triton IR to PTX while lowering, which needs the CUDA plugin
        if "Triton compilation handler" in str(e):
            pytest.xfail(f"this jaxlib compiles Triton while lowering and has no CUDA plugin: {e}")
        raise


def test_gpu_kernel_exports_for_cuda(monkeypatch):
    from jax._src.pallas.triton import pallas_call_registration as triton_registration

    verified = []
    lower_module = getattr(triton_registration.lowering, "lower_jaxpr_to_triton_module", None)
    if lower_module is not None:  # also run the MLIR verifier on the Triton module it builds
        def lower_and_verify(*args, **kwargs):
            result = lower_module(*args, **kwargs)
            verified.append(result.module.operation.verify())
            return result
        monkeypatch.setattr(triton_registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)

    args = _shape_structs(33, 4, 1000, 100, BF16)
    exported = _export_cuda(lambda *a: tkd.topk_decode_gpu(*a, interpret=False), args)
    assert exported.out_avals[0].shape == (33, 100) and exported.out_avals[0].dtype == BF16
    assert any(t in exported.mlir_module() for t in TRITON_TARGETS)
    _check_serialized(exported, "cuda", 1)
    step = _export_cuda(_train_step("pallas_gpu"), _shape_structs(8, 32, 256, 128, F32))
    _check_serialized(step, "cuda", 4)
    assert lower_module is None or verified == [True, True]


def test_tpu_kernel_exports_for_tpu():
    args = _shape_structs(33, 4, 1000, 100, BF16)
    exported = jax.export.export(jax.jit(lambda *a: tkd.topk_decode_tpu(*a, interpret=False)),
                                 platforms=("tpu",))(*args)
    assert exported.out_avals[0].shape == (33, 100) and exported.out_avals[0].dtype == BF16
    assert "tpu_custom_call" in exported.mlir_module()
    _check_serialized(exported, "tpu", 1)
    step = jax.export.export(jax.jit(_train_step("pallas_tpu")), platforms=("tpu",))(*_shape_structs(8, 32, 256, 128, F32))
    _check_serialized(step, "tpu", 4)


def test_tpu_lowering_enforces_the_block_rule():
    # a [8, 64] block of a [16, 256] array breaks the (8, 128) rule; the lowering must say so
    from jax.experimental import pallas as pl

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    def bad(x):
        spec = pl.BlockSpec((8, 64), lambda i, j: (i, j))
        return pl.pallas_call(copy, out_shape=x, grid=(2, 4), in_specs=[spec], out_specs=spec)(x)

    with pytest.raises(Exception, match="divisible by 8 and 128"):
        jax.export.export(jax.jit(bad), platforms=("tpu",))(jax.ShapeDtypeStruct((16, 256), F32))


# ---------------------------------------------------------------------------------------------
# On the hardware (deselected by default: `pytest -m gpu` / `-m tpu`)


def _hardware_case(platform):
    if tkd.current_platform() != platform:
        pytest.skip(f"needs a {platform}; this backend is {jax.default_backend()}")
    for dtype in (F32, BF16):
        vals, idx, w_dec, b_dec = make_problem(4096, 32, 16384, 768, dtype)
        assert tkd.resolve_impl("auto", (4096, 32, 16384, 768), dtype) == f"pallas_{platform}"
        out = jax.jit(tkd.topk_decode)(vals, idx, w_dec, b_dec)
        assert_close(out, tkd.topk_decode_reference(vals, idx, w_dec, b_dec), dtype)


@pytest.mark.gpu
def test_gpu_kernel_on_gpu():
    _hardware_case("gpu")


@pytest.mark.tpu
def test_tpu_kernel_on_tpu():
    _hardware_case("tpu")
