"""The optimizer a config names: its learning rate, its update, and the parameters it exports."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxinterp.config import ConfigError, TrainConfig, config_from_dict
from jaxinterp.train.loop import train
from jaxinterp.train.optimizers import BASE_LR, eval_params, make_optimizer, resolved_lr


def test_unset_lr_scales_with_the_number_of_features():
    cfg = TrainConfig()
    assert cfg.lr is None
    assert resolved_lr(cfg, 2**14) == BASE_LR["adam"]
    assert resolved_lr(cfg, 2048) == pytest.approx(BASE_LR["adam"] * math.sqrt(8))
    assert resolved_lr(TrainConfig(optimizer="signum"), 4 * 2**14) == pytest.approx(BASE_LR["signum"] / 2)
    assert resolved_lr(TrainConfig(lr=1e-3), 2048) == 1e-3


def test_signum_moves_every_parameter_by_the_learning_rate():
    cfg = TrainConfig(optimizer="signum", lr=0.01, lr_schedule="constant", lr_warmup_steps=0, momentum=0.0,
                      tokens=4096 * 10)
    tx = make_optimizer(cfg, 64)
    params = {"w": jnp.zeros((3, 4))}
    grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.01 * np.sign(grads["w"]), rtol=1e-6)


def test_clipping_is_off_by_default_and_bounds_the_update_when_set():
    grads = {"w": jnp.full((4,), 100.0)}
    params = {"w": jnp.zeros((4,))}
    base = dict(optimizer="signum", lr=1.0, lr_schedule="constant", lr_warmup_steps=0, momentum=0.0, tokens=4096)
    assert TrainConfig().grad_clip == 0.0
    for clip in (0.0, 1.0):  # signum ignores the scale, so clipping leaves its update unchanged...
        tx = make_optimizer(TrainConfig(**base, grad_clip=clip), 8)
        np.testing.assert_allclose(tx.update(grads, tx.init(params), params)[0]["w"], -1.0)
    adam = dict(base, optimizer="adam")  # ...and Adam's first update is lr * sign(g) whatever the clip
    tx = make_optimizer(TrainConfig(**adam, grad_clip=1.0), 8)
    np.testing.assert_allclose(tx.update(grads, tx.init(params), params)[0]["w"], -1.0, rtol=1e-4)


def test_schedule_free_evaluates_the_average():
    cfg = TrainConfig(optimizer="adam", lr=0.1, lr_schedule="schedule_free", lr_warmup_steps=0, tokens=4096 * 10)
    tx = make_optimizer(cfg, 64)
    params = {"w": jnp.ones((4,))}
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update({"w": 2 * params["w"]}, state, params)
        params = jax.tree.map(jnp.add, params, updates)
    x = eval_params(state, params)
    assert not np.allclose(x["w"], params["w"])  # y (where gradients are taken) is not x
    assert np.all(np.abs(x["w"]) < 1.0)  # and x moved toward the minimum at 0
    assert eval_params(make_optimizer(TrainConfig(), 64).init(params), params) is params


def test_bad_optimizer_settings_name_the_key():
    with pytest.raises(ConfigError, match="train.optimizer"):
        config_from_dict({"train": {"optimizer": "sgd"}})
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        config_from_dict({"train": {"lr_schedule": "step"}})


def test_signum_schedule_free_trains_and_exports_the_average(tmp_path):
    cfg = config_from_dict({
        "data": {"source": "synthetic", "synthetic": {"n_features": 64, "d_in": 16, "p_active": 0.05}},
        "dictionary": {"activation": "topk", "d_sae": 128, "k": 4},
        "train": {"tokens": 256 * 300, "batch_size": 256, "optimizer": "signum", "lr_schedule": "schedule_free"},
        "output": {"dir": str(tmp_path), "progress": False, "eval_tokens": 2048},
    })
    final = train(cfg, log=lambda s: None)
    assert final["lr"] == pytest.approx(BASE_LR["signum"] / math.sqrt(128 / 2**14))
    assert final["mmcs"] > 0.9, final["mmcs"]
    w = load_file(str(tmp_path / "export" / "saelens" / "sae_weights.safetensors"))["W_dec"]
    assert np.all(np.isfinite(w))
