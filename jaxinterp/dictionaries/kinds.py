"""Dictionary kinds as values: an `Architecture` (what is read and what is reconstructed) and an
`Activation` (how features fire), combined freely by `DictionarySpec`.

An `Architecture` bundles what differs between a sparse autoencoder, a transcoder and a skip
transcoder: its extra parameters and their logical axes, the bias subtracted before the encoder,
the scale of its targets, and the linear skip path added to the reconstruction.

Each `Activation` bundles what differs between relu + L1, topk, batchtopk, jumprelu and gated: the
per-feature parameters it adds to `W_enc [D, F]`, `W_dec [F, D]`, `b_dec [D]`, how a feature's
activation follows from its encoder column, the penalty it trains with, and how SAELens names it.
Code outside `jaxinterp/dictionaries/` asks the value (`spec.kind`) instead of testing a name.

Axes: `F` d_sae, `S` selected features, `...` any leading axes.

`activate(raw, feat)` is the inference-time activation of features from `raw = (xn - b_pre) @
W_enc[:, cols]` (no bias) and their own per-feature parameters `feat` (each broadcastable to
`raw`): the full encoder passes every column, steering's `encode="selected"` only the features it
edits, so both run the same formula. Top-k's per-column view is the value a feature takes when
selected (relu of its pre-activation); the selection itself is a row-wise top-k (`sae.encode`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinterp.errors import UsageError
from jaxinterp.dictionaries import ops
from jaxinterp.dictionaries.activations import heaviside_ste, jumprelu_ste
from jaxinterp.dictionaries.sparse import scatter_dense, topk_decode, topk_encode

FeatureParams = dict[str, jax.Array]


class TrainTerms(NamedTuple):
    """What an activation contributes to a training forward (normalised units)."""

    acts: jax.Array
    """Feature activations [B, F] (zero where inactive)."""
    xn_hat: jax.Array
    """Reconstruction [B, D], b_dec included."""
    pre_acts: jax.Array
    """Encoder pre-activations [B, F] (gated: the gate's)."""
    sparsity: jax.Array | float = 0.0
    """Weighted sparsity penalty."""
    aux: jax.Array | float = 0.0
    """Weighted auxiliary loss of the activation itself (gated's gate reconstruction)."""
    top_idx: jax.Array | None = None
    """Per-row top-k selections [B, K] (saves a dense pass over [B, F])."""
    top_vals: jax.Array | None = None
    top_counts: jax.Array | None = None
    """[B]: only each row's first `top_counts` selections are nonzero (None: any may be)."""
    batch_threshold: jax.Array | None = None
    """batchtopk: the smallest selected activation of this batch (feeds the inference threshold)."""


class Activation(NamedTuple):
    name: str
    feature_params: tuple[str, ...]
    """Per-feature parameters [F] besides W_enc, W_dec and b_dec (trainable ones and buffers)."""
    buffers: tuple[str, ...]
    """Parameters the step sets outside the gradient (`norm_scale` always)."""
    encoder_bias: str
    """The bias added to `(xn - b_dec) @ W_enc` before the activation."""
    activate: Callable[[jax.Array, FeatureParams], jax.Array]
    """(raw [..., S], per-feature params broadcastable to it) -> activations [..., S]."""
    init_features: Callable[[int, float], FeatureParams]
    """(d_sae, jumprelu_init_threshold) -> the per-feature parameters of a fresh dictionary."""
    selects_k: bool = False
    """Keeps `k` features per row (or per batch on average)."""
    row_topk: bool = False
    """Selects the top `k` features of each row at inference too (topk; batchtopk then thresholds)."""
    sparsity_penalty: str | None = None
    """What `LossWeights.sparsity` weights: "l1", "l0" or None (sparse by construction)."""
    resamples_dead: bool = False
    """Dead features are resampled every `train.resample_every` steps (relu + L1)."""
    saelens_architecture: str = "standard"
    """SAELens' name for the exported dictionary."""
    saelens_native: bool = True
    """SAELens runs it as this same activation (batchtopk is exported as its inference JumpReLU)."""
    saelens_k: bool = False
    """SAELens' cfg.json carries `k`."""
    nonnegative: tuple[str, ...] = ()
    """Trainable parameters clamped at zero after each update."""
    train: Callable[..., TrainTerms] | None = None
    """(spec, params, xn, weights, training) -> TrainTerms; None: `activate` on every column and
    the decoder, no penalty."""

    @property
    def selects_over_batch(self) -> bool:
        """Training selects the batch's top k x B (batchtopk), after a per-row warm-up."""
        return self.selects_k and not self.row_topk

    def fold_input_shift(self, params: FeatureParams, shift_d: jax.Array) -> FeatureParams:
        """Parameters that give on inputs `x` what `params` give on `x - shift` (the biases absorb it)."""
        lin = shift_d @ params["W_enc"]
        out = params | {self.encoder_bias: params[self.encoder_bias] - lin}
        if "r_mag" in self.feature_params:
            out["b_mag"] = params["b_mag"] - lin * jnp.exp(params["r_mag"])
        return out


def _zeros(d_sae: int, *names: str) -> FeatureParams:
    return {n: jnp.zeros((d_sae,), jnp.float32) for n in names}


def _relu(raw, feat):
    return jax.nn.relu(raw + feat["b_enc"])


def _thresholded(raw, feat):
    """relu(pre) where pre > threshold (a negative threshold passes no negative value: SAELens' rule)."""
    pre = raw + feat["b_enc"]
    return jnp.where(pre > feat["threshold"], jax.nn.relu(pre), 0.0)


def _gated(raw, feat):
    gate = raw + feat["b_gate"]
    mag = raw * jnp.exp(feat["r_mag"]) + feat["b_mag"]
    return jnp.where(gate > 0, jax.nn.relu(mag), 0.0)


# ---------------------------------------------------------------------------------------------
# training forwards: (spec, params, xn, weights, training) -> TrainTerms
#
# `params` also holds, for the forward's duration, `b_pre` (the architecture's pre-encoder bias,
# the same array as b_dec for an SAE so that gradients reach it), `target` (the normalised target
# [B, D_out]) and `skip` (the skip path's output, added to the reconstruction by `forward`).


def _raw(spec, p, xn):
    return ops.mm(xn - p["b_pre"], p["W_enc"], spec.compute_dtype)


def _decode(spec, p, acts):
    return ops.mm(acts, p["W_dec"], spec.compute_dtype) + p["b_dec"]


def _l1(weights, p, acts):
    """Decoder-norm-weighted L1 (Anthropic, April 2024 update)."""
    norms = jnp.linalg.norm(p["W_dec"], axis=-1)
    return weights.sparsity * jnp.mean(jnp.sum(acts * norms, axis=-1))


def _train_relu(spec, p, xn, weights, training):
    pre = _raw(spec, p, xn) + p["b_enc"]
    acts = jax.nn.relu(pre)
    return TrainTerms(acts, _decode(spec, p, acts), pre, sparsity=_l1(weights, p, acts))


def _train_topk(spec, p, xn, weights, training):
    if spec.topk_path == "dense":
        pre = _raw(spec, p, xn) + p["b_enc"]
        _, idx = ops.topk(jax.lax.stop_gradient(pre), spec.k)
        vals = jax.nn.relu(jnp.take_along_axis(pre, idx, axis=-1))
        acts = scatter_dense(vals, idx, spec.d_sae)
        return TrainTerms(acts, _decode(spec, p, acts), pre, top_idx=idx, top_vals=vals)
    # differentiated through `topk_encode`'s sparse backward; pre_acts carry no gradient
    pre = _raw(spec, jax.lax.stop_gradient(p), xn) + jax.lax.stop_gradient(p["b_enc"])
    vals, idx = topk_encode(xn, p["b_pre"], p["W_enc"], p["b_enc"], spec.k, spec.compute_dtype)
    xn_hat = topk_decode(vals, idx, p["W_dec"], path=spec.topk_path) + p["b_dec"]
    return TrainTerms(scatter_dense(vals, idx, spec.d_sae), xn_hat, pre, top_idx=idx, top_vals=vals)


BATCHTOPK_ROW_CAP = 2
"""BatchTopK's sparse path keeps at most `batchtopk_cap(k)` features in a row (its top ones): the
batch's top k x B are chosen among those candidates."""
BATCHTOPK_ROW_EXTRA = 32
"""... and at least k + this many (a small k leaves rows of many active features too little room:
at k 4 a cap of 8 lowered the batch threshold, and so the inference l0, by half)."""


def batchtopk_cap(k: int, d_sae: int) -> int:
    """Candidates per row on BatchTopK's sparse path: max(ROW_CAP * k, k + ROW_EXTRA), at most d_sae."""
    return min(max(BATCHTOPK_ROW_CAP * k, k + BATCHTOPK_ROW_EXTRA), d_sae)


def _train_batchtopk(spec, p, xn, weights, training):
    if training and spec.topk_path != "dense":
        return _train_batchtopk_sparse(spec, p, xn, weights)
    raw = _raw(spec, p, xn)
    pre = raw + p["b_enc"]
    if not training:  # the inference threshold
        acts = _thresholded(raw, p)
        return TrainTerms(acts, _decode(spec, p, acts), pre)
    relu_pre = jax.nn.relu(pre)
    kth = ops.kth_largest(jax.lax.stop_gradient(relu_pre), spec.k * xn.shape[0])
    acts = jnp.where(relu_pre >= jnp.maximum(kth, 1e-12), relu_pre, 0.0)
    # During the warm-up each row keeps its own top k, as TopK: selected across the batch from the
    # start, latents that begin weak are rarely selected and never learn a direction (mmcs 0.82
    # against 0.996 on the toy task of tests/test_recovery.py). The batch threshold still feeds the
    # inference threshold.
    _, idx = ops.topk(jax.lax.stop_gradient(pre), spec.k)
    row_acts = scatter_dense(jax.nn.relu(jnp.take_along_axis(pre, idx, axis=-1)), idx, spec.d_sae)
    acts = jnp.where(weights.row_topk, row_acts, acts)
    return TrainTerms(acts, _decode(spec, p, acts), pre, batch_threshold=kth)


def _train_batchtopk_sparse(spec, p, xn, weights):
    """Batch top-k through the sparse encode and decode of TopK: each row's top `batchtopk_cap`
    candidates (one row-wise top-k, a sparse backward), the batch's threshold as the (k x B)-th
    largest candidate (a bisection over [B, cap], not [B, F]), and the kept values decoded from
    their rows of W_dec. Equal to the dense selection unless a row holds more than `cap` of the
    batch's top k x B; then that row keeps its top `cap`.

    The per-row warm-up takes the other branch of a `lax.cond`: each row's top k only, as TopK and
    at its cost (on CPU a row-wise top-2k costs twice a top-k); its steps leave the inference
    threshold alone (`batch_threshold` NaN), which follows the batch threshold once that runs."""
    sg = jax.lax.stop_gradient
    cap = batchtopk_cap(spec.k, spec.d_sae)
    pre = _raw(spec, sg(p), xn) + sg(p["b_enc"])  # for metrics and aux-k only; no gradient
    enc = (p["b_pre"], p["W_enc"], p["b_enc"])

    def rows(enc):
        vals, idx = topk_encode(xn, *enc, spec.k, spec.compute_dtype)
        pad = ((0, 0), (0, cap - spec.k))
        counts = jnp.full((xn.shape[0],), spec.k, jnp.int32)
        return jnp.pad(vals, pad), jnp.pad(idx, pad), counts, jnp.float32(jnp.nan)

    def batch(enc):
        vals, idx = topk_encode(xn, *enc, cap, spec.compute_dtype, True)
        kth = ops.kth_largest(sg(vals), spec.k * xn.shape[0])
        keep = vals >= jnp.maximum(kth, 1e-12)  # a leading part of each row (candidates come sorted)
        return jnp.where(keep, vals, 0.0), idx, jnp.sum(keep, axis=1, dtype=jnp.int32), kth

    kept, idx, counts, kth = jax.lax.cond(weights.row_topk, rows, batch, enc)
    # the loops visit each row's kept entries only: ~k x B of them, not cap x B
    xn_hat = topk_decode(kept, idx, p["W_dec"], path=spec.topk_path, counts=counts) + p["b_dec"]
    return TrainTerms(scatter_dense(kept, idx, spec.d_sae), xn_hat, pre, top_idx=idx, top_vals=kept,
                      top_counts=counts, batch_threshold=kth)


def _train_jumprelu(spec, p, xn, weights, training):
    pre = _raw(spec, p, xn) + p["b_enc"]
    acts = jumprelu_ste(pre, p["threshold"], spec.jumprelu_bandwidth)
    l0 = jnp.mean(jnp.sum(heaviside_ste(pre, p["threshold"], spec.jumprelu_bandwidth), axis=-1))
    return TrainTerms(acts, _decode(spec, p, acts), pre, sparsity=weights.sparsity * l0)


def _train_gated(spec, p, xn, weights, training):
    raw = _raw(spec, p, xn)
    pre = raw + p["b_gate"]
    acts = _gated(raw, p)
    gate = jax.nn.relu(pre)
    # the gate learns to reconstruct through a frozen decoder (Rajamanoharan et al. 2024)
    sg = jax.lax.stop_gradient
    gate_hat = ops.mm(gate, sg(p["W_dec"]), spec.compute_dtype) + sg(p["b_dec"]) + sg(p["skip"])
    aux = weights.aux * jnp.mean(jnp.sum((p["target"] - gate_hat) ** 2, axis=-1))
    return TrainTerms(acts, _decode(spec, p, acts), pre, sparsity=_l1(weights, p, gate), aux=aux)


RELU = Activation("relu", ("b_enc",), ("norm_scale",), "b_enc", _relu, lambda f, t: _zeros(f, "b_enc"),
                  sparsity_penalty="l1", resamples_dead=True, train=_train_relu)
TOPK = Activation("topk", ("b_enc",), ("norm_scale",), "b_enc", _relu, lambda f, t: _zeros(f, "b_enc"),
                  selects_k=True, row_topk=True, saelens_architecture="topk", saelens_k=True, train=_train_topk)
BATCHTOPK = Activation("batchtopk", ("b_enc", "threshold"), ("norm_scale", "threshold"), "b_enc", _thresholded,
                       lambda f, t: _zeros(f, "b_enc", "threshold"), selects_k=True,
                       saelens_architecture="jumprelu", saelens_native=False, train=_train_batchtopk)
JUMPRELU = Activation("jumprelu", ("b_enc", "threshold"), ("norm_scale",), "b_enc", _thresholded,
                      lambda f, t: _zeros(f, "b_enc") | {"threshold": jnp.full((f,), t, jnp.float32)},
                      sparsity_penalty="l0", saelens_architecture="jumprelu", nonnegative=("threshold",),
                      train=_train_jumprelu)
GATED = Activation("gated", ("b_gate", "b_mag", "r_mag"), ("norm_scale",), "b_gate", _gated,
                   lambda f, t: _zeros(f, "b_gate", "b_mag", "r_mag"), sparsity_penalty="l1",
                   saelens_architecture="gated", train=_train_gated)

ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (RELU, TOPK, BATCHTOPK, JUMPRELU, GATED)}
"""Every activation by name (the config's `dictionary.activation` choices)."""


def activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise UsageError(f"activation {name!r} unknown; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------
# architectures: what a dictionary reads and what it reconstructs


class Architecture(NamedTuple):
    """What a dictionary reads, what it reconstructs and the parameters that takes.

    Every dictionary holds W_enc [D_in, F], W_dec [F, D_out], b_dec [D_out] and `norm_scale` (the
    input's scale); an architecture adds `params` and says how they enter the forward."""

    name: str
    reads_target: bool
    """A training batch holds input and target side by side, [B, D_in + D_out] (input first):
    every data source, the shuffle and the batch sharding keep handling one array."""
    params: dict[str, tuple[tuple[str, ...], str]]
    """Extra parameters: name -> (logical axes, shape in terms of `d_in` / `d_out`); see `init`."""
    buffers: tuple[str, ...] = ()
    """Extra parameters the step sets outside the gradient."""
    pre_bias: str = "b_dec"
    """The bias subtracted from the (normalised) input before the encoder: an SAE ties it to its
    output bias (Bricken et al. 2023), a transcoder has its own (`b_in`)."""
    target_scale: str = "norm_scale"
    """The buffer that scales the target: the input's for an SAE, the target's own otherwise."""
    skip: bool = False
    """A linear path `W_skip [D_out, D_in]` from the normalised input to the reconstruction (skip
    transcoders, Paulo, Shabalin and Belrose 2025), zero at initialisation."""
    saelens_names: dict[str, str] | None = None
    """SAELens' architecture name for each activation's own SAELens name (None: the activation's
    name as it is); an activation missing here has no SAELens counterpart in this architecture."""

    def init(self, d_in: int, d_out: int) -> dict[str, jax.Array]:
        """The extra parameters of a fresh dictionary: the buffers (scales) one, the rest zero."""
        dims = {"d_in": d_in, "d_out": d_out}
        return {name: (jnp.ones if name in self.buffers else jnp.zeros)(tuple(dims[d] for d in shape.split()),
                                                                        jnp.float32)
                for name, (_, shape) in self.params.items()}

    def skip_out(self, params: dict[str, jax.Array], xn: jax.Array, compute_dtype: str = "float32"):
        """The skip path's contribution [..., D_out] (normalised target units), 0.0 without one."""
        if not self.skip:
            return 0.0
        return ops.mm(xn, params["W_skip"].T, compute_dtype)


SAE = Architecture("sae", reads_target=False, params={})
TRANSCODER = Architecture(
    "transcoder", reads_target=True,
    params={"b_in": (("d_model",), "d_in"), "norm_scale_out": ((), "")},
    buffers=("norm_scale_out",), pre_bias="b_in", target_scale="norm_scale_out",
    saelens_names={"standard": "transcoder", "jumprelu": "jumprelu_transcoder"})
SKIP_TRANSCODER = TRANSCODER._replace(
    name="skip_transcoder", params=TRANSCODER.params | {"W_skip": (("d_model", "d_model"), "d_out d_in")}, skip=True,
    saelens_names={"standard": "skip_transcoder", "jumprelu": "jumprelu_skip_transcoder"})

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (SAE, TRANSCODER, SKIP_TRANSCODER)}
"""Every architecture by name (the config's `dictionary.architecture` choices)."""


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise UsageError(f"architecture {name!r} unknown; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


PARAM_AXES: dict[str, tuple[str, ...]] = {
    "W_enc": ("d_model", "d_sae"),
    "W_dec": ("d_sae", "d_model"),
    "b_dec": ("d_model",),
    "norm_scale": (),
    **{name: ("d_sae",) for a in ACTIVATIONS.values() for name in a.feature_params},
    **{name: axes for a in ARCHITECTURES.values() for name, (axes, _) in a.params.items()},
}
"""Logical axes of every parameter any kind creates (`jaxinterp.sharding.LOGICAL_RULES` maps them
onto the mesh)."""


def saelens_name(activation: Activation, arch: Architecture) -> str | None:
    """SAELens' architecture name for this pair, or None when SAELens has no such dictionary."""
    if arch.saelens_names is None:
        return activation.saelens_architecture
    return arch.saelens_names.get(activation.saelens_architecture)


def from_saelens_architecture(architecture: str) -> tuple[Activation, Architecture] | None:
    """The (activation, architecture) SAELens' `architecture` runs as, or None when there is none."""
    return next(((a, arch) for arch in ARCHITECTURES.values() for a in ACTIVATIONS.values()
                 if a.saelens_native and saelens_name(a, arch) == architecture), None)
