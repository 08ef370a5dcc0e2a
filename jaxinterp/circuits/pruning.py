"""Pruning an attribution graph by influence, with circuit-tracer's definitions, without a sort of
all N x N edge scores.

Axes: `N` nodes. `A[t, s]` is the edge from source s to target t (rows are targets); `w` [N] seeds
influence with the logit nodes' probabilities (zero elsewhere).

    normalise(A)      = |A| / rowsum |A|                      each target's inputs sum to one
    influence(Â, w)   = w Â + w Â² + ...                      (= w ((I - Â)^-1 - I) for a DAG)
    mass_threshold(s, τ): the largest value v such that the entries >= v hold at least τ of sum(s)

Nodes are kept where their influence clears `mass_threshold(influence, 0.8)` (tokens and logits
always), edges where `normalise(P)[t, s] * (influence(P)_t + w_t)` clears `mass_threshold(., 0.98)`
over all entries of the node-pruned P, then features and errors left without a kept outgoing edge
(features: or incoming) are removed until nothing changes. `mass_threshold` bisects on the float's
bit pattern (32 rounds of a masked sum over the entries) instead of sorting them: memory stays that
of the scores themselves. The graph here is a dense [N, N] array; rows computed in blocks and
thresholds applied per block (linear in the kept edges) are the attribution step's to build on this.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def normalise(a_nn: jax.Array) -> jax.Array:
    a = jnp.abs(a_nn)
    return a / jnp.maximum(jnp.sum(a, axis=1, keepdims=True), 1e-10)


def influence(a_hat_nn: jax.Array, w_n: jax.Array, *, max_iters: int = 1000) -> jax.Array:
    """w Â + w Â² + ... until a term is exactly zero (a DAG), at most `max_iters` terms."""

    def cond(c):
        i, prod, _ = c
        return (i < max_iters) & jnp.any(prod != 0)

    def body(c):
        i, prod, total = c
        prod = prod @ a_hat_nn
        return i + 1, prod, total + prod

    _, _, total = lax.while_loop(cond, body, (0, w_n @ a_hat_nn, w_n @ a_hat_nn))
    return total


def mass_threshold(scores: jax.Array, tau: float) -> jax.Array:
    """The largest v with sum(scores[scores >= v]) >= tau * sum(scores), scores >= 0: the value at
    which circuit-tracer's sorted cumulative sum first reaches tau (its `find_threshold`)."""
    s = jnp.maximum(scores.astype(jnp.float32), 0.0)
    need = tau * jnp.sum(s)
    bits = lax.bitcast_convert_type(s, jnp.int32)

    def body(_, lo_hi):
        lo, hi = lo_hi  # invariant: mass(bits >= lo) >= need > mass(bits >= hi)
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(jnp.where(bits >= mid, s, 0.0)) >= need
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(0x7F800001)))
    return lax.bitcast_convert_type(lo, jnp.float32)


class Pruned(NamedTuple):
    node_mask: jax.Array
    """[N] bool: nodes kept."""
    edge_mask: jax.Array
    """[N, N] bool: edges kept (rows targets)."""


def prune(a_nn: jax.Array, w_n: jax.Array, always_n: jax.Array, prunable_in_n: jax.Array, *,
          node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """circuit-tracer's pruning. `always_n`: nodes never pruned (tokens, logits); `prunable_in_n`:
    nodes that also need a kept incoming edge to stay (features)."""
    node_inf = influence(normalise(a_nn), w_n)
    node_mask = (node_inf >= mass_threshold(node_inf, node_threshold)) | always_n
    keep = node_mask[:, None] & node_mask[None, :]
    p = jnp.where(keep, a_nn, 0.0)
    p_hat = normalise(p)
    edge_score = p_hat * (influence(p_hat, w_n) + w_n)[:, None]
    edge_mask = edge_score >= mass_threshold(edge_score.reshape(-1), edge_threshold)
    edge_mask = edge_mask & (edge_score > 0)

    def body(c):
        nodes, edges, _ = c
        out_ok = jnp.any(edges, axis=0)  # a kept edge from this node (column)
        in_ok = jnp.any(edges, axis=1)
        new = nodes & (always_n | (out_ok & (in_ok | ~prunable_in_n)))
        edges = edges & new[:, None] & new[None, :]
        return new, edges, jnp.any(new != nodes)

    nodes, edges, _ = lax.while_loop(lambda c: c[2], body, (node_mask, edge_mask, jnp.bool_(True)))
    return Pruned(nodes, edges)


def graph_scores(a_nn: jax.Array, w_n: jax.Array, token_n: jax.Array, error_n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(replacement score, completeness score) of the unpruned graph: the tokens' share of the
    influence that reaches the inputs, and the influence-weighted fraction of each node's inputs
    that do not come from error nodes."""
    a_hat = normalise(a_nn)
    inf = influence(a_hat, w_n)
    tok, err = jnp.sum(jnp.where(token_n, inf, 0.0)), jnp.sum(jnp.where(error_n, inf, 0.0))
    replacement = tok / (tok + err)
    non_error = 1.0 - jnp.sum(jnp.where(error_n[None, :], a_hat, 0.0), axis=1)
    weight = inf + w_n
    return replacement, jnp.sum(non_error * weight) / jnp.sum(weight)
