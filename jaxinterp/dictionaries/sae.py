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

from jaxinterp.dictionaries import ops
from jaxinterp.dictionaries.activations import heaviside_ste, jumprelu_ste
from jaxinterp.dictionaries.sparse import scatter_dense, topk_decode, topk_encode

Params = dict[str, jax.Array]

BUFFERS = {
    "relu": ("norm_scale",),
    "topk": ("norm_scale",),
    "batchtopk": ("norm_scale", "threshold"),
    "jumprelu": ("norm_scale",),
    "gated": ("norm_scale",),
}


def selects_k(activation: str) -> bool:
    """Whether the activation keeps `k` features per row (or per batch average): topk, batchtopk."""
    return activation in ("topk", "batchtopk")


def sparsity_penalty(activation: str) -> str | None:
    """The penalty that `LossWeights.sparsity` weights: "l1" (relu, gated), "l0" (jumprelu), or
    None (the top-k kinds, sparse by construction)."""
    return {"relu": "l1", "gated": "l1", "jumprelu": "l0"}.get(activation)


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
        if self.activation not in BUFFERS:
            raise ValueError(f"activation {self.activation!r} unknown; choose one of {sorted(BUFFERS)}")
        if selects_k(self.activation) and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be in [1, d_sae={self.d_sae}]")

    @property
    def buffer_names(self) -> tuple[str, ...]:
        return BUFFERS[self.activation]


class LossWeights(NamedTuple):
    """Coefficients of the loss terms (arrays or floats: data, so warm-ups never recompile)."""

    sparsity: float | jax.Array = 0.0
    """l1_coefficient (relu, gated) or l0_coefficient (jumprelu)."""
    aux: float | jax.Array = 0.0
    """aux-k (topk, batchtopk) or the gated auxiliary reconstruction loss."""


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
    if spec.activation == "gated":
        p |= {
            "b_gate": jnp.zeros((spec.d_sae,), jnp.float32),
            "b_mag": jnp.zeros((spec.d_sae,), jnp.float32),
            "r_mag": jnp.zeros((spec.d_sae,), jnp.float32),
        }
    else:
        p["b_enc"] = jnp.zeros((spec.d_sae,), jnp.float32)
    if spec.activation == "jumprelu":
        p["threshold"] = jnp.full((spec.d_sae,), threshold, jnp.float32)
    if spec.activation == "batchtopk":
        p["threshold"] = jnp.zeros((spec.d_sae,), jnp.float32)
    return p


def split_params(spec: DictionarySpec, params: Params) -> tuple[Params, Params]:
    """(trainable, buffers)."""
    buf = {k: v for k, v in params.items() if k in spec.buffer_names}
    return {k: v for k, v in params.items() if k not in buf}, buf


# ---------------------------------------------------------------------------------------------
# encode / decode


def _mm(a: jax.Array, b: jax.Array, spec: DictionarySpec) -> jax.Array:
    dt = jnp.dtype(spec.compute_dtype)
    return jnp.matmul(a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32)


def _normalise(params: Params, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) * params["norm_scale"]


def _pre_acts(spec: DictionarySpec, params: Params, xn: jax.Array) -> jax.Array:
    xc = xn - params["b_dec"]
    if spec.activation == "gated":
        return _mm(xc, params["W_enc"], spec) + params["b_gate"]
    return _mm(xc, params["W_enc"], spec) + params["b_enc"]


def _encode_normalised(spec: DictionarySpec, params: Params, xn: jax.Array) -> jax.Array:
    """Inference-time feature activations [B, F] from normalised inputs."""
    pre = _pre_acts(spec, params, xn)
    a = spec.activation
    if a == "relu":
        return jax.nn.relu(pre)
    if a == "topk":
        vals, idx = ops.topk(pre, spec.k)
        return scatter_dense(jax.nn.relu(vals), idx, spec.d_sae)
    if a in ("batchtopk", "jumprelu"):
        return jnp.where(pre > params["threshold"], pre, 0.0)
    # gated
    xc = xn - params["b_dec"]
    mag = _mm(xc, params["W_enc"] * jnp.exp(params["r_mag"]), spec) + params["b_mag"]
    return jnp.where(pre > 0, jax.nn.relu(mag), 0.0)


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
    if spec.activation == "topk" and spec.topk_path != "dense":
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
    pre = _mm(xn - params["b_dec"], params["W_enc"][:, pool], spec) + params["b_enc"][pool]
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
    a = spec.activation
    # topk differentiates through `topk_encode`'s sparse backward; its pre_acts carry no gradient.
    pre = _pre_acts(spec, jax.lax.stop_gradient(params) if a == "topk" else params, xn)
    norms = jnp.linalg.norm(params["W_dec"], axis=-1)
    sparsity = jnp.zeros((), jnp.float32)
    aux = jnp.zeros((), jnp.float32)
    top_idx = top_vals = batch_threshold = None

    if a == "topk" and spec.topk_path == "dense":
        pre_d = _pre_acts(spec, params, xn)
        vals, top_idx = ops.topk(jax.lax.stop_gradient(pre_d), spec.k)
        top_vals = jax.nn.relu(jnp.take_along_axis(pre_d, top_idx, axis=-1))
        acts = scatter_dense(top_vals, top_idx, spec.d_sae)
        xn_hat = _mm(acts, params["W_dec"], spec) + params["b_dec"]
    elif a == "topk":
        top_vals, top_idx = topk_encode(
            xn, params["b_dec"], params["W_enc"], params["b_enc"], spec.k, spec.compute_dtype
        )
        xn_hat = topk_decode(top_vals, top_idx, params["W_dec"], path=spec.topk_path) + params["b_dec"]
        acts = scatter_dense(top_vals, top_idx, spec.d_sae)
    elif a == "batchtopk" and training:
        relu_pre = jax.nn.relu(pre)
        kth = ops.kth_largest(jax.lax.stop_gradient(relu_pre), spec.k * x.shape[0])
        acts = jnp.where(relu_pre >= jnp.maximum(kth, 1e-12), relu_pre, 0.0)
        xn_hat = _mm(acts, params["W_dec"], spec) + params["b_dec"]
        batch_threshold = kth
    elif a == "jumprelu":
        acts = jumprelu_ste(pre, params["threshold"], spec.jumprelu_bandwidth)
        xn_hat = _mm(acts, params["W_dec"], spec) + params["b_dec"]
        l0 = jnp.mean(jnp.sum(heaviside_ste(pre, params["threshold"], spec.jumprelu_bandwidth), axis=-1))
        sparsity = weights.sparsity * l0
    else:
        acts = _encode_normalised(spec, params, xn)
        xn_hat = _mm(acts, params["W_dec"], spec) + params["b_dec"]
        if a == "relu":
            sparsity = weights.sparsity * jnp.mean(jnp.sum(acts * norms, axis=-1))
        elif a == "gated":
            gate = jax.nn.relu(pre)
            sparsity = weights.sparsity * jnp.mean(jnp.sum(gate * norms, axis=-1))
            sg = jax.lax.stop_gradient
            gate_hat = _mm(gate, sg(params["W_dec"]), spec) + sg(params["b_dec"])
            aux = weights.aux * _mse(xn, gate_hat)

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
    if spec.activation == "jumprelu":
        return params | {"threshold": jnp.maximum(params["threshold"], 0.0)}
    return params
