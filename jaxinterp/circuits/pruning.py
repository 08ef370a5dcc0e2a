"""Pruning an attribution graph by influence, with circuit-tracer's definitions, on its rows alone and
without a sort of the edge scores.

Axes: `N` nodes, `R` rows. A graph is held as its rows: `rows[r, s]` is the edge from source node s
to target node `row_nodes[r]` (the nodes that have inputs: features and logits; error and token nodes
have none, so the dense [N, N] matrix is `rows` scattered at `row_nodes` and zero elsewhere). `w` [N]
seeds influence with the logit nodes' probabilities (zero elsewhere).

    normalise(A)      = |A| / rowsum |A|                      each target's inputs sum to one
    influence(Â, w)   = w Â + w Â² + ...                      (= w ((I - Â)^-1 - I) for a DAG)
    mass_threshold(s, τ): the largest value v such that the entries >= v hold at least τ of sum(s)

Nodes are kept where their influence clears `mass_threshold(influence, 0.8)` (tokens and logits
always), edges where `normalise(P)[t, s] * (influence(P)_t + w_t)` clears `mass_threshold(., 0.98)`
over all entries of the node-pruned P, then features and errors left without a kept outgoing edge
(features: or incoming) are removed until nothing changes. `mass_threshold` bisects on the float's
bit pattern (32 rounds of a masked sum over the entries) instead of sorting them, so memory is a few
copies of the rows: linear in the prompt length at a fixed number of feature rows, where
circuit-tracer's dense [N, N] sort is quadratic.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def normalise(a_rn: jax.Array) -> jax.Array:
    a = jnp.abs(a_rn)
    return a / jnp.maximum(jnp.sum(a, axis=1, keepdims=True), 1e-10)


def influence(a_hat_rn: jax.Array, w_n: jax.Array, row_nodes: jax.Array | None = None, *,
              max_iters: int = 1000) -> jax.Array:
    """w Â + w Â² + ... until a term is exactly zero (a DAG), at most `max_iters` terms; `row_nodes`
    None means the rows are every node in order (a dense [N, N] matrix)."""
    rn = jnp.arange(a_hat_rn.shape[0]) if row_nodes is None else row_nodes

    def cond(c):
        i, prod, _ = c
        return (i < max_iters) & jnp.any(prod != 0)

    def body(c):
        i, prod, total = c
        prod = prod[rn] @ a_hat_rn
        return i + 1, prod, total + prod

    first = w_n[rn] @ a_hat_rn
    _, _, total = lax.while_loop(cond, body, (0, first, first))
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
    """[R, N] bool: edges kept (in the rows' layout; [N, N] for a dense matrix)."""
    node_influence: jax.Array
    """[N] each node's influence on the logits in the unpruned graph."""


def _rows_of(row_nodes, a):
    return jnp.arange(a.shape[0]) if row_nodes is None else row_nodes


@jax.jit
def _prune(a_rn, w_n, always_n, prunable_in_n, row_nodes, node_threshold, edge_threshold):
    rn = row_nodes
    node_inf = influence(normalise(a_rn), w_n, rn)
    node_mask = (node_inf >= mass_threshold(node_inf, node_threshold)) | always_n
    p = jnp.where(node_mask[rn][:, None] & node_mask[None, :], a_rn, 0.0)
    p_hat = normalise(p)
    edge_score = p_hat * (influence(p_hat, w_n, rn) + w_n)[rn][:, None]
    edge_mask = (edge_score >= mass_threshold(edge_score.reshape(-1), edge_threshold)) & (edge_score > 0)

    def body(c):
        nodes, edges, _ = c
        out_ok = jnp.any(edges, axis=0)  # a kept edge from this node (column)
        in_ok = jnp.zeros_like(nodes).at[rn].set(jnp.any(edges, axis=1))
        new = nodes & (always_n | (out_ok & (in_ok | ~prunable_in_n)))
        edges = edges & new[rn][:, None] & new[None, :]
        return new, edges, jnp.any(new != nodes)

    nodes, edges, _ = lax.while_loop(lambda c: c[2], body, (node_mask, edge_mask, jnp.bool_(True)))
    return Pruned(nodes, edges, node_inf)


def prune(a_rn: jax.Array, w_n: jax.Array, always_n: jax.Array, prunable_in_n: jax.Array, *,
          row_nodes: jax.Array | None = None, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """circuit-tracer's pruning. `always_n`: nodes never pruned (tokens, logits); `prunable_in_n`:
    nodes that also need a kept incoming edge to stay (features)."""
    return _prune(a_rn, w_n, always_n, prunable_in_n, _rows_of(row_nodes, a_rn), jnp.float32(node_threshold),
                  jnp.float32(edge_threshold))


def cumulative_influence(node_influence: jax.Array) -> jax.Array:
    """[N] each node's share of the total influence held by it and every node of larger influence
    (circuit-tracer's `cumulative_scores`, shown as a node's influence by its frontend)."""
    order = jnp.argsort(-node_influence)
    cum = jnp.cumsum(node_influence[order]) / jnp.sum(node_influence)
    return jnp.zeros_like(node_influence).at[order].set(cum)


@jax.jit
def _scores(a_rn, w_n, token_n, error_n, rn):
    a_hat = normalise(a_rn)
    inf = influence(a_hat, w_n, rn)
    tok, err = jnp.sum(jnp.where(token_n, inf, 0.0)), jnp.sum(jnp.where(error_n, inf, 0.0))
    replacement = tok / (tok + err)
    non_error = jnp.ones_like(w_n).at[rn].set(1.0 - jnp.sum(jnp.where(error_n[None, :], a_hat, 0.0), axis=1))
    weight = inf + w_n
    return replacement, jnp.sum(non_error * weight) / jnp.sum(weight)


def graph_scores(a_rn: jax.Array, w_n: jax.Array, token_n: jax.Array, error_n: jax.Array, *,
                 row_nodes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(replacement score, completeness score) of the unpruned graph: the tokens' share of the
    influence that reaches the inputs, and the influence-weighted fraction of each node's inputs
    that do not come from error nodes (a node without inputs counts as wholly non-error)."""
    return _scores(a_rn, w_n, token_n, error_n, _rows_of(row_nodes, a_rn))
