"""Decoder-only transformers in Flax NNX with named intercept sites: the Llama family (Llama,
Llama 3.x, Mistral, SmolLM2), Qwen2, Qwen3, Gemma 2, Gemma 3 and GPT-2, one module with flags.

Axes: `B` batch, `T` query positions, `S` key positions, `D` d_model, `H` query heads, `G` key/value
heads, `R` query heads per key/value head, `K` head_dim, `F` d_ff, `V` vocab.

Weights are stored as `x @ W` ([in, out]). `rope_layout` says how Q/K rows are ordered: `half`
(HF: rotate the two halves of each head) or `interleaved` (GGUF: rotate pairs (x0, x1), (x2, x3),
...); both give the same attention scores for weights converted between the two layouts.

Family differences, all as config flags:
- Llama 3.x: each rotary frequency divided by its factor (`rope_freq_factors`, `llama3_freq_factors`).
- Qwen2: biases on q/k/v (`qkv_bias`).
- Qwen3: RMSNorm over each head's queries and keys before RoPE (`qk_norm`).
- Gemma 3: Gemma 2's layout without soft-capping, with `qk_norm` and a RoPE base of its own on the
  sliding-window layers (`rope_local_theta`; the global layers may be `linear`-scaled).
- Gemma 2: embeddings scaled by sqrt(d_model) (`embed_scale`), RMSNorm weights stored as 1 + w
  (folded in by the loader), GeGLU (`activation="gelu_tanh"`), norms after attention and MLP
  (`post_norms`: the sites `attn_out` / `mlp_out` are the normalised values added to the residual),
  attention scale from `query_pre_attn_scalar`, tanh soft-capping of attention scores and logits,
  sliding-window attention on alternate layers (`windows`).
- GPT-2: learned positions, LayerNorm with biases, a plain GELU MLP, biases everywhere; the fused
  c_attn is split into q/k/v by the loader.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinterp.errors import ModelFileError
from jaxinterp.models.intercept import HELD, Plan, Recorder
from jaxinterp.models.kvcache import CacheWriter


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    family: str = "llama"
    """Informational: llama, qwen2, qwen3, gemma2, gemma3, gpt2."""
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-5
    positions: Literal["rope", "learned"] = "rope"
    max_positions: int | None = None
    """Rows of the learned position table (`positions="learned"`)."""
    rope_theta: float = 10000.0
    rope_layout: Literal["half", "interleaved"] = "half"
    """`half` (HF) or `interleaved` (GGUF)."""
    rope_freq_factors: tuple[float, ...] | None = None
    """Per rotary frequency [head_dim / 2]: its divisor (Llama 3's `llama3` scaling, llama.cpp's
    `rope_freqs`, a `linear` factor); None: unscaled."""
    rope_local_theta: float | None = None
    """The RoPE base of the sliding-window layers where it differs from `rope_theta` (Gemma 3: local
    layers 10,000, global 1,000,000); their frequencies are unscaled unless `rope_local_freq_factors`."""
    rope_local_freq_factors: tuple[float, ...] | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE, weights [head_dim] (Qwen3, Gemma 3)."""
    out_bias: bool = False
    """Biases on the attention output and the MLP's linears (GPT-2)."""
    mlp: Literal["gated", "plain"] = "gated"
    """`gated`: down(act(gate(x)) * up(x)); `plain`: down(act(up(x)))."""
    activation: Literal["silu", "gelu_tanh", "gelu", "relu"] = "silu"
    post_norms: bool = False
    """Norms on the attention and MLP outputs before they join the residual (Gemma 2)."""
    embed_scale: float | None = None
    attn_scale: float | None = None
    """Multiplier of q.k; head_dim ** -0.5 when None."""
    attn_softcap: float | None = None
    final_softcap: float | None = None
    windows: tuple[int | None, ...] | None = None
    """Per layer: a sliding-window size (a key s is seen from t when t - s < window) or None (full)."""
    tie_embeddings: bool = True
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    def window(self, layer: int) -> int | None:
        return None if self.windows is None else self.windows[layer]

    def rope_of(self, layer: int) -> tuple[float, tuple[float, ...] | None]:
        """(base, frequency factors) of `layer`'s RoPE: a sliding-window layer's own where set."""
        if self.rope_local_theta is not None and self.window(layer) is not None:
            return self.rope_local_theta, self.rope_local_freq_factors
        return self.rope_theta, self.rope_freq_factors


class ForwardResult(NamedTuple):
    logits: jax.Array | None
    """[B, T, V] float32, or None when the forward stopped early."""
    captured: dict[str, jax.Array]
    """Captured site values [B, T, D]; a linearised forward (`Plan.linearise`) adds what it froze
    under `HELD` (norm scales, queries and keys, by name)."""


Hold = Callable[[Any], Any] | None
"""`Recorder.hold(name)`: what a linearised forward does with a value it freezes (the norm scales,
the attention's queries and keys), or None in an ordinary forward."""


def _held(hold: Hold, x):
    return x if hold is None else hold(x)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, hold: Hold = None) -> jax.Array:
    """`hold`: applied to the 1/rms scale [..., 1] (a linearised forward freezes it)."""
    x32 = x.astype(jnp.float32)
    y = x32 * _held(hold, jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float, hold: Hold = None) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * _held(hold, jax.lax.rsqrt(var + eps))
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def llama3_freq_factors(head_dim: int, theta: float, *, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_positions: int) -> tuple[float, ...]:
    """The divisor of each rotary frequency under Llama 3's scaling: wavelengths shorter than
    original_max_positions / high_freq_factor keep their frequency, longer than
    original_max_positions / low_freq_factor are slowed `factor` times, and those between are
    interpolated in 1 / wavelength."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = np.where(wavelen > original_max_positions / low_freq_factor, inv_freq / factor,
                      np.where(wavelen < original_max_positions / high_freq_factor, inv_freq,
                               (1 - smooth) * inv_freq / factor + smooth * inv_freq))
    return tuple(float(f) for f in inv_freq / scaled)


def rope(x_bthk: jax.Array, positions_bt: jax.Array, theta: float, layout: str,
         freq_factors: tuple[float, ...] | None = None) -> jax.Array:
    k = x_bthk.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
    if freq_factors is not None:
        inv_freq = inv_freq / jnp.asarray(freq_factors, jnp.float32)
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


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}


def _zeros(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


def _ones(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype))


class Norm(nnx.Module):
    """RMSNorm (weight) or LayerNorm (weight, bias), per `cfg.norm`."""

    def __init__(self, cfg: DecoderConfig, dtype):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = _ones((cfg.d_model,), dtype)
        self.bias = _zeros((cfg.d_model,), dtype) if cfg.norm == "layer" else None

    def __call__(self, x_btd: jax.Array, hold: Hold = None) -> jax.Array:
        if self.bias is None:
            return rms_norm(x_btd, self.weight[...], self.eps, hold)
        return layer_norm(x_btd, self.weight[...], self.bias[...], self.eps, hold)


def _linear(x: jax.Array, w: nnx.Param, b: nnx.Param | None) -> jax.Array:
    y = x @ w[...]
    return y if b is None else y + b[...]


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, dtype):
        d, h, g, k, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
        self.layer = layer
        self.attn_norm = Norm(cfg, dtype)
        self.wq, self.wk, self.wv = _zeros((d, h * k), dtype), _zeros((d, g * k), dtype), _zeros((d, g * k), dtype)
        qb = cfg.qkv_bias
        self.bq = _zeros((h * k,), dtype) if qb else None
        self.bk = _zeros((g * k,), dtype) if qb else None
        self.bv = _zeros((g * k,), dtype) if qb else None
        self.q_norm = _ones((k,), dtype) if cfg.qk_norm else None
        self.k_norm = _ones((k,), dtype) if cfg.qk_norm else None
        self.wo = _zeros((h * k, d), dtype)
        self.bo = _zeros((d,), dtype) if cfg.out_bias else None
        self.post_attn_norm = Norm(cfg, dtype) if cfg.post_norms else None
        self.mlp_norm = Norm(cfg, dtype)
        self.w_gate = _zeros((d, f), dtype) if cfg.mlp == "gated" else None
        self.w_up, self.w_down = _zeros((d, f), dtype), _zeros((f, d), dtype)
        self.b_up = _zeros((f,), dtype) if cfg.out_bias else None
        self.b_down = _zeros((d,), dtype) if cfg.out_bias else None
        self.post_mlp_norm = Norm(cfg, dtype) if cfg.post_norms else None

    def qkv(self, cfg: DecoderConfig, x_btd, positions_bt):
        """Rotated queries [B, T, H, K], keys and values [B, T, G, K]."""
        b, t, _ = x_btd.shape
        h, g, k = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = _linear(x_btd, self.wq, self.bq).reshape(b, t, h, k)
        kk = _linear(x_btd, self.wk, self.bk).reshape(b, t, g, k)
        v = _linear(x_btd, self.wv, self.bv).reshape(b, t, g, k)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm[...], cfg.norm_eps)
            kk = rms_norm(kk, self.k_norm[...], cfg.norm_eps)
        if cfg.positions == "rope":
            theta, factors = cfg.rope_of(self.layer)
            q = rope(q, positions_bt, theta, cfg.rope_layout, factors)
            kk = rope(kk, positions_bt, theta, cfg.rope_layout, factors)
        return q, kk, v

    def attend(self, cfg: DecoderConfig, q_bthk, k_bsgk, v_bsgk, mask_bts, hold: Hold = None, hold_norm: Hold = None):
        """Attention output [B, T, D] (after the output projection) over keys/values [B, S, G, K].
        `hold`: applied to (queries, keys), which make the pattern (a linearised forward freezes
        them); `hold_norm`: to the post-norm's scale."""
        b, t, h, k = q_bthk.shape
        g = cfg.n_kv_heads
        scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(k)
        q_s, k_s = _held(hold, (q_bthk, k_bsgk))
        q = q_s.reshape(b, t, g, h // g, k).astype(jnp.float32)
        scores = jnp.einsum("btgrk,bsgk->bgrts", q, k_s.astype(jnp.float32)) * scale
        scores = softcap(scores, cfg.attn_softcap)
        scores = jnp.where(mask_bts[:, None, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bgrts,bsgk->btgrk", probs, v_bsgk.astype(jnp.float32)).reshape(b, t, h * k)
        out = _linear(out.astype(q_bthk.dtype), self.wo, self.bo)
        return out if self.post_attn_norm is None else self.post_attn_norm(out, hold_norm)

    def mlp(self, cfg: DecoderConfig, x_btd, hold_norm: Hold = None):
        act = ACTIVATIONS[cfg.activation]
        up = _linear(x_btd, self.w_up, self.b_up)
        hidden = act(up) if self.w_gate is None else act(x_btd @ self.w_gate[...]) * up
        out = _linear(hidden, self.w_down, self.b_down)
        return out if self.post_mlp_norm is None else self.post_mlp_norm(out, hold_norm)


def layer_mask(cfg: DecoderConfig, layer: int, mask_bts: jax.Array, qpos_bt: jax.Array, kpos_bs: jax.Array):
    """The layer's attention mask: the causal/padding mask, narrowed to its sliding window if any."""
    w = cfg.window(layer)
    if w is None:
        return mask_bts
    return mask_bts & (qpos_bt[:, :, None] - kpos_bs[:, None, :] < w)


class Decoder(nnx.Module):
    """A decoder-only LM. Call through `forward` (jitted) with a `Plan`."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32):
        self.cfg = cfg
        self.embed = _zeros((cfg.vocab_size, cfg.d_model), dtype)
        self.pos_embed = _zeros((cfg.max_positions, cfg.d_model), dtype) if cfg.positions == "learned" else None
        self.blocks = nnx.List([Block(cfg, i, dtype) for i in range(cfg.n_layers)])
        self.final_norm = Norm(cfg, dtype)
        self.lm_head = None if cfg.tie_embeddings else _zeros((cfg.d_model, cfg.vocab_size), dtype)

    def embed_tokens(self, tokens_bt, positions_bt):
        x = jnp.take(self.embed[...], tokens_bt, axis=0)
        if self.cfg.embed_scale is not None:
            x = x * jnp.asarray(self.cfg.embed_scale, x.dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions_bt, axis=0)
        return x

    def logits(self, x_btd):
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return softcap((x_btd @ head).astype(jnp.float32), self.cfg.final_softcap)

    def block(self, i: int, x, positions_bt, mask_bts, kpos_bs, rec: Recorder, cache: CacheWriter | None = None):
        """Block i from its resid_pre to its resid_post (None when the plan is done inside it)."""
        x = self.attention_half(i, x, positions_bt, mask_bts, kpos_bs, rec, cache)
        return None if x is None else self.mlp_half(i, x, rec)

    def attention_half(self, i: int, x, positions_bt, mask_bts, kpos_bs, rec: Recorder,
                       cache: CacheWriter | None = None):
        """resid_pre -> resid_pre + attn_out (the value of resid_mid before its site records it)."""
        cfg, hold, blk = self.cfg, rec.hold, self.blocks[i]
        x = rec(f"blocks.{i}.resid_pre", x)
        if rec.done():
            return None
        q, k, v = blk.qkv(cfg, blk.attn_norm(x, hold(f"blocks.{i}.attn_norm")), positions_bt)
        if cache is not None:
            k, v = cache.write(i, k, v)
        mask = layer_mask(cfg, i, mask_bts, positions_bt, kpos_bs)
        attn = rec(f"blocks.{i}.attn_out", blk.attend(cfg, q, k, v, mask, hold(f"blocks.{i}.qk"),
                                                      hold(f"blocks.{i}.post_attn_norm")))
        return x + attn

    def mlp_half(self, i: int, x, rec: Recorder):
        """resid_mid (recorded here) -> resid_post, or None when the plan is done at resid_mid."""
        cfg, hold, blk = self.cfg, rec.hold, self.blocks[i]
        x = rec(f"blocks.{i}.resid_mid", x)
        if rec.done():
            return None
        h = rec(f"blocks.{i}.mlp_in", blk.mlp_norm(x, hold(f"blocks.{i}.mlp_norm")))
        mlp = rec(f"blocks.{i}.mlp_out", blk.mlp(cfg, h, hold(f"blocks.{i}.post_mlp_norm")))
        return rec(f"blocks.{i}.resid_post", x + mlp)

    def __call__(self, tokens_bt, positions_bt, mask_bts, rec: Recorder,
                 cache: CacheWriter | None = None) -> jax.Array | None:
        """Logits [B, T, V] (None when the plan stops early). Without a cache, queries attend over
        the same T positions (`mask_bts` is [B, T, T]); with one, this forward's keys/values are
        written into it and queries attend over all its slots (`mask_bts` is `cache.mask_bts`)."""
        kpos_bs = positions_bt if cache is None else cache.pos
        x = rec("embed", self.embed_tokens(tokens_bt, positions_bt))
        last = rec.plan.last_layer(self.cfg.n_layers)
        for i in range(self.cfg.n_layers):
            if i > last or rec.done():
                return None
            x = self.block(i, x, positions_bt, mask_bts, kpos_bs, rec, cache)
            if x is None:
                return None
        if rec.done():
            return None
        x = rec("final", self.final_norm(x, rec.hold("final_norm")))
        if rec.done():
            return None
        return self.logits(x)


def causal_mask(attention_mask_bt: jax.Array) -> jax.Array:
    """[B, T, T] bool: query t sees key s <= t where the key is not padding."""
    t = attention_mask_bt.shape[1]
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
    return causal[None] & attention_mask_bt[:, None, :].astype(jnp.bool_)


def positions_of(attention_mask_bt: jax.Array) -> jax.Array:
    """Position of each token counting real tokens only (left padding gets 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=1) - 1, 0)


def traced_forward(graphdef, state, tokens_bt, attention_mask_bt, edit_params, plan: Plan) -> ForwardResult:
    """The forward on a split model, for use inside a caller's own `jit` (the weights stay arguments,
    never constants of the compiled function)."""
    model = nnx.merge(graphdef, state)
    positions = positions_of(attention_mask_bt)
    rec = Recorder(plan, edit_params, positions)
    logits = model(tokens_bt, positions, causal_mask(attention_mask_bt), rec)
    captured = rec.captured | ({HELD: rec.held} if plan.linearise else {})
    return ForwardResult(logits=logits, captured=captured)


_forward = jax.jit(traced_forward, static_argnames=("graphdef", "plan"))


def forward(
    model: Decoder,
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


def param_names(model: Decoder) -> list[tuple[str, nnx.Param]]:
    """(flat name, parameter) for every weight the model holds: embed, pos_embed, lm_head,
    final_norm.weight/.bias, layers.{i}.{wq, bq, ..., attn_norm.weight, ...}."""
    out = [("embed", model.embed), ("pos_embed", model.pos_embed), ("lm_head", model.lm_head),
           ("final_norm.weight", model.final_norm.weight), ("final_norm.bias", model.final_norm.bias)]
    for i, blk in enumerate(model.blocks):
        for n in ("wq", "bq", "wk", "bk", "wv", "bv", "q_norm", "k_norm", "wo", "bo", "w_gate", "w_up", "b_up",
                  "w_down", "b_down"):
            out.append((f"layers.{i}.{n}", getattr(blk, n)))
        for n in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"):
            norm = getattr(blk, n)
            if norm is not None:
                out += [(f"layers.{i}.{n}.weight", norm.weight), (f"layers.{i}.{n}.bias", norm.bias)]
    return [(n, p) for n, p in out if p is not None]


def load_weights(model: Decoder, weights: dict[str, Any]) -> Decoder:
    """Fill a model from a flat dict of arrays named as in `param_names`; every weight the model
    holds must be present with its shape, and nothing else."""
    names = param_names(model)
    for name, param in names:
        if name not in weights:
            raise ModelFileError(f"weight {name!r} missing from the checkpoint")
        w = jnp.asarray(weights[name], param[...].dtype)
        if w.shape != param[...].shape:
            raise ModelFileError(f"weight {name!r} has shape {w.shape}; the model expects {param[...].shape}")
        param[...] = w
    extra = sorted(set(weights) - {n for n, _ in names})
    if extra:
        raise ModelFileError(f"checkpoint weights {extra[:5]} have no place in the model; the config does not match")
    return model
