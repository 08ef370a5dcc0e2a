"""Steering through a cross-layer transcoder: a feature edited at its source layer, the change of
its activation written through its decoder vectors into every layer it writes to.

Axes: `B` batch, `T` positions, `D` d_model, `S` steered features of one source layer.

For feature i of source layer l with activation a (its value at this token, from the source's
input site in this same forward) and new value a' (add: a + v, clamp: v, scale: a * v,
ablate: 0), each target j = l + t of the feature gets

    mlp_out_j += (a' - a) * W_dec_l[i, t] / norm_out[j]

which is exactly what the CLT's reconstruction of layer j changes by. The features' activations are
derived once per forward at their source site (`Plan.derive`); ids and values are data, so new
values or other features of the same count never recompile.
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp

from jaxinterp.dictionaries import clt
from jaxinterp.errors import UsageError
from jaxinterp.models import Plan

MODES = ("add", "clamp", "scale", "ablate")


def _selected_acts(spec: clt.CLTSpec, x_btd, p, positions_bt):
    """[B, T, S] the steered features' activations (top-k: their value when selected, with the
    selection over every feature of the layer)."""
    del positions_bt
    h = (x_btd.astype(jnp.float32) * p["norm_in"]) @ p["W_enc"] + p["b_enc"]
    return jnp.take(clt.activate(spec, p, h), p["ids"], axis=-1)


def _new_value(mode: str, a, v):
    return {"add": lambda: a + v, "clamp": lambda: jnp.broadcast_to(v, a.shape), "scale": lambda: a * v,
            "ablate": lambda: jnp.zeros_like(a)}[mode]()


def _write(modes: tuple[str, ...], x_btd, p, positions_bt, *acts):
    def change(m, a, q):  # [B, T, S], zero where a feature is confined to another position
        at = (q["pos"] < 0) | (positions_bt[..., None] == q["pos"])
        return jnp.where(at, _new_value(m, a, q["values"]) - a, 0.0)

    delta = sum(change(m, a, q) @ q["rows"] for m, a, q in zip(modes, acts, p["sources"]))
    return x_btd + (delta / p["norm_out"]).astype(x_btd.dtype)


@lru_cache(maxsize=64)
def steering_plan(spec: clt.CLTSpec, layers: tuple[tuple[int, str], ...]) -> Plan:
    """The static plan for steered features at source layers `layers` ((layer, mode) pairs, layers
    within the CLT, each once)."""
    inputs, targets = clt.sites(spec)
    derive = tuple((f"clt_steer.{l}", inputs[l], partial(_selected_acts, spec)) for l, _ in layers)
    edits = []
    for j in range(spec.n_layers):
        src = [(l, m) for l, m in layers if l <= j < l + spec.targets(l)]
        if src:
            edits.append((targets[j], partial(_write, tuple(m for _, m in src)), *(f"clt_steer.{l}" for l, _ in src)))
    return Plan(edits=tuple(edits), derive=derive)


def steer_clt(spec: clt.CLTSpec, params: clt.Params, features: dict[tuple[int, int], float],
              mode: str = "add", positions: dict[tuple[int, int], int] | None = None) -> tuple[Plan, dict]:
    """(plan, edit params) that steer CLT features `{(layer, feature): value}` with `mode`; pass
    them to `models.forward` or `generate(intercepts=...)` (layers count from the CLT's first).
    `positions`: a feature confined to one token position (its index in its row's own tokens);
    features not listed are steered at every position."""
    positions = positions or {}
    if mode not in MODES:
        raise UsageError(f"CLT steering mode {mode!r} unknown; choose one of {MODES}")
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for (l, i), v in features.items():
        if not (0 <= l < spec.n_layers and 0 <= i < spec.d_sae):
            raise UsageError(f"CLT feature ({l}, {i}): layers are 0..{spec.n_layers - 1} and features "
                             f"0..{spec.d_sae - 1}")
        by_layer.setdefault(l, []).append((i, float(v)))
    layers = tuple(sorted(by_layer))
    plan = steering_plan(spec, tuple((l, mode) for l in layers))
    _, targets = clt.sites(spec)
    ep: dict = {}
    for l in layers:
        ids = jnp.asarray([i for i, _ in by_layer[l]], jnp.int32)
        ep[f"clt_steer.{l}"] = clt.layer_encoder(spec, params, l) | {"ids": ids}
    for j in range(spec.n_layers):
        src = [l for l in layers if l <= j < l + spec.targets(l)]
        if src:
            ep[targets[j]] = {"norm_out": params["norm_out"][j], "sources": tuple(
                {"values": jnp.asarray([v for _, v in by_layer[l]], jnp.float32),
                 "pos": jnp.asarray([positions.get((l, i), -1) for i, _ in by_layer[l]], jnp.int32),
                 "rows": jnp.take(params[f"W_dec_{l}"][:, j - l], jnp.asarray([i for i, _ in by_layer[l]]), axis=0)}
                for l in src)}
    return plan, ep



def steering_vectors(spec: clt.CLTSpec, params: clt.Params, features: dict[tuple[int, int], float], *,
                     positions="all") -> list:
    """`SteeringVector`s (raw-vector add at each target `mlp_out`) that add `value` to CLT features
    `{(layer, feature): value}`: the change a feature's activation makes does not depend on the
    token for `add`, so the same specs as any steering vector carry it (generation, per-row specs,
    position windows). clamp, scale and ablate read the feature's activation: use `steer_clt`."""
    from jaxinterp.steering.spec import SteeringVector

    _, targets = clt.sites(spec)
    by_site: dict[str, jnp.ndarray] = {}
    for (l, i), v in features.items():
        if not (0 <= l < spec.n_layers and 0 <= i < spec.d_sae):
            raise UsageError(f"CLT feature ({l}, {i}): layers are 0..{spec.n_layers - 1} and features "
                             f"0..{spec.d_sae - 1}")
        for t in range(spec.targets(l)):
            j = l + t
            vec = float(v) * params[f"W_dec_{l}"][i, t] / params["norm_out"][j]
            by_site[targets[j]] = by_site.get(targets[j], 0.0) + vec
    return [SteeringVector(site, vector=vec, mode="add", positions=positions) for site, vec in by_site.items()]


def top_features(model, tokens_bt, spec: clt.CLTSpec, params: clt.Params, *, k: int = 5):
    """Per-layer reads: (values [B, T, L, k], feature ids [B, T, L, k]) of each position's top `k`
    features at every covered layer, from one forward of the model (stopped after the last layer)."""
    from jaxinterp.models import forward

    inputs, _ = clt.sites(spec)
    res = forward(model, jnp.asarray(tokens_bt), plan=Plan(capture=inputs, stop_early=True))
    x = jnp.stack([res.captured[s] for s in inputs], 2)
    b, t = x.shape[:2]
    a = clt.encode(spec, params, x.reshape(b * t, spec.n_layers, spec.d_model))
    vals, ids = jax.lax.top_k(a, k)
    return vals.reshape(b, t, spec.n_layers, k), ids.reshape(b, t, spec.n_layers, k)


NODE_MODES = MODES


def parse_node_steer(arg: str) -> tuple[tuple[int, int, int | None], str, float] | None:
    """An attribution graph's feature node id with a mode, `{layer}_{feature}_{pos}:ablate` (or
    `:scale=V`, `:clamp=V`, `:add=V`; `{layer}_{feature}` for every position): ((model layer, feature,
    position or None), mode, value), or None when `arg` is not a node id."""
    import re

    node, _, rest = arg.partition(":")
    m = re.fullmatch(r"(\d+)_(\d+)(?:_(\d+))?", node)
    if m is None:
        return None
    mode, _, value = rest.partition("=")
    if mode not in MODES or (mode == "ablate") != (value == ""):
        raise UsageError(f"--steer {arg!r}: a graph node takes :ablate, :scale=V, :clamp=V or :add=V")
    try:
        v = 0.0 if mode == "ablate" else float(value)
    except ValueError:
        raise UsageError(f"--steer {arg!r}: {value!r} is not a number") from None
    layer, feature, pos = int(m.group(1)), int(m.group(2)), m.group(3)
    return (layer, feature, None if pos is None else int(pos)), mode, v


def steer_nodes(spec: clt.CLTSpec, params: clt.Params, nodes: list) -> tuple[Plan, dict]:
    """`steer_clt` for parsed node steers (`parse_node_steer`), all with one mode; model layers."""
    modes = {mode for _, mode, _ in nodes}
    if len(modes) != 1:
        raise UsageError(f"graph nodes steered with modes {sorted(modes)} at once; give one mode per run")
    features, positions = {}, {}
    for (layer, feature, pos), _, v in nodes:
        key = (layer - spec.first_layer, feature)
        if not 0 <= key[0] < spec.n_layers:
            raise UsageError(f"node layer {layer}: the CLT covers layers {spec.first_layer}.."
                             f"{spec.first_layer + spec.n_layers - 1}")
        features[key] = v
        if pos is not None:
            positions[key] = pos
    return steer_clt(spec, params, features, modes.pop(), positions)
