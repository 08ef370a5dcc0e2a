"""Activation functions of a dictionary as values.

Each `Activation` bundles what differs between relu + L1, topk, batchtopk, jumprelu and gated: the
per-feature parameters it adds to `W_enc [D, F]`, `W_dec [F, D]`, `b_dec [D]`, how a feature's
activation follows from its encoder column, the penalty it trains with, and how SAELens names it.
Code outside `jaxinterp/dictionaries/` asks the value (`spec.kind`) instead of testing a name.

Axes: `F` d_sae, `S` selected features, `...` any leading axes.

`activate(raw, feat)` is the inference-time activation of features from `raw = (xn - b_dec) @
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

FeatureParams = dict[str, jax.Array]


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
    pre = raw + feat["b_enc"]
    return jnp.where(pre > feat["threshold"], pre, 0.0)


def _gated(raw, feat):
    gate = raw + feat["b_gate"]
    mag = raw * jnp.exp(feat["r_mag"]) + feat["b_mag"]
    return jnp.where(gate > 0, jax.nn.relu(mag), 0.0)


RELU = Activation("relu", ("b_enc",), ("norm_scale",), "b_enc", _relu, lambda f, t: _zeros(f, "b_enc"),
                  sparsity_penalty="l1", resamples_dead=True)
TOPK = Activation("topk", ("b_enc",), ("norm_scale",), "b_enc", _relu, lambda f, t: _zeros(f, "b_enc"),
                  selects_k=True, row_topk=True, saelens_architecture="topk", saelens_k=True)
BATCHTOPK = Activation("batchtopk", ("b_enc", "threshold"), ("norm_scale", "threshold"), "b_enc", _thresholded,
                       lambda f, t: _zeros(f, "b_enc", "threshold"), selects_k=True,
                       saelens_architecture="jumprelu", saelens_native=False)
JUMPRELU = Activation("jumprelu", ("b_enc", "threshold"), ("norm_scale",), "b_enc", _thresholded,
                      lambda f, t: _zeros(f, "b_enc") | {"threshold": jnp.full((f,), t, jnp.float32)},
                      sparsity_penalty="l0", saelens_architecture="jumprelu", nonnegative=("threshold",))
GATED = Activation("gated", ("b_gate", "b_mag", "r_mag"), ("norm_scale",), "b_gate", _gated,
                   lambda f, t: _zeros(f, "b_gate", "b_mag", "r_mag"), sparsity_penalty="l1",
                   saelens_architecture="gated")

ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (RELU, TOPK, BATCHTOPK, JUMPRELU, GATED)}
"""Every activation by name (the config's `dictionary.activation` choices)."""


def activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} unknown; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def from_saelens_architecture(architecture: str) -> Activation | None:
    """The activation SAELens' `architecture` runs as, or None when there is none."""
    return next((a for a in ACTIVATIONS.values() if a.saelens_native and a.saelens_architecture == architecture),
                None)
