"""The sharded train step and the training loop: mesh equivalence, one compile, files on disk."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest
from helpers import tiny_config

from jaxinterp import dictionaries as dl
from jaxinterp.config import MeshConfig
from jaxinterp.data import make_source
from jaxinterp.train import TrainingError, make_mesh, train
from jaxinterp.train.step import build_step, init_state, make_spec, place_state

EVAL_KEYS = ("mse", "explained_variance", "cossim", "l2_ratio", "l0", "l1", "frac_alive", "feature_density_histogram")


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
    # chex keys its trace counter by call stack + source, so builds from one test share a counter.
    chex.clear_trace_counter()
    yield
    chex.clear_trace_counter()


def _run_steps(cfg, mesh_cfg, batches, n_steps, aux_k=False):
    """(state, metrics) after `n_steps` steps on `mesh_cfg`, init from batches[0] (`aux_k`: the
    step with the aux-k loss)."""
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    spec = make_spec(cfg, batches[0].shape[1])
    state = init_state(cfg, spec, [batches[0]])
    chex.clear_trace_counter()
    fns = build_step(cfg, spec, make_mesh(cfg.mesh), state, max_traces=1)
    state = place_state(state, fns)
    metrics = None
    step = fns.step_aux_k if aux_k and fns.step_aux_k is not None else fns.step
    for b in batches[1 : 1 + n_steps]:
        state, metrics = step(state, jax.device_put(b, fns.batch_sharding))
    return jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu"])
def test_sharded_step_matches_single_device(tmp_path, activation):
    # The step with aux-k; dead_tokens = one batch, so from the second step on its second top-k
    # (over the sharded d_sae axis) has dead features to select.
    cfg = tiny_config(tmp_path, dictionary={"activation": activation, "dead_tokens": 256})
    src = make_source(cfg)
    batches = [np.asarray(next(src)) for _ in range(4)]

    one, m_one = _run_steps(cfg, MeshConfig(data=1, model=1), batches, 3, aux_k=True)
    many, m_many = _run_steps(cfg, MeshConfig(data=4, model=2), batches, 3, aux_k=True)

    assert int(one.step) == int(many.step) == 3
    for name in one.params:
        a, b = np.asarray(one.params[name]), np.asarray(many.params[name])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(np.abs(a).max(), 1e-6), err_msg=name)
    for name in one.buffers:
        np.testing.assert_allclose(np.asarray(many.buffers[name]), np.asarray(one.buffers[name]), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(many.tokens_since_fired, one.tokens_since_fired)
    assert m_one.keys() == m_many.keys()
    for name in m_one:
        assert m_many[name] == pytest.approx(m_one[name], rel=1e-5, abs=1e-6), name


def _placed(cfg):
    """(source, first batch, spec, placed state, step fns) for `cfg`, initialised from its first batch."""
    src = make_source(cfg)
    x = np.asarray(next(src))
    spec = make_spec(cfg, x.shape[1])
    state = init_state(cfg, spec, [x])
    fns = build_step(cfg, spec, make_mesh(cfg.mesh), state)
    return src, x, spec, place_state(state, fns), fns


def test_sharded_step_shards_params_and_batch(tmp_path):
    cfg = tiny_config(tmp_path, mesh={"data": 4, "model": 2})
    src, x, spec, state, fns = _placed(cfg)
    # d_sae (64) over model=2: each W_enc shard holds half of the features
    shard_shapes = {s.data.shape for s in state.params["W_enc"].addressable_shards}
    assert shard_shapes == {(spec.d_in, spec.d_sae // 2)}
    xb = jax.device_put(x, fns.batch_sharding)
    assert {s.data.shape for s in xb.addressable_shards} == {(256 // 4, spec.d_in)}


def test_step_compiles_once_over_many_steps(tmp_path):
    # The lr warm-up and the sparsity warm-up change every step: they must be data, not constants.
    cfg = tiny_config(tmp_path, dictionary={"activation": "relu"}, train={"sparsity_warmup_steps": 5})
    src = make_source(cfg)
    x0 = np.asarray(next(src))
    spec = make_spec(cfg, x0.shape[1])
    state = init_state(cfg, spec, [x0])
    fns = build_step(cfg, spec, make_mesh(cfg.mesh), state, max_traces=1)
    state = place_state(state, fns)
    lrs = []
    for _ in range(12):  # raises AssertionError from chex on a second trace
        state, m = fns.step(state, jax.device_put(np.asarray(next(src)), fns.batch_sharding))
        lrs.append(float(m["lr"]))
    assert int(state.step) == 12
    assert lrs[0] < lrs[4]  # the warm-up did move the learning rate


def test_train_loop_compiles_once_and_writes_outputs(tmp_path):
    cfg = tiny_config(tmp_path)
    final = train(cfg, max_traces=1, log=lambda s: None)
    run = tmp_path / "run"

    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert last["final"] is True
    assert last["step"] == cfg.train.steps == 40
    for key in EVAL_KEYS:
        assert key in last, key
    assert last == json.loads(json.dumps(final))
    assert 0.0 < last["explained_variance"] <= 1.0
    assert last["l0"] <= cfg.dictionary.k + 1e-6
    assert "mmcs" in last  # synthetic data knows its true directions
    hist = last["feature_density_histogram"]
    assert sum(hist["counts"]) == cfg.dictionary.d_sae
    # training lines every log_every steps
    assert [l["step"] for l in lines[:-1]] == [10, 20, 30, 40]
    assert all(np.isfinite(l["loss"]) for l in lines[:-1])

    ckpts = run / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps and steps[-1] == 40
    assert len(steps) <= cfg.output.keep_checkpoints
    assert {p.name for p in (ckpts / "40").iterdir()} >= {"state", "data"}

    export = run / "export" / "saelens"
    assert (export / "cfg.json").is_file() and (export / "sae_weights.safetensors").is_file()
    assert json.loads((export / "cfg.json").read_text())["d_sae"] == 64


def test_train_twice_into_same_dir_without_resume_raises(tmp_path):
    cfg = tiny_config(tmp_path, train={"tokens": 256 * 10})
    train(cfg, log=lambda s: None)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, log=lambda s: None)
    # the first run's results are left alone
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_tokens_since_fired_counts_unfired_features(tmp_path):
    # 512 features for 16 true directions in 16 dims: many features never make a row's top 4.
    cfg = tiny_config(tmp_path, data={"synthetic": {"n_features": 16}}, dictionary={"d_sae": 512},
                      mesh={"data": 2, "model": 1})
    src, x0, spec, state, fns = _placed(cfg)
    batch = cfg.train.batch_size
    n_steps = 8
    for _ in range(n_steps):
        x = np.asarray(next(src))
        before = jax.device_get(state)
        # which features fire on this batch, from the pre-step parameters
        fired = np.asarray(dl.encode(spec, before.dictionary, x) > 0).any(0)
        state, _ = fns.step(state, jax.device_put(x, fns.batch_sharding))
        since = np.asarray(jax.device_get(state.tokens_since_fired))
        np.testing.assert_array_equal(since, np.where(fired, 0, np.asarray(before.tokens_since_fired) + batch))
    never = since == n_steps * batch
    assert never.sum() > 0  # some features never fired and their counts grew every step
    assert (since == 0).sum() > 0  # and the ones that fired were reset


def test_dead_features_reported_by_train(tmp_path):
    cfg = tiny_config(tmp_path, data={"synthetic": {"n_features": 16}},
                      dictionary={"d_sae": 512, "dead_tokens": 256 * 5})
    final = train(cfg, log=lambda s: None)
    assert final["dead_fraction"] > 0.1
    assert final["frac_alive"] < 1.0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # once features are dead, the aux-k loss switches on
    assert any(l.get("aux_loss", 0) > 0 for l in lines[:-1])
    assert lines[-2]["dead_fraction"] > 0


@pytest.mark.parametrize("mesh", [MeshConfig(data=1, model=1), MeshConfig(data=4, model=2)], ids=["1dev", "4x2"])
def test_sparse_topk_backward_trains_like_the_dense_path(tmp_path, mesh):
    """TopK through the sparse custom VJPs (no dense [B, d_sae] in the decoder or the encoder's
    backward) reaches the same parameters as the dense path XLA differentiates by itself."""
    cfg = tiny_config(tmp_path, dictionary={"activation": "topk", "dead_tokens": 256})
    src = make_source(cfg)
    batches = [np.asarray(next(src)) for _ in range(4)]
    sparse_cfg = dataclasses.replace(cfg, dictionary=dataclasses.replace(cfg.dictionary, topk_path="sparse"))
    dense_cfg = dataclasses.replace(cfg, dictionary=dataclasses.replace(cfg.dictionary, topk_path="dense"))
    sparse, m_sparse = _run_steps(sparse_cfg, mesh, batches, 4)
    dense, m_dense = _run_steps(dense_cfg, mesh, batches, 4)
    for name in dense.params:
        a, b = np.asarray(dense.params[name]), np.asarray(sparse.params[name])
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(np.abs(a).max(), 1e-6), err_msg=name)
    assert m_sparse["loss"] == pytest.approx(m_dense["loss"], rel=1e-5)


@pytest.mark.parametrize("mesh", [MeshConfig(data=1, model=1), MeshConfig(data=2, model=4)], ids=["1dev", "2x4"])
def test_pallas_kernel_path_trains_like_the_sparse_path(tmp_path, mesh):
    """`topk_path: pallas` (the Pallas decode kernel, in interpret mode on CPU, per device under a
    mesh) gives the same step as the plain-JAX sparse path."""
    cfg = tiny_config(tmp_path, dictionary={"activation": "topk"})
    src = make_source(cfg)
    batches = [np.asarray(next(src)) for _ in range(3)]
    runs = {}
    for path in ("sparse", "pallas"):
        c = dataclasses.replace(cfg, dictionary=dataclasses.replace(cfg.dictionary, topk_path=path))
        runs[path] = _run_steps(c, mesh, batches, 2)
    for name in runs["sparse"][0].params:
        np.testing.assert_allclose(np.asarray(runs["pallas"][0].params[name]), np.asarray(runs["sparse"][0].params[name]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_dimension_that_does_not_divide_is_replicated_alone_and_logged(caplog):
    import logging

    from jax.sharding import PartitionSpec as P

    from jaxinterp.sharding import check_sharded_as_declared, named

    mesh = make_mesh(MeshConfig(data=4, model=2))
    with caplog.at_level(logging.WARNING, logger="jaxinterp.sharding"):
        sh = named(mesh, ("d_model", "d_sae"), (16, 63), name="W_enc")  # 63 features over 2 model devices
        ok = named(mesh, ("batch", "d_sae"), (64, 66), name="acts")
    assert sh.spec == P(None, None) and ok.spec == P("data", "model")
    assert "W_enc: its d_sae axis (63) does not divide mesh axis 'model' (2 devices); that axis is replicated" \
        in caplog.text
    # only the offending axis: the batch axis of a [65, 66] array stays split over `model`'s d_sae
    part = named(mesh, ("batch", "d_sae"), (65, 66), name="half")
    assert part.spec == P(None, "model")
    check_sharded_as_declared(mesh, {"W_enc": ("d_model", "d_sae")}, {"W_enc": sh}, {"W_enc": (16, 63)}, min_size=1)
    flat = make_mesh(MeshConfig(data=8, model=1))  # an axis of one device shards nothing either way
    check_sharded_as_declared(flat, {"W_dec": ("d_sae", "d_model")}, {"W_dec": named(flat, ("d_sae", "d_model"),
                              (64, 16))}, {"W_dec": (64, 16)}, min_size=1)
    with pytest.raises(ValueError, match=r"W_enc \(16, 64\) is sharded as \(None, None\), its axes"):
        check_sharded_as_declared(mesh, {"W_enc": ("d_model", "d_sae")}, {"W_enc": sh}, {"W_enc": (16, 64)},
                                  min_size=1)


def test_outlier_rows_neither_set_the_input_scale_nor_count_in_the_evaluation(tmp_path):
    """`data.outlier_norm`: a few rows 300x the others' norm (a model's massive activations) would
    set the input scale; left out, the scale is that of the typical rows and the final evaluation
    counts them apart."""
    from jaxinterp import load_dictionary
    from jaxinterp.config import SyntheticConfig
    from jaxinterp.data import write_npy
    from jaxinterp.train import train

    acts, _ = write_npy(str(tmp_path / "acts.npy"), SyntheticConfig(n_features=64, d_in=16, p_active=0.05), 16384)
    x = np.load(acts)
    x[::100] *= 300.0  # 164 massive rows (1%), some in the held-out tail
    np.save(acts, x)
    finals = {}
    for ratio in (0.0, 10.0):
        cfg = tiny_config(tmp_path / str(ratio), data={"source": "npy", "path": acts, "outlier_norm": ratio})
        finals[ratio] = train(cfg, log=lambda s: None)
        finals[ratio]["norm_scale"] = float(load_dictionary(cfg.output.dir).params["norm_scale"])
    typical = np.delete(x, np.s_[::100], axis=0)
    want = np.sqrt(16 / np.mean(np.sum(typical**2, -1)))
    assert finals[10.0]["norm_scale"] == pytest.approx(want, rel=0.1)
    assert finals[0.0]["norm_scale"] < 0.5 * want
    assert finals[10.0]["outlier_rows"] >= 1 and "outlier_rows" not in finals[0.0]
    assert finals[10.0]["explained_variance"] > finals[0.0]["explained_variance"]
