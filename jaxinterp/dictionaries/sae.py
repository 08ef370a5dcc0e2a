"""Sparse autoencoders as pure functions over a parameter dict.

Axes: `B` batch, `D` d_in (= d_out), `F` d_sae, `K` top-k.

A dictionary is a flat dict of arrays:
  trainable  W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]
             (jumprelu: threshold [F]; gated: b_gate, b_mag, r_mag [F] in place of b_enc)
  buffers    norm_scale [] (inputs are multiplied by it, so that E||x||^2 = d_in),
             threshold [F] for batchtopk (an EMA, the inference-time JumpReLU threshold)

`encode` takes raw inputs and `decode` returns raw units: the normalisation is applied inside and
undone on the way out. `forward` returns everything a train step and the evals need.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinterp.dictionaries import kinds, ops
from jaxinterp.dictionaries.sparse import scatter_dense, topk_decode

Params = dict[str, jax.Array]

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

    def __post_init__(self) -> None:
        if self.kind.selects_k and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be in [1, d_sae={self.d_sae}]")

    @property
    def kind(self) -> kinds.Activation:
        """The activation as a value (raises on an unknown name)."""
        return kinds.activation(self.activation)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        return self.kind.buffers


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
    """Mean over rows of ||x - x_hat||^2 (normalised units)."""
    sparsity: jax.Array
    """Weighted L1 / L0 term (0 for topk, batchtopk)."""
    aux: jax.Array
    """Weighted auxiliary term: aux-k (topk, batchtopk) or gated's gate reconstruction."""


class ForwardOutput(NamedTuple):
    recon: jax.Array
    """Reconstruction [B, D] in the input's own units."""
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
    """Random unit-norm decoder rows, encoder = decoder transposed, zero biases.

    `threshold` initialises the JumpReLU threshold (ignored by other kinds).
    """
    w_dec = jax.random.normal(key, (spec.d_sae, spec.d_in), jnp.float32)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    p: Params = {
        "W_enc": w_dec.T,
        "W_dec": w_dec,
        "b_dec": jnp.zeros((spec.d_in,), jnp.float32),
        "norm_scale": jnp.ones((), jnp.float32),
    }
    return p | spec.kind.init_features(spec.d_sae, threshold)


def split_params(spec: DictionarySpec, params: Params) -> tuple[Params, Params]:
    """(trainable, buffers)."""
    buf = {k: v for k, v in params.items() if k in spec.buffer_names}
    return {k: v for k, v in params.items() if k not in buf}, buf


# ---------------------------------------------------------------------------------------------
# encode / decode


def _mm(a: jax.Array, b: jax.Array, spec: DictionarySpec) -> jax.Array:
    return ops.mm(a, b, spec.compute_dtype)


def _normalise(params: Params, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) * params["norm_scale"]


def _pre_acts(spec: DictionarySpec, params: Params, xn: jax.Array) -> jax.Array:
    return _mm(xn - params["b_dec"], params["W_enc"], spec) + params[spec.kind.encoder_bias]


def _features(spec: DictionarySpec, params: Params) -> dict[str, jax.Array]:
    return {name: params[name] for name in spec.kind.feature_params}


def _encode_normalised(spec: DictionarySpec, params: Params, xn: jax.Array) -> jax.Array:
    """Inference-time feature activations [B, F] from normalised inputs."""
    if spec.kind.row_topk:
        vals, idx = ops.topk(_pre_acts(spec, params, xn), spec.k)
        return scatter_dense(jax.nn.relu(vals), idx, spec.d_sae)
    raw = _mm(xn - params["b_dec"], params["W_enc"], spec)
    return spec.kind.activate(raw, _features(spec, params))


def encode_selected(spec: DictionarySpec, params: Params, x_btd: jax.Array, ids_bs: jax.Array) -> jax.Array:
    """Activations [B, T, S] of features `ids_bs` [B, S] (per row of the batch) of raw inputs
    `x_btd`, from their encoder columns only: the formula of `encode`, restricted to those columns
    (top-k: the value a feature takes when selected, as the row-wise selection needs every column)."""
    xc = _normalise(params, x_btd) - params["b_dec"]
    w = jnp.take(params["W_enc"], ids_bs, axis=1)  # [D, B, S]
    raw = jnp.einsum("btd,dbs->bts", xc, w)
    feat = {name: v[ids_bs][:, None, :] for name, v in _features(spec, params).items()}
    return spec.kind.activate(raw, feat)


def encode(spec: DictionarySpec, params: Params, x: jax.Array) -> jax.Array:
    """Feature activations [B, F] of raw inputs [B, D] (batchtopk uses its inference threshold)."""
    return _encode_normalised(spec, params, _normalise(params, x))


def decode(spec: DictionarySpec, params: Params, feature_acts: jax.Array) -> jax.Array:
    """Reconstruction [B, D] in raw units from feature activations [B, F]."""
    xn_hat = _mm(feature_acts, params["W_dec"], spec) + params["b_dec"]
    return xn_hat / params["norm_scale"]


def reconstruct(spec: DictionarySpec, params: Params, x: jax.Array) -> jax.Array:
    """decode(encode(x)) at inference; topk decodes its K selected rows only (the Pallas kernel on
    GPU/TPU, per `spec.topk_path`), never a dense [B, F] product."""
    if spec.kind.row_topk and spec.topk_path != "dense":
        vals, idx = ops.topk(_pre_acts(spec, params, _normalise(params, x)), spec.k)
        xn_hat = topk_decode(jax.nn.relu(vals), idx, params["W_dec"], path=spec.topk_path) + params["b_dec"]
        return xn_hat / params["norm_scale"]
    return decode(spec, params, encode(spec, params, x))


# ---------------------------------------------------------------------------------------------
# forward with losses (training)


def _mse(xn: jax.Array, xn_hat: jax.Array) -> jax.Array:
    return jnp.mean(jnp.sum((xn - xn_hat) ** 2, axis=-1))


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
    pre = _mm(xn - params["b_dec"], params["W_enc"][:, pool], spec) + params[spec.kind.encoder_bias][pool]
    vals, idx = ops.topk(jnp.where(pool_dead, pre, -jnp.inf), spec.aux_k)
    vals = jnp.where(jnp.isfinite(vals), jax.nn.relu(vals), 0.0)
    e_hat = _mm(scatter_dense(vals, idx, m), params["W_dec"][pool], spec)
    e = jax.lax.stop_gradient(residual)
    variance = jnp.sum((e - e.mean(0)) ** 2)
    scale = jnp.minimum(jnp.sum(dead_mask) / spec.aux_k, 1.0)
    return scale * jnp.sum((e_hat - e) ** 2) / jnp.maximum(variance, 1e-12)


def has_aux_k(spec: DictionarySpec) -> bool:
    return selects_k(spec.activation) and spec.aux_k > 0


def aux_k_loss(spec: DictionarySpec, params: Params, x: jax.Array, recon: jax.Array, dead_mask: jax.Array,
               key: jax.Array) -> jax.Array:
    """The (unweighted) aux-k loss of raw inputs `x` [B, D] given the main reconstruction `recon`
    (raw units, treated as a constant) and the dead features `dead_mask` [F]; `key` draws the pool
    when more than `aux_k_pool(spec)` features are dead."""
    if AUX_K_ROW_STRIDE > 1 and x.shape[0] % AUX_K_ROW_STRIDE == 0:
        x, recon = (a.reshape(-1, AUX_K_ROW_STRIDE, a.shape[-1])[:, 0] for a in (x, recon))
    xn = _normalise(params, x)
    residual = xn - jax.lax.stop_gradient(recon) * params["norm_scale"]
    return _aux_k_loss(spec, params, xn, residual, dead_mask, key)


def forward(
    spec: DictionarySpec,
    params: Params,
    x: jax.Array,
    weights: LossWeights = LossWeights(),
    *,
    training: bool = True,
) -> ForwardOutput:
    """Encode, decode and compute the loss terms for raw inputs `x` [B, D] (aux-k apart: the train
    step adds `aux_k_loss` while some feature is dead).

    `training=True` uses batch top-k for batchtopk (otherwise its EMA threshold).
    """
    xn = _normalise(params, x)
    t = spec.kind.train(spec, params, xn, weights, training)
    xn_hat, acts, pre = t.xn_hat, t.acts, t.pre_acts
    sparsity = jnp.asarray(t.sparsity, jnp.float32)
    aux = jnp.asarray(t.aux, jnp.float32)
    top_idx, top_vals, batch_threshold = t.top_idx, t.top_vals, t.batch_threshold

    mse = _mse(xn, xn_hat)
    losses = LossTerms(total=mse + sparsity + aux, mse=mse, sparsity=sparsity, aux=aux)
    return ForwardOutput(
        recon=xn_hat / params["norm_scale"],
        feature_acts=acts,
        pre_acts=pre,
        losses=losses,
        top_idx=top_idx,
        top_vals=top_vals,
        batch_threshold=batch_threshold,
    )


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
