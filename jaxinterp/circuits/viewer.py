"""A self-contained page that draws an attribution graph (the frontend JSON of `graph_files`): prompt
positions across, layers up (token embeddings at the bottom, logits at the top), edges coloured by
sign with opacity by weight. Clicking a node lists its strongest incoming and outgoing edges and, when
a feature dashboard is given, shows the feature's page. No network access: the graph is inlined.

Dashboard layout: `DIR/layer_{layer}/f/{feature}.html` (one dashboard per CLT layer) or
`DIR/f/{feature}.html` (one dictionary); the page links whichever exists, relative to the viewer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px system-ui,sans-serif;margin:0;display:flex;height:100vh}
#main{flex:1;overflow:auto;padding:8px} #side{width:360px;border-left:1px solid #ccc;padding:8px;overflow:auto}
svg text{font-size:11px} .node{cursor:pointer;stroke:#333;stroke-width:.5}
.node.sel{stroke:#000;stroke-width:2.5} .edge{fill:none} table{border-collapse:collapse;width:100%}
td{padding:2px 4px;border-bottom:1px solid #eee} h3{margin:8px 0 4px} iframe{width:100%;height:420px;border:1px solid #ccc}
.pos{color:#1f5fbf}.neg{color:#c0392b}
</style></head><body>
<div id="main"><div id="title"></div><svg id="g"></svg></div>
<div id="side"><div id="info">Click a node.</div></div>
<script type="application/json" id="graph-data">__GRAPH__</script>
<script type="application/json" id="dash-data">__DASH__</script>
<script>
const G = JSON.parse(document.getElementById('graph-data').textContent);
const DASH = JSON.parse(document.getElementById('dash-data').textContent);
const toks = G.metadata.prompt_tokens, T = toks.length;
const layerOf = n => n.feature_type === 'embedding' ? -1 : parseInt(n.layer);
const maxLayer = Math.max(...G.nodes.map(layerOf));
const colW = 110, rowH = 46, padL = 70, padB = 60, padT = 30;
const W = padL + T * colW + 20, H = padT + (maxLayer + 2) * rowH + padB;
const svg = document.getElementById('g'); svg.setAttribute('width', W); svg.setAttribute('height', H);
const NS = 'http://www.w3.org/2000/svg';
const el = (tag, attrs, parent) => { const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]); (parent || svg).appendChild(e); return e; };
document.getElementById('title').textContent = G.metadata.prompt + '  (' + G.nodes.length + ' nodes, ' + G.links.length + ' edges)';
const cells = {};
for (const n of G.nodes) { const k = layerOf(n) + ':' + n.ctx_idx; (cells[k] = cells[k] || []).push(n); }
const pos = {};
for (const k in cells) { const ns = cells[k].sort((a, b) => (b.influence || 0) - (a.influence || 0));
  ns.forEach((n, i) => { const l = layerOf(n), m = ns.length;
    pos[n.node_id] = [padL + n.ctx_idx * colW + colW / 2 + (i - (m - 1) / 2) * Math.min(14, (colW - 10) / m),
                      H - padB - (l + 1) * rowH]; }); }
for (let l = -1; l <= maxLayer; l++) el('text', {x: 4, y: H - padB - (l + 1) * rowH + 4}).textContent =
  l === -1 ? 'Emb' : (l === maxLayer && G.nodes.some(n => n.feature_type === 'logit' && parseInt(n.layer) === l) ? 'Logit' : 'L' + l);
toks.forEach((t, i) => el('text', {x: padL + i * colW + colW / 2, y: H - 20, 'text-anchor': 'middle'}).textContent = JSON.stringify(t));
const maxW = Math.max(1e-9, ...G.links.map(e => Math.abs(e.weight)));
const edgeEls = [];
for (const e of G.links) { const a = pos[e.source], b = pos[e.target]; if (!a || !b) continue;
  const p = el('path', {d: `M${a[0]},${a[1]} C${a[0]},${(a[1] + b[1]) / 2} ${b[0]},${(a[1] + b[1]) / 2} ${b[0]},${b[1]}`,
    class: 'edge', stroke: e.weight > 0 ? '#1f5fbf' : '#c0392b', 'stroke-opacity': 0.08 + 0.5 * Math.abs(e.weight) / maxW,
    'stroke-width': 0.5 + 2 * Math.abs(e.weight) / maxW});
  edgeEls.push([e, p]); }
const colour = {'cross layer transcoder': '#f4c542', 'mlp reconstruction error': '#999', embedding: '#7fb3d5', logit: '#82c785'};
const nodeEls = {};
for (const n of G.nodes) { const [x, y] = pos[n.node_id];
  const c = el(n.feature_type === 'mlp reconstruction error' ? 'rect' : 'circle',
    n.feature_type === 'mlp reconstruction error' ? {x: x - 5, y: y - 5, width: 10, height: 10} : {cx: x, cy: y, r: 6});
  c.setAttribute('class', 'node'); c.setAttribute('fill', colour[n.feature_type] || '#ccc');
  c.setAttribute('data-id', n.node_id); c.addEventListener('click', () => select(n.node_id)); nodeEls[n.node_id] = c;
  el('title', {}, c).textContent = n.node_id + ' ' + (n.clerp || n.feature_type); }
const byId = Object.fromEntries(G.nodes.map(n => [n.node_id, n]));
const esc = s => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
function label(id) { return esc(rawLabel(id)); }
function rawLabel(id) { const n = byId[id]; if (!n) return id;
  if (n.feature_type === 'embedding') return 'token ' + JSON.stringify(toks[n.ctx_idx]) + ' @' + n.ctx_idx;
  if (n.feature_type === 'logit') return n.clerp;
  if (n.feature_type === 'mlp reconstruction error') return 'error L' + n.layer + ' @' + n.ctx_idx;
  return 'feature L' + n.layer + ' #' + id.split('_')[1] + ' @' + n.ctx_idx; }
function rows(list, key) { return list.slice(0, 10).map(e => `<tr><td>${label(e[key])}</td><td class="${e.weight > 0 ? 'pos' : 'neg'}">${e.weight.toFixed(4)}</td></tr>`).join(''); }
function select(id) { const n = byId[id];
  for (const k in nodeEls) nodeEls[k].classList.toggle('sel', k === id);
  for (const [e, p] of edgeEls) { const on = e.source === id || e.target === id;
    p.setAttribute('stroke-opacity', on ? 0.9 : 0.03); }
  const inc = G.links.filter(e => e.target === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const out = G.links.filter(e => e.source === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  let h = `<h3 id="sel-title">${label(id)}</h3><div>${esc(n.feature_type)}` +
    (n.activation != null ? ` · activation ${n.activation.toFixed(3)}` : '') +
    (n.influence != null ? ` · cumulative influence ${n.influence.toFixed(3)}` : '') + `</div>` +
    `<h3>Top inputs</h3><table id="inputs">${rows(inc, 'source')}</table><h3>Top outputs</h3><table id="outputs">${rows(out, 'target')}</table>`;
  if (n.feature_type === 'cross layer transcoder') { const fid = id.split('_')[1], pg = DASH[n.layer + '_' + fid];
    if (pg) h += `<h3>Top contexts</h3><iframe id="contexts" src="${pg}"></iframe>`; }
  document.getElementById('info').innerHTML = h; }
</script></body></html>
"""


def _dashboard_pages(doc: dict, dashboard: str | Path | None, page_dir: Path) -> dict[str, str]:
    """{"{layer}_{feature}": relative URL} for the graph's features that have a dashboard page."""
    if dashboard is None:
        return {}
    root = Path(dashboard)
    pages = {}
    for n in doc["nodes"]:
        if n["feature_type"] != "cross layer transcoder":
            continue
        layer, fid = n["layer"], n["node_id"].split("_")[1]
        for cand in (root / f"layer_{layer}" / "f" / f"{fid}.html", root / "f" / f"{fid}.html"):
            if cand.is_file():
                pages[f"{layer}_{fid}"] = os.path.relpath(cand, page_dir)
                break
    return pages


def write_viewer(path: str | Path, doc: dict, *, dashboard: str | Path | None = None) -> Path:
    """Write the viewer page for graph JSON `doc` to `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    safe = lambda obj: json.dumps(obj).replace("</", "<\\/")  # noqa: E731
    title = doc["metadata"].get("prompt", "attribution graph").replace("<", "&lt;")
    html = (PAGE.replace("__TITLE__", title).replace("__GRAPH__", safe(doc))
            .replace("__DASH__", safe(_dashboard_pages(doc, dashboard, p.parent.absolute()))))
    p.write_text(html)
    return p
