"""Sparse dictionaries (SAEs, transcoders, skip transcoders) as pure functions over a parameter dict.

Axes: `B` batch, `D` d_in, `O` d_out (= d_in for an SAE), `F` d_sae, `K` top-k.

A dictionary is a flat dict of arrays:
  trainable  W_enc [D, F], b_enc [F], W_dec [F, O], b_dec [O]
             (jumprelu: threshold [F]; gated: b_gate, b_mag, r_mag [F] in place of b_enc;
             transcoders: b_in [D], the pre-encoder bias; skip transcoders: W_skip [O, D])
  buffers    norm_scale [] (inputs are multiplied by it, so that E||x||^2 = d_in),
             norm_scale_out [] (transcoders: the same for targets),
             threshold [F] for batchtopk (an EMA, the inference-time JumpReLU threshold)

The kind is two values (`kinds.Architecture`, `kinds.Activation`) that the spec names; nothing
here branches on a name. `encode` takes raw inputs and `decode` returns raw target units: the
normalisation is applied inside and undone on the way out. A transcoder trains on batches that hold
input and target side by side ([B, D + O], see `split`). `forward` returns everything a train step
and the evals need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinterp.errors import UsageError
from jaxinterp.dictionaries import kinds, ops
from jaxinterp.dictionaries.sparse import scatter_dense, topk_decode

Params = dict[str, jax.Array]

ROW_NORMS = ("none", "layer_norm", "constant_norm_rescale")

def selects_k(activation: str) -> bool:
    """Whether the activation keeps `k` features per row (or per batch average): topk, batchtopk."""
    return kinds.activation(activation).selects_k


def sparsity_penalty(activation: str) -> str | None:
    """The penalty that `LossWeights.sparsity` weights: "l1" (relu, gated), "l0" (jumprelu), or
    None (the top-k kinds, sparse by construction)."""
    return kinds.activation(activation).sparsity_penalty


@dataclasses.dataclass(frozen=True)
class DictionarySpec:
    """The static shape of a dictionary (hashable, so it can be a jit static argument)."""

    activation: str
    """relu, topk, batchtopk, jumprelu or gated."""
    d_in: int
    d_sae: int
    k: int = 32
    """Active features per row (topk; the batch average for batchtopk)."""
    aux_k: int = 0
    """Dead features in the aux-k loss (topk, batchtopk; 0 disables it)."""
    jumprelu_bandwidth: float = 0.05
    """Rectangle-kernel width of the JumpReLU threshold pseudo-derivative."""
    compute_dtype: str = "float32"
    """Dtype of the matmuls."""
    topk_path: str = "auto"
    """topk decoding: auto, pallas, sparse or dense (see `DictionaryConfig.topk_path`)."""
    architecture: str = "sae"
    """sae, transcoder or skip_transcoder."""
    d_out: int | None = None
    """Width of what is reconstructed (None: d_in)."""
    matryoshka_widths: tuple[int, ...] = ()
    """Nested prefixes (Matryoshka): strictly increasing widths, the last = d_sae; the loss averages
    the reconstruction error of every prefix. Empty: one width."""
    row_norm: str = "none"
    """A per-row input normalisation before the (scalar) `norm_scale` (dictionaries read from SAELens
    configs): "none"; "layer_norm" (x -> (x - mean) / (std + 1e-5), undone on an SAE's output);
    "constant_norm_rescale" (x -> x sqrt(d_in) / ||x||, undone likewise). A transcoder's output is
    not renormalised (SAELens' rule). Such a dictionary encodes and reconstructs; its decoder alone
    (`decode`, steering) needs the row's statistics and is refused."""

    def __post_init__(self) -> None:
        if self.row_norm not in ROW_NORMS:
            raise UsageError(f"row_norm={self.row_norm!r}; choose one of {list(ROW_NORMS)}")
        if self.kind.selects_k and not 0 < self.k <= self.d_sae:
            raise UsageError(f"k={self.k} must be in [1, d_sae={self.d_sae}]")
        widths = tuple(int(w) for w in self.matryoshka_widths)
        object.__setattr__(self, "matryoshka_widths", widths)
        if widths and (widths[-1] != self.d_sae or widths[0] < 1 or any(a >= b for a, b in zip(widths, widths[1:]))):
            raise UsageError(f"matryoshka_widths={list(widths)} must increase strictly from >= 1 to d_sae={self.d_sae}")
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        elif not self.arch.reads_target and self.d_out != self.d_in:
            raise UsageError(f"d_out={self.d_out} differs from d_in={self.d_in}, but a {self.architecture} "
                             "reconstructs its input; use a transcoder architecture")

    @property
    def kind(self) -> kinds.Activation:
        """The activation as a value (raises on an unknown name)."""
        return kinds.activation(self.activation)

    @property
    def arch(self) -> kinds.Architecture:
        """The architecture as a value (raises on an unknown name)."""
        return kinds.architecture(self.architecture)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        return self.kind.buffers + self.arch.buffers

    @property
    def widths(self) -> tuple[int, ...]:
        """The prefix widths a reconstruction is scored at (just d_sae unless Matryoshka)."""
        return self.matryoshka_widths or (self.d_sae,)

    @property
    def batch_width(self) -> int:
        """Width of a training batch: d_in, or d_in + d_out when it carries targets."""
        return self.d_in + self.d_out if self.arch.reads_target else self.d_in


class LossWeights(NamedTuple):
    """Coefficients of the loss terms (arrays or floats: data, so warm-ups never recompile)."""

    sparsity: float | jax.Array = 0.0
    """l1_coefficient (relu, gated) or l0_coefficient (jumprelu)."""
    aux: float | jax.Array = 0.0
    """aux-k (topk, batchtopk) or the gated auxiliary reconstruction loss."""
    row_topk: bool | jax.Array = False
    """batchtopk: keep the top k of each row instead of the top k x B of the batch (its warm-up)."""


class LossTerms(NamedTuple):
    total: jax.Array
    """The objective that is differentiated."""
    mse: jax.Array
    """Mean over rows of ||x - x_hat||^2 (normalised units), at the full width."""
    sparsity: jax.Array
    """Weighted L1 / L0 term (0 for topk, batchtopk)."""
    aux: jax.Array
    """Weighted auxiliary term: aux-k (topk, batchtopk) or gated's gate reconstruction."""
    prefix_mse: jax.Array | None = None
    """Matryoshka: the mse of each prefix width [G] (the last is `mse`); their mean is trained."""


class ForwardOutput(NamedTuple):
    recon: jax.Array
    """Reconstruction [B, O] of the target in its own units."""
    feature_acts: jax.Array
    """Feature activations [B, F] (zero where inactive)."""
    pre_acts: jax.Array
    """Encoder pre-activations [B, F] (gated: the gate pre-activations)."""
    losses: LossTerms
    """The loss terms."""
    top_idx: jax.Array | None = None
    """topk only: indices [B, K] of the selected features (saves a dense pass over [B, F])."""
    top_vals: jax.Array | None = None
    """topk only: their activations [B, K] (>= 0)."""
    batch_threshold: jax.Array | None = None
    """batchtopk training only: smallest selected activation in this batch (feeds the EMA)."""


# ---------------------------------------------------------------------------------------------
# init


def init(key: jax.Array, spec: DictionarySpec, *, threshold: float = 0.0) -> Params:
    """Random unit-norm decoder rows, zero biases; an SAE's encoder is its decoder transposed, a
    transcoder's (which reads another space) has its own random unit-norm columns.

    `threshold` initialises the JumpReLU threshold (ignored by other kinds).
    """
    k_dec, k_enc = jax.random.split(key) if spec.arch.reads_target else (key, None)
    w_dec = jax.random.normal(k_dec, (spec.d_sae, spec.d_out), jnp.float32)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    w_enc = w_dec.T
    if k_enc is not None:
        w_enc = jax.random.normal(k_enc, (spec.d_in, spec.d_sae), jnp.float32)
        w_enc = w_enc / jnp.linalg.norm(w_enc, axis=0, keepdims=True)
    p: Params = {
        "W_enc": w_enc,
        "W_dec": w_dec,
        "b_dec": jnp.zeros((spec.d_out,), jnp.float32),
        "norm_scale": jnp.ones((), jnp.float32),
    }
    return p | spec.arch.init(spec.d_in, spec.d_out) | spec.kind.init_features(spec.d_sae, threshold)


def split_params(spec: DictionarySpec, params: Params) -> tuple[Params, Params]:
    """(trainable, buffers)."""
    buf = {k: v for k, v in params.items() if k in spec.buffer_names}
    return {k: v for k, v in params.items() if k not in buf}, buf


# ---------------------------------------------------------------------------------------------
# encode / decode


def _mm(a: jax.Array, b: jax.Array, spec: DictionarySpec) -> jax.Array:
    return ops.mm(a, b, spec.compute_dtype)


def split(spec: DictionarySpec, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(input [..., D], target [..., O]) of a training batch: an SAE's target is its input, a
    transcoder's batch holds both side by side."""
    if not spec.arch.reads_target:
        return batch, batch
    return batch[..., : spec.d_in], batch[..., spec.d_in :]


def _normalise(params: Params, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) * params["norm_scale"]


def _row_stats(spec: DictionarySpec, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(shift [B, 1], scale [B, 1]) of each row under `spec.row_norm`: x -> (x - shift) / scale."""
    x = x.astype(jnp.float32)
    if spec.row_norm == "layer_norm":  # torch's std: the unbiased estimate
        mu = jnp.mean(x, axis=-1, keepdims=True)
        return mu, jnp.std(x - mu, axis=-1, keepdims=True, ddof=1) + 1e-5
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True) / spec.d_in**0.5
    return jnp.zeros_like(norm), norm


def _row_normalise(spec: DictionarySpec, x: jax.Array) -> jax.Array:
    if spec.row_norm == "none":
        return x
    shift, scale = _row_stats(spec, x)
    return (x.astype(jnp.float32) - shift) / scale


def target_scale(spec: DictionarySpec, params: Params) -> jax.Array:
    """The factor that normalises targets (the input's `norm_scale` for an SAE)."""
    return params[spec.arch.target_scale]


def _pre_bias(spec: DictionarySpec, params: Params) -> jax.Array:
    return params[spec.arch.pre_bias]


def _pre_acts(spec: DictionarySpec, params: Params, xn: jax.Array) -> jax.Array:
    return _mm(xn - _pre_bias(spec, params), params["W_enc"], spec) + params[spec.kind.encoder_bias]


def _features(spec: DictionarySpec, params: Params) -> dict[str, jax.Array]:
    return {name: params[name] for name in spec.kind.feature_params}


def _encode_normalised(spec: DictionarySpec, params: Params, xn: jax.Array) -> jax.Array:
    """Inference-time feature activations [B, F] from normalised inputs."""
    if spec.kind.row_topk:
        vals, idx = ops.topk(_pre_acts(spec, params, xn), spec.k)
        return scatter_dense(jax.nn.relu(vals), idx, spec.d_sae)
    raw = _mm(xn - _pre_bias(spec, params), params["W_enc"], spec)
    return spec.kind.activate(raw, _features(spec, params))


def encode_sparse(spec: DictionarySpec, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """The code of raw inputs [B, D] as (values [B, K], feature ids [B, K]), largest first (values
    0 where fewer fire), for kinds that select k features per row; None for the others (use `encode`)."""
    if not spec.kind.row_topk:
        return None
    vals, idx = ops.topk(_pre_acts(spec, params, _normalise(params, _row_normalise(spec, x))), spec.k)
    return jax.nn.relu(vals), idx


def encode_selected(spec: DictionarySpec, params: Params, x_btd: jax.Array, ids_bs: jax.Array) -> jax.Array:
    """Activations [B, T, S] of features `ids_bs` [B, S] (per row of the batch) of raw inputs
    `x_btd`, from their encoder columns only: the formula of `encode`, restricted to those columns
    (top-k: the value a feature takes when selected, as the row-wise selection needs every column)."""
    xc = _normalise(params, x_btd) - _pre_bias(spec, params)
    w = jnp.take(params["W_enc"], ids_bs, axis=1)  # [D, B, S]
    raw = jnp.einsum("btd,dbs->bts", xc, w)
    feat = {name: v[ids_bs][:, None, :] for name, v in _features(spec, params).items()}
    return spec.kind.activate(raw, feat)


def encode(spec: DictionarySpec, params: Params, x: jax.Array) -> jax.Array:
    """Feature activations [B, F] of raw inputs [B, D] (batchtopk uses its inference threshold)."""
    return _encode_normalised(spec, params, _normalise(params, _row_normalise(spec, x)))


def _prefix_mask(spec: DictionarySpec, width) -> jax.Array | float:
    return 1.0 if width is None else (jnp.arange(spec.d_sae) < width).astype(jnp.float32)


def decode(spec: DictionarySpec, params: Params, feature_acts: jax.Array, *, width=None) -> jax.Array:
    """Reconstruction [B, O] in raw target units from feature activations [B, F] (a skip
    transcoder's skip path, which needs the input, is not included: see `reconstruct`). `width`
    (an int or a traced scalar: data, never a recompile) decodes with the first `width` features
    only, a Matryoshka dictionary's prefix."""
    xn_hat = _mm(feature_acts * _prefix_mask(spec, width), params["W_dec"], spec) + params["b_dec"]
    return xn_hat / target_scale(spec, params)


def decode_selected(spec: DictionarySpec, params: Params, coef_bts: jax.Array, ids_bs: jax.Array) -> jax.Array:
    """sum_s coef[b, t, s] W_dec[ids[b, s]] [B, T, O] in raw target units (no bias): the change of
    `decode` when the activations of features `ids_bs` [B, S] change by `coef_bts`."""
    rows = params["W_dec"][ids_bs]  # [B, S, O]
    return jnp.einsum("bts,bso->bto", coef_bts, rows) / target_scale(spec, params)


def decode_sparse(spec: DictionarySpec, params: Params, vals_bk: jax.Array, ids_bk: jax.Array) -> jax.Array:
    """`decode` of the sparse code (values [B, K], ids [B, K]) [B, O], without a dense [B, F]."""
    xn_hat = topk_decode(vals_bk.astype(jnp.float32), ids_bk, params["W_dec"], path=spec.topk_path)
    return (xn_hat + params["b_dec"]) / target_scale(spec, params)


def _group_cumsum(spec: DictionarySpec, params: Params, acts: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """acts[:, :w] @ W_dec[:w] [G, B, O] for each width w (normalised, no bias), in one pass: each
    group of features decoded once and the groups accumulated."""
    parts = [_mm(acts[:, a:b], params["W_dec"][a:b], spec) for a, b in zip((0, *widths[:-1]), widths)]
    return jnp.cumsum(jnp.stack(parts), axis=0)


def decode_prefixes(spec: DictionarySpec, params: Params, feature_acts: jax.Array, x: jax.Array | None = None
                    ) -> jax.Array:
    """`decode(..., width=w)` for every width of `spec.widths` at once [G, B, O] (raw target units),
    plus the skip path of raw inputs `x` when given."""
    xn_hat = _group_cumsum(spec, params, feature_acts, spec.widths) + params["b_dec"]
    if x is not None:
        xn_hat = xn_hat + spec.arch.skip_out(params, _normalise(params, x), spec.compute_dtype)
    return xn_hat / target_scale(spec, params)


def skip_out(spec: DictionarySpec, params: Params, x: jax.Array) -> jax.Array | float:
    """The skip path's output [B, O] for raw inputs `x` in raw target units (0.0 without one)."""
    out = spec.arch.skip_out(params, _normalise(params, x), spec.compute_dtype)
    return out if isinstance(out, float) else out / target_scale(spec, params)


def reconstruct(spec: DictionarySpec, params: Params, x: jax.Array, *, width=None) -> jax.Array:
    """The dictionary's output [B, O] for raw inputs [B, D] at inference: decode(encode(x)) plus the
    skip path; topk decodes its K selected rows only (the Pallas kernel on GPU/TPU, per
    `spec.topk_path`), never a dense [B, F] product. `width`: a Matryoshka prefix (the full code's
    features below `width`; data, as in `decode`)."""
    if spec.row_norm != "none":  # normalise each row, and undo it on an SAE's output
        shift, scale = _row_stats(spec, x)
        plain = dataclasses.replace(spec, row_norm="none")
        xr = (x.astype(jnp.float32) - shift) / scale
        out = reconstruct(plain, params, xr, width=width)
        if spec.arch.reads_target:  # SAELens' skip path reads the raw input
            return out if not spec.arch.skip else out - skip_out(plain, params, xr) + skip_out(plain, params, x)
        return out * scale + shift
    if spec.kind.row_topk and spec.topk_path != "dense":
        vals, idx = ops.topk(_pre_acts(spec, params, _normalise(params, x)), spec.k)
        vals = jax.nn.relu(vals) if width is None else jnp.where(idx < width, jax.nn.relu(vals), 0.0)
        return decode_sparse(spec, params, vals, idx) + skip_out(spec, params, x)
    return decode(spec, params, encode(spec, params, x), width=width) + skip_out(spec, params, x)


class AdaptiveRule(NamedTuple):
    """How many features each row keeps at inference, as data (new values never recompile)."""

    threshold: float | jax.Array = 0.0
    """Features whose activation is at or below it are dropped."""
    error_budget: float | jax.Array = 0.0
    """Each row takes the smallest prefix width (of `spec.widths`) whose relative error
    ||y - y_hat||^2 / ||y||^2 is at most this (0: the full width)."""


class AdaptiveOutput(NamedTuple):
    recon: jax.Array
    """[B, O] the reconstruction each row's rule chose."""
    width: jax.Array
    """[B] the prefix width each row used."""
    l0: jax.Array
    """[B] features each row used."""


def adaptive_reconstruct(spec: DictionarySpec, params: Params, x: jax.Array, rule: AdaptiveRule,
                         target: jax.Array | None = None) -> AdaptiveOutput:
    """Reconstruct raw inputs [B, D] with a per-row sparsity chosen by `rule`: drop activations at
    or below `rule.threshold`, then take the smallest Matryoshka prefix whose error against
    `target` (default: the input, for an SAE) fits `rule.error_budget`. Every prefix is decoded in
    one pass (group by group, accumulated), and the choice is a per-row select on the device."""
    y = (x if target is None else target).astype(jnp.float32)
    f = encode(spec, params, x)
    f = jnp.where(f > rule.threshold, f, 0.0)
    recons = decode_prefixes(spec, params, f, x)  # [G, B, O]
    err = jnp.sum((y[None] - recons) ** 2, -1) / jnp.maximum(jnp.sum(y**2, -1), 1e-12)  # [G, B]
    fits = (err <= rule.error_budget).at[-1].set(True)
    g = jnp.argmax(fits, axis=0)  # the first prefix that fits
    widths = jnp.asarray(spec.widths, jnp.int32)[g]
    recon = jnp.take_along_axis(recons, g[None, :, None], axis=0)[0]
    l0 = jnp.sum((f > 0) & (jnp.arange(spec.d_sae)[None, :] < widths[:, None]), -1)
    return AdaptiveOutput(recon, widths, l0)


# ---------------------------------------------------------------------------------------------
# forward with losses (training)


def _mse(xn: jax.Array, xn_hat: jax.Array) -> jax.Array:
    return jnp.mean(jnp.sum((xn - xn_hat) ** 2, axis=-1))


def _inner_prefixes(spec: DictionarySpec, params: Params, t: kinds.TrainTerms) -> list[jax.Array]:
    """Decodes [B, O] (no bias) of each Matryoshka prefix but the full one, from the step's one
    encode: the selected values masked by prefix through the sparse decode (its backward included),
    or dense activations accumulated group by group."""
    inner = spec.matryoshka_widths[:-1]
    if t.top_idx is not None and spec.topk_path != "dense":
        return [topk_decode(jnp.where(t.top_idx < w, t.top_vals, 0.0), t.top_idx, params["W_dec"], path=spec.topk_path,
                            counts=t.top_counts) for w in inner]
    return list(_group_cumsum(spec, params, t.acts, inner))


AUX_K_POOL = 4
"""Aux-k picks its features among at most `AUX_K_POOL * aux_k` dead ones per step."""
AUX_K_ROW_STRIDE = 4
"""Aux-k reads every `AUX_K_ROW_STRIDE`-th row of the batch (its top-k dominated the step's cost;
on the loop benchmark's task the final metrics matched those of every row to four digits)."""


def aux_k_pool(spec: DictionarySpec) -> int:
    """How many features an aux-k step considers: all of them when fewer are dead."""
    return min(spec.d_sae, AUX_K_POOL * spec.aux_k)


def _aux_k_loss(
    spec: DictionarySpec, params: Params, xn: jax.Array, residual: jax.Array, dead_mask: jax.Array, key: jax.Array
) -> jax.Array:
    """Aux-k (Gao et al. 2024): the top `aux_k` dead features reconstruct the main model's
    residual; normalised by the residual's variance and scaled down when fewer are dead.

    The top-k runs over a pool of `aux_k_pool(spec)` features, dead ones first (a random choice
    among them when more are dead): the encoder columns of the pool [D, M], a [B, M] top-k and a
    dense [B, M] x [M, D] decode, a fraction of the main step's cost where the full formula costs a
    second [B, F] encoder pass and top-k. Exact whenever at most M features are dead."""
    m = aux_k_pool(spec)
    priority = dead_mask.astype(jnp.float32) + 0.5 * jax.random.uniform(key, dead_mask.shape)
    _, pool = jax.lax.top_k(priority, m)
    pool_dead = dead_mask[pool]
    pre = _mm(xn - _pre_bias(spec, params), params["W_enc"][:, pool], spec) + params[spec.kind.encoder_bias][pool]
    vals, idx = ops.topk(jnp.where(pool_dead, pre, -jnp.inf), spec.aux_k)
    vals = jnp.where(jnp.isfinite(vals), jax.nn.relu(vals), 0.0)
    e_hat = _mm(scatter_dense(vals, idx, m), params["W_dec"][pool], spec)
    e = jax.lax.stop_gradient(residual)
    variance = jnp.sum((e - e.mean(0)) ** 2)
    scale = jnp.minimum(jnp.sum(dead_mask) / spec.aux_k, 1.0)
    return scale * jnp.sum((e_hat - e) ** 2) / jnp.maximum(variance, 1e-12)


def has_aux_k(spec: DictionarySpec) -> bool:
    return selects_k(spec.activation) and spec.aux_k > 0


def aux_k_loss(spec: DictionarySpec, params: Params, batch: jax.Array, recon: jax.Array, dead_mask: jax.Array,
               key: jax.Array) -> jax.Array:
    """The (unweighted) aux-k loss of a raw training batch (see `split`) given the main
    reconstruction `recon` [B, O] (raw units, treated as a constant) and the dead features
    `dead_mask` [F]; `key` draws the pool when more than `aux_k_pool(spec)` features are dead."""
    if AUX_K_ROW_STRIDE > 1 and batch.shape[0] % AUX_K_ROW_STRIDE == 0:
        batch, recon = (a.reshape(-1, AUX_K_ROW_STRIDE, a.shape[-1])[:, 0] for a in (batch, recon))
    x, y = split(spec, batch)
    scale = target_scale(spec, params)
    residual = y.astype(jnp.float32) * scale - jax.lax.stop_gradient(recon) * scale
    return _aux_k_loss(spec, params, _normalise(params, x), residual, dead_mask, key)


def forward(
    spec: DictionarySpec,
    params: Params,
    batch: jax.Array,
    weights: LossWeights = LossWeights(),
    *,
    training: bool = True,
) -> ForwardOutput:
    """Encode, decode and compute the loss terms for a raw batch [B, D] (a transcoder's: [B, D + O],
    see `split`); aux-k apart: the train step adds `aux_k_loss` while some feature is dead.

    `training=True` uses batch top-k for batchtopk (otherwise its EMA threshold).
    """
    x, y = split(spec, batch)
    xn = _normalise(params, x)
    yn = y.astype(jnp.float32) * target_scale(spec, params) if spec.arch.reads_target else xn
    skip = spec.arch.skip_out(params, xn, spec.compute_dtype)
    view = params | {"b_pre": _pre_bias(spec, params), "target": yn, "skip": skip}
    t = spec.kind.train(spec, view, xn, weights, training)
    xn_hat, acts, pre = t.xn_hat + skip, t.acts, t.pre_acts
    sparsity = jnp.asarray(t.sparsity, jnp.float32)
    aux = jnp.asarray(t.aux, jnp.float32)
    top_idx, top_vals, batch_threshold = t.top_idx, t.top_vals, t.batch_threshold

    mse = _mse(yn, xn_hat)
    prefix_mse, recon_loss = None, mse
    if spec.matryoshka_widths:
        inner = _inner_prefixes(spec, params, t)
        prefix_mse = jnp.stack([_mse(yn, r + params["b_dec"] + skip) for r in inner] + [mse])
        # every prefix weighs the same (Bussmann et al. 2025); their mean keeps the loss on the scale
        # of one reconstruction, so aux-k's coefficient and the learning rate mean what they do for SAEs
        recon_loss = jnp.mean(prefix_mse)
    losses = LossTerms(total=recon_loss + sparsity + aux, mse=mse, sparsity=sparsity, aux=aux, prefix_mse=prefix_mse)
    return ForwardOutput(
        recon=xn_hat / target_scale(spec, params),
        feature_acts=acts,
        pre_acts=pre,
        losses=losses,
        top_idx=top_idx,
        top_vals=top_vals,
        batch_threshold=batch_threshold,
    )


# ---------------------------------------------------------------------------------------------
# state the step keeps outside the gradient, and data-dependent initialisation


def fit_to_data(spec: DictionarySpec, params: Params, batch: jax.Array, *, normalize: bool = True,
                centre: Callable[[jax.Array], jax.Array] | None = None) -> Params:
    """`params` fitted to a raw training batch before the first step: each scale set so that the
    normalised input (and target) has E||x||^2 = its width (when `normalize`), and the output bias
    (and a transcoder's pre-encoder bias) set to `centre` of the normalised rows (None: kept)."""
    x, y = split(spec, batch.astype(jnp.float32))
    out = dict(params)
    for name, rows, width in ((spec.arch.target_scale, y, spec.d_out), ("norm_scale", x, spec.d_in)):
        scale = jnp.sqrt(width / jnp.maximum(jnp.mean(jnp.sum(rows**2, -1)), 1e-12)) if normalize else 1.0
        out[name] = jnp.asarray(scale, jnp.float32)
    if centre is not None:
        out["b_dec"] = centre(y * out[spec.arch.target_scale])
        out[spec.arch.pre_bias] = centre(x * out["norm_scale"])
    return out


def typical_rows(spec: DictionarySpec, batch: jax.Array, ratio: float, valid: jax.Array | None = None) -> jax.Array:
    """[B] bool: the rows of a raw batch whose input and target norms are at most `ratio` times the
    median over the batch's `valid` rows (all when None); everything when `ratio` is 0."""
    valid = jnp.ones(batch.shape[0], jnp.bool_) if valid is None else valid
    if not ratio:
        return valid
    keep = valid
    x, y = split(spec, batch.astype(jnp.float32))
    for side in (x, y) if spec.arch.reads_target else (x,):
        norm = jnp.linalg.norm(side, axis=-1)
        median = jnp.nanmedian(jnp.where(valid, norm, jnp.nan))
        keep = keep & (norm <= ratio * median)
    return keep


def replace_outliers(spec: DictionarySpec, batch: jax.Array, ratio: float) -> jax.Array:
    """The raw batch with each row that `typical_rows` leaves out replaced by a typical row of the
    same batch (the i-th left out by the i-th typical one, cycling), so the shapes, the sharding
    and every path of the step stay as they are; unchanged when `ratio` is 0."""
    if not ratio:
        return batch
    keep = typical_rows(spec, batch, ratio)
    order = jnp.argsort(~keep, stable=True)  # typical rows first, in order
    n_keep = jnp.maximum(jnp.sum(keep), 1)
    rank = jnp.cumsum(~keep) - 1  # the i-th left-out row
    source = order[jnp.where(keep, 0, rank) % n_keep]
    return jnp.where(keep[:, None], batch, batch[source])


def update_buffers(spec: DictionarySpec, buffers: Params, out: ForwardOutput, *, first: jax.Array,
                   ema_decay: float) -> Params:
    """Buffers after a train step: batchtopk's inference threshold follows the batch's by an EMA
    (started at the first batch threshold; a step without one, NaN, keeps it)."""
    if out.batch_threshold is None:
        return buffers
    old, kth = buffers["threshold"], out.batch_threshold
    new = jnp.where(first | (old == 0), kth, ema_decay * old + (1 - ema_decay) * kth)
    new = jnp.where(jnp.isnan(kth), old, new)
    return buffers | {"threshold": new.astype(old.dtype)}


def resample(spec: DictionarySpec, params: Params, batch: jax.Array, dead: jax.Array, key: jax.Array) -> Params:
    """Anthropic's resampling (Towards Monosemanticity, 2023) of the `dead` features [F]: each gets
    the direction of a row drawn with probability proportional to its squared reconstruction error
    (decoder: the target's, centred on b_dec; encoder: the input's, centred on the pre-encoder
    bias, scaled to 0.2x the mean alive encoder norm); its encoder bias is reset to zero."""
    x, y = split(spec, batch.astype(jnp.float32))
    scale = target_scale(spec, params)
    yn, xn = y * scale, _normalise(params, x)
    err = jnp.sum((yn - forward(spec, params, batch, training=False).recon * scale) ** 2, -1)
    picks = jax.random.categorical(key, jnp.log(jnp.maximum(err, 1e-12)), shape=(spec.d_sae,))

    def unit(v):
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    dec_dirs, enc_dirs = unit(yn[picks] - params["b_dec"]), unit(xn[picks] - _pre_bias(spec, params))
    enc_norms = jnp.linalg.norm(params["W_enc"], axis=0)
    alive_norm = jnp.sum(jnp.where(dead, 0.0, enc_norms)) / jnp.maximum(jnp.sum(~dead), 1)
    bias = spec.kind.encoder_bias
    return params | {
        "W_dec": jnp.where(dead[:, None], dec_dirs, params["W_dec"]),
        "W_enc": jnp.where(dead[None, :], enc_dirs.T * 0.2 * alive_norm, params["W_enc"]),
        bias: jnp.where(dead, 0.0, params[bias]),
    }


# ---------------------------------------------------------------------------------------------
# decoder-norm constraint


def project_decoder_grad(grads: Params, params: Params) -> Params:
    """Remove from each W_dec row's gradient its component parallel to the (unit) row."""
    w = params["W_dec"]
    g = grads["W_dec"]
    parallel = jnp.sum(g * w, axis=-1, keepdims=True) * w
    return grads | {"W_dec": g - parallel}


def normalise_decoder(params: Params) -> Params:
    w = params["W_dec"]
    return params | {"W_dec": w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)}


def clamp_params(spec: DictionarySpec, params: Params) -> Params:
    """Trainable parameters put back in their domain after an update (jumprelu: threshold >= 0)."""
    return params | {name: jnp.maximum(params[name], 0.0) for name in spec.kind.nonnegative}
