"""The replacement model: a forward in which a cross-layer transcoder stands in for the MLPs it covers.

Axes: `B` batch, `T` positions, `D` d_model, `F` features per layer.

Each covered layer l's features are encoded once, at its input site (`blocks.{l}.resid_mid` or
`mlp_in`), as a value derived in the forward (`Plan.derive`, name `clt.{l}`); the edit at each
`blocks.{j}.mlp_out` reads the features of every source that writes to it and returns

    without error terms:  y^_j = (b_dec[j] + sum_l a_l @ W_dec_l[:, j - l] (+ xn_j @ W_skip[j])) / norm_out[j]
    with error terms:     mlp_out_j + (y^_j - stop_gradient(y^_j))

The second equals the original forward exactly (the error `mlp_out - y^` is a constant, what
attribution needs: gradients flow through the features). Because the features are read from this
same forward, a replaced layer's output changes what later layers read: the replacement model is the
model with its MLPs swapped, not a per-layer splice of original activations.
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp

from jaxinterp.dictionaries import clt
from jaxinterp.models import Plan, forward


def _encode_fn(spec: clt.CLTSpec, x_btd, p, positions_bt):
    del positions_bt
    h = (x_btd.astype(jnp.float32) * p["norm_in"]) @ p["W_enc"] + p["b_enc"]
    return clt.activate(spec, p, h)  # one layer's threshold [F] broadcasts over [B, T, F]


def _normalised_input(x_btd, p, positions_bt):
    del positions_bt
    return x_btd.astype(jnp.float32) * p["norm_in"]


def _write_fn(error_terms: bool, x_btd, p, positions_bt, *acts):
    del positions_bt
    if "W_skip" in p:  # the last value read is this layer's normalised input
        *acts, xn = acts
        y = p["b_dec"] + sum(a @ w for a, w in zip(acts, p["W_dec"])) + xn @ p["W_skip"]
    else:
        y = p["b_dec"] + sum(a @ w for a, w in zip(acts, p["W_dec"]))
    y = (y / p["norm_out"]).astype(x_btd.dtype)
    if error_terms:
        return x_btd + (y - jax.lax.stop_gradient(y))
    return y


@lru_cache(maxsize=64)
def replacement_plan(spec: clt.CLTSpec, error_terms: bool = False, capture: tuple[str, ...] = ()) -> Plan:
    """The static plan (cached per spec, so a new CLT of the same shape never recompiles)."""
    inputs, targets = clt.sites(spec)
    derive = tuple((f"clt.{l}", inputs[l], partial(_encode_fn, spec)) for l in range(spec.n_layers))
    if spec.skip:
        derive += tuple((f"clt.x.{l}", inputs[l], _normalised_input) for l in range(spec.n_layers))
    edits = []
    for j in range(spec.n_layers):
        sources = [l for l in range(j + 1) if j - l < spec.targets(l)]
        reads = (*(f"clt.{l}" for l in sources), *((f"clt.x.{j}",) if spec.skip else ()))
        edits.append((targets[j], partial(_write_fn, error_terms), *reads))
    return Plan(capture=capture, edits=tuple(edits), derive=derive)


def replacement_params(spec: clt.CLTSpec, params: clt.Params) -> dict:
    """The plan's edit parameters (data: another CLT of the same spec reuses the compiled forward)."""
    inputs, targets = clt.sites(spec)
    out = {}
    for l in range(spec.n_layers):
        out[f"clt.{l}"] = clt.layer_encoder(spec, params, l)
    for j in range(spec.n_layers):
        sources = [l for l in range(j + 1) if j - l < spec.targets(l)]
        out[targets[j]] = {"W_dec": tuple(params[f"W_dec_{l}"][:, j - l] for l in sources), "b_dec": params["b_dec"][j],
                           "norm_out": params["norm_out"][j]}
        if spec.skip:
            out[targets[j]]["W_skip"] = params["W_skip"][j]
            out[f"clt.x.{j}"] = {"norm_in": params["norm_in"][j]}
    return out


def replacement_forward(model, tokens_bt, spec: clt.CLTSpec, params: clt.Params, *, error_terms: bool = False,
                        capture: tuple[str, ...] = (), attention_mask=None):
    """The model's forward with the covered MLPs replaced by the CLT (see the module docstring)."""
    if spec.first_layer + spec.n_layers > model.cfg.n_layers or spec.d_model != model.cfg.d_model:
        from jaxinterp.errors import UsageError

        raise UsageError(f"the CLT covers layers {spec.first_layer}..{spec.first_layer + spec.n_layers - 1} at "
                         f"d_model {spec.d_model}; the model has {model.cfg.n_layers} layers of {model.cfg.d_model}")
    return forward(model, jnp.asarray(tokens_bt), plan=replacement_plan(spec, error_terms, capture),
                   edit_params=replacement_params(spec, params), attention_mask=attention_mask)


def replacement_intercepts(spec: clt.CLTSpec, params: clt.Params, *, error_terms: bool = False) -> tuple[Plan, dict]:
    """(plan, edit params) of the replacement model, for `jaxinterp.generate(..., intercepts=...)`."""
    return replacement_plan(spec, error_terms), replacement_params(spec, params)
