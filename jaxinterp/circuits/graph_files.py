"""An attribution graph, pruned and written: the JSON the circuit-tracer / Neuronpedia frontend reads,
and `graph.npz` with the unpruned graph in circuit-tracer's node order.

Node ids (the frontend's): a feature `{layer}_{feature}_{pos}`, an error `0_{layer}_{pos}`, a token
`E_{token id}_{pos}`, a logit `{n_layers + 1}_{token id}_{last pos}`. A node's `influence` is its
cumulative influence (the share of all influence held by it and every node above it), as there.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxinterp.circuits import pruning
from jaxinterp.circuits.attribution import Graph


class PrunedGraph(NamedTuple):
    node_mask: np.ndarray
    """[N] bool"""
    edge_mask: np.ndarray
    """[M + K, N] bool, in the layout of `Graph.rows`."""
    node_influence: np.ndarray
    """[N] influence on the logits in the unpruned graph."""
    cumulative: np.ndarray
    """[N] cumulative influence (see the module docstring)."""
    replacement_score: float
    completeness_score: float


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """circuit-tracer's `prune_graph` and `compute_graph_scores` on the graph's rows."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            from jaxinterp.errors import UsageError

            raise UsageError(f"{name}={v}: give a fraction of influence in [0, 1]")
    kinds = graph.node_kinds()
    rows, rn, w = jnp.asarray(graph.rows), jnp.asarray(graph.row_nodes), jnp.asarray(graph.logit_weights)
    p = pruning.prune(rows, w, jnp.asarray(kinds >= 2), jnp.asarray(kinds == 0), row_nodes=rn,
                      node_threshold=node_threshold, edge_threshold=edge_threshold)
    rep, comp = pruning.graph_scores(rows, w, jnp.asarray(kinds == 2), jnp.asarray(kinds == 1), row_nodes=rn)
    return PrunedGraph(np.asarray(p.node_mask), np.asarray(p.edge_mask), np.asarray(p.node_influence),
                       np.asarray(pruning.cumulative_influence(p.node_influence)), float(rep), float(comp))


def node_ids(graph: Graph) -> list[str]:
    """The frontend id of every node, in node order."""
    ids = []
    for i in graph.selected_features:
        layer, pos, fid = graph.active_features[i]
        ids.append(f"{layer}_{fid}_{pos}")
    ids += [f"0_{j}_{p}" for j in range(graph.n_layers) for p in range(graph.n_pos)]
    ids += [f"E_{int(t)}_{p}" for p, t in enumerate(graph.input_ids)]
    ids += [f"{graph.n_layers + 1}_{int(v)}_{graph.n_pos - 1}" for v in graph.logit_token_ids]
    return ids


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def graph_json(graph: Graph, pruned: PrunedGraph, *, decode, slug: str = "graph", scan: str = "jaxinterp",
               node_threshold: float = 0.8, info: dict | None = None) -> dict:
    """The frontend's graph: `metadata`, `qParams`, `nodes`, `links` (kept edges between kept nodes;
    nodes without a kept edge dropped, tokens and logits always shown). `decode(ids) -> str`."""
    ids = node_ids(graph)
    kinds = graph.node_kinds()
    m, t = graph.n_features, graph.n_pos
    nodes: dict[int, dict] = {}
    for i in np.nonzero(pruned.node_mask)[0].tolist():
        inf = float(pruned.cumulative[i])
        node = {"node_id": ids[i], "feature": 0, "layer": "", "ctx_idx": 0, "feature_type": "", "token_prob": 0.0,
                "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "", "clerp": "",
                "influence": inf, "activation": None}
        if kinds[i] == 0:
            a = graph.selected_features[i]
            layer, pos, fid = (int(v) for v in graph.active_features[a])
            node |= {"feature": _cantor(layer, fid), "layer": str(layer), "ctx_idx": pos,
                     "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{fid}-0",
                     "activation": float(graph.activation_values[a])}
        elif kinds[i] == 1:
            layer, pos = divmod(i - m, t)
            node |= {"feature": -1, "layer": str(layer), "ctx_idx": pos, "feature_type": "mlp reconstruction error",
                     "jsNodeId": f"{layer}_{pos}-0"}
        elif kinds[i] == 2:
            pos = i - m - graph.n_layers * t
            tok = int(graph.input_ids[pos])
            node |= {"feature": pos, "layer": "E", "ctx_idx": pos, "feature_type": "embedding",
                     "jsNodeId": f"E_{tok}-{pos}"}
        else:
            k = i - (graph.n_nodes - graph.n_logits)
            v, prob = int(graph.logit_token_ids[k]), float(graph.logit_probabilities[k])
            node |= {"feature": v, "layer": str(graph.n_layers + 1), "ctx_idx": t - 1, "feature_type": "logit",
                     "token_prob": prob, "is_target_logit": k == 0, "jsNodeId": f"L_{v}-{t - 1}",
                     "clerp": f'Output "{decode([v])}" (p={prob:.3f})', "influence": None}
        nodes[i] = node
    r, s = np.nonzero(pruned.edge_mask)
    dst = graph.row_nodes[r]
    links = [{"source": ids[a], "target": ids[b], "weight": float(w)}
             for a, b, w in zip(s.tolist(), dst.tolist(), graph.rows[r, s].tolist()) if a in nodes and b in nodes]
    used = {x for lk in links for x in (lk["source"], lk["target"])}
    shown = [n for n in nodes.values() if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]
    meta = {"slug": slug, "scan": scan, "transcoder_list": [],
            "prompt_tokens": [decode([int(x)]) for x in graph.input_ids], "prompt": decode([int(x) for x in graph.input_ids]),
            "node_threshold": node_threshold, "schema_version": 1,
            "info": {"replacement_score": pruned.replacement_score, "completeness_score": pruned.completeness_score,
                     **(info or {})}}
    return {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                          "sg_pos": ""}, "nodes": shown, "links": links}


def write_json(path: str | Path, doc: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc))
    return p


def _write_npy(zf: zipfile.ZipFile, name: str, a: np.ndarray) -> None:
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)


def write_npz(path: str | Path, graph: Graph, pruned: PrunedGraph | None = None, *, block_rows: int = 1024) -> Path:
    """`graph.npz`: input_ids, active_features [n, 3], activation_values, selected_features,
    logit_token_ids, logit_probabilities and the dense adjacency [N, N] (rows targets) in circuit-tracer's
    node order, written a block of rows at a time (memory stays that of the rows); with `pruned`, also
    node_mask, node_influence, cumulative_influence, the kept edges (edge_targets, edge_sources,
    edge_weights) and the two scores."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"input_ids": graph.input_ids.astype(np.int64), "active_features": graph.active_features.astype(np.int64),
              "activation_values": graph.activation_values, "selected_features": graph.selected_features.astype(np.int64),
              "logit_token_ids": graph.logit_token_ids.astype(np.int64), "logit_probabilities": graph.logit_probabilities}
    if pruned is not None:
        r, s = np.nonzero(pruned.edge_mask)
        arrays |= {"node_mask": pruned.node_mask, "node_influence": pruned.node_influence,
                   "cumulative_influence": pruned.cumulative, "edge_targets": graph.row_nodes[r].astype(np.int64),
                   "edge_sources": s.astype(np.int64), "edge_weights": graph.rows[r, s],
                   "replacement_score": np.float32(pruned.replacement_score),
                   "completeness_score": np.float32(pruned.completeness_score)}
    n = graph.n_nodes
    where = np.full(n, -1)
    where[graph.row_nodes] = np.arange(len(graph.row_nodes))
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as zf:
        for k, v in arrays.items():
            _write_npy(zf, k, v)
        with zf.open("adjacency.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                     "fortran_order": False, "shape": (n, n)})
            for s0 in range(0, n, block_rows):
                block = np.zeros((min(block_rows, n - s0), n), np.float32)
                idx = where[s0:s0 + len(block)]
                block[idx >= 0] = graph.rows[idx[idx >= 0]]
                f.write(block.tobytes())
    return p
