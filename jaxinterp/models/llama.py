"""The Llama family in Flax NNX, with named intercept sites.

Axes: `B` batch, `T` sequence, `D` d_model, `H` query heads, `G` key/value heads, `K` head_dim,
`F` d_ff, `V` vocab.

Weights are stored as `x @ W` ([in, out]). `rope_layout` says how Q/K rows are ordered: `half`
(HF: rotate the two halves of each head) or `interleaved` (GGUF: rotate pairs (x0, x1), (x2, x3),
...); both give the same attention scores for weights converted between the two layouts.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinterp.models.intercept import Plan, Recorder


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    rope_layout: str = "half"
    """`half` (HF) or `interleaved` (GGUF)."""
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None


class ForwardResult(NamedTuple):
    logits: jax.Array | None
    """[B, T, V] float32, or None when the forward stopped early."""
    captured: dict[str, jax.Array]
    """Captured site values [B, T, D]."""


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope(x_bthk: jax.Array, positions_bt: jax.Array, theta: float, layout: str) -> jax.Array:
    k = x_bthk.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
    ang = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, K/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x = x_bthk.astype(jnp.float32)
    if layout == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
    else:
        x1, x2 = x[..., : k // 2], x[..., k // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_bthk.dtype)


def _param(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype):
        d, h, g, k, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
        self.attn_norm = nnx.Param(jnp.ones((d,), dtype))
        self.wq, self.wk, self.wv = _param((d, h * k), dtype), _param((d, g * k), dtype), _param((d, g * k), dtype)
        self.wo = _param((h * k, d), dtype)
        self.mlp_norm = nnx.Param(jnp.ones((d,), dtype))
        self.w_gate, self.w_up, self.w_down = _param((d, f), dtype), _param((d, f), dtype), _param((f, d), dtype)

    def attention(self, cfg: LlamaConfig, x_btd, positions_bt, mask_btt):
        b, t, _ = x_btd.shape
        h, g, k = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = (x_btd @ self.wq[...]).reshape(b, t, h, k)
        kk = (x_btd @ self.wk[...]).reshape(b, t, g, k)
        v = (x_btd @ self.wv[...]).reshape(b, t, g, k)
        q = rope(q, positions_bt, cfg.rope_theta, cfg.rope_layout)
        kk = rope(kk, positions_bt, cfg.rope_theta, cfg.rope_layout)
        q = q.reshape(b, t, g, h // g, k)
        scores = jnp.einsum("btgrk,bsgk->bgrts", q.astype(jnp.float32), kk.astype(jnp.float32)) / jnp.sqrt(k)
        scores = jnp.where(mask_btt[:, None, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bgrts,bsgk->btgrk", probs, v.astype(jnp.float32)).reshape(b, t, h * k)
        return out.astype(x_btd.dtype) @ self.wo[...]

    def mlp(self, x_btd):
        return (jax.nn.silu(x_btd @ self.w_gate[...]) * (x_btd @ self.w_up[...])) @ self.w_down[...]


class Llama(nnx.Module):
    """A Llama-family decoder. Call through `forward` (jitted) with a `Plan`."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32):
        self.cfg = cfg
        self.embed = _param((cfg.vocab_size, cfg.d_model), dtype)
        self.blocks = nnx.List([Block(cfg, dtype) for _ in range(cfg.n_layers)])
        self.final_norm = nnx.Param(jnp.ones((cfg.d_model,), dtype))
        self.lm_head = None if cfg.tie_embeddings else _param((cfg.d_model, cfg.vocab_size), dtype)

    def __call__(self, tokens_bt, positions_bt, mask_btt, rec: Recorder) -> jax.Array | None:
        cfg = self.cfg
        x = rec("embed", jnp.take(self.embed[...], tokens_bt, axis=0))
        last = rec.plan.last_layer(cfg.n_layers)
        for i, blk in enumerate(self.blocks):
            if i > last or rec.done():
                return None
            x = rec(f"blocks.{i}.resid_pre", x)
            if rec.done():
                return None
            attn = rec(f"blocks.{i}.attn_out",
                       blk.attention(cfg, rms_norm(x, blk.attn_norm[...], cfg.rms_eps), positions_bt, mask_btt))
            x = rec(f"blocks.{i}.resid_mid", x + attn)
            if rec.done():
                return None
            h = rec(f"blocks.{i}.mlp_in", rms_norm(x, blk.mlp_norm[...], cfg.rms_eps))
            mlp = rec(f"blocks.{i}.mlp_out", blk.mlp(h))
            x = rec(f"blocks.{i}.resid_post", x + mlp)
        if rec.done():
            return None
        x = rec("final", rms_norm(x, self.final_norm[...], cfg.rms_eps))
        if rec.done():
            return None
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return (x @ head).astype(jnp.float32)


def causal_mask(attention_mask_bt: jax.Array) -> jax.Array:
    """[B, T, T] bool: query t sees key s <= t where the key is not padding."""
    t = attention_mask_bt.shape[1]
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
    return causal[None] & attention_mask_bt[:, None, :].astype(jnp.bool_)


@partial(jax.jit, static_argnames=("graphdef", "plan"))
def _forward(graphdef, state, tokens_bt, attention_mask_bt, edit_params, plan: Plan) -> ForwardResult:
    model = nnx.merge(graphdef, state)
    positions = jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=1) - 1, 0)
    rec = Recorder(plan, edit_params)
    logits = model(tokens_bt, positions, causal_mask(attention_mask_bt), rec)
    return ForwardResult(logits=logits, captured=rec.captured)


def forward(
    model: Llama,
    tokens_bt: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    plan: Plan = Plan(),
    edit_params: dict[str, Any] | None = None,
) -> ForwardResult:
    """One jitted forward. `attention_mask` [B, T] marks real tokens (left padding allowed: positions
    count real tokens only). Compiled once per (model structure, shapes, plan)."""
    plan.validate(model.cfg.n_layers)
    tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens_bt.shape, jnp.int32)
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, tokens_bt, jnp.asarray(attention_mask), edit_params or {}, plan)


def load_weights(model: Llama, weights: dict[str, Any]) -> Llama:
    """Fill a model from a flat dict of arrays named as in `jaxinterp.models.gguf` (embed,
    layers.{i}.wq, ..., final_norm, lm_head); shapes are checked."""
    def put(param: nnx.Param, name: str):
        if name not in weights:
            raise ValueError(f"weight {name!r} missing from the checkpoint")
        w = jnp.asarray(weights[name], param[...].dtype)
        if w.shape != param[...].shape:
            raise ValueError(f"weight {name!r} has shape {w.shape}; the model expects {param[...].shape}")
        param[...] = w

    put(model.embed, "embed")
    put(model.final_norm, "final_norm")
    if model.lm_head is not None:
        put(model.lm_head, "lm_head")
    for i, blk in enumerate(model.blocks):
        for n in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"):
            put(getattr(blk, n), f"layers.{i}.{n}")
    return model
