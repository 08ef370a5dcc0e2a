"""A static dashboard site from FeatureReports: viewable from disk, with no network access.

    out/index.html           every feature in one table, sortable, with a search box
    out/f/{id}.html          one page per feature: stats, histogram, logit table, the features it
                             fires with, top contexts, quantile bands, steering lines
    out/static/dash.css, dash.js

Each page carries its data as one JSON blob; `dash.js` (shipped beside it, no library) renders it:
token-level shading relative to the feature's largest activation, the value of each token on hover
(a tooltip and the `title`), the log-activation histogram as inline SVG. Pages are small (a few kB
of JSON each) so a dictionary of tens of thousands of features stays a folder a browser opens fast.
"""

from __future__ import annotations

import html
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from jaxinterp.features.report import Example, FeatureReport

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:16px 24px;color:#1d1d1f}
a{color:#0b5cad;text-decoration:none}a:hover{text-decoration:underline}
h1{font-size:22px;margin:8px 0}h2{font-size:16px;margin:22px 0 6px;border-bottom:1px solid #ddd}
.meta{color:#555}.stats span{margin-right:18px}
table{border-collapse:collapse}td,th{padding:3px 8px;text-align:left;border-bottom:1px solid #eee}
th{cursor:pointer;user-select:none;background:#f6f6f6;position:sticky;top:0}th.sorted::after{content:" \\25BE"}
th.sorted.asc::after{content:" \\25B4"}td.num{text-align:right;font-variant-numeric:tabular-nums}
#search{font-size:15px;padding:6px 10px;width:420px;margin:8px 0}
.ex{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;margin:3px 0;padding:3px 6px;
    border-left:3px solid #eee}
.ex .v{color:#888;display:inline-block;width:64px;text-align:right;margin-right:8px}
.tok{border-radius:2px}.tok.focus{outline:1.5px solid #c0392b}
.cols{display:flex;gap:32px;flex-wrap:wrap}
.logits td.pos{color:#1a7f37}.logits td.neg{color:#b42318}
pre.cmd{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12.5px}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;padding:3px 7px;border-radius:4px;
     font:12px ui-monospace,monospace;display:none;z-index:10}
code.chip{background:#f1f1f4;border-radius:3px;padding:0 4px;margin-right:4px;white-space:pre}
svg .bar{fill:#e8860c}svg text{font-size:10px;fill:#555}
"""

_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (tag, attrs = {}, text) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};
const fmt = v => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(2));
const show = t => t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");

function tooltip() {
  const tip = $("div", {id: "tip"});
  document.body.appendChild(tip);
  document.addEventListener("mouseover", e => {
    const t = e.target.closest(".tok");
    if (!t) { tip.style.display = "none"; return; }
    tip.textContent = JSON.stringify(t.dataset.text) + "  " + t.dataset.value;
    tip.style.display = "block";
  });
  document.addEventListener("mousemove", e => { tip.style.left = e.clientX + 12 + "px"; tip.style.top = e.clientY + 14 + "px"; });
}

function example(ex, scale) {
  const row = $("div", {class: "ex"});
  row.appendChild($("span", {class: "v"}, fmt(ex.values[ex.focus])));
  ex.tokens.forEach((t, i) => {
    const v = ex.values[i];
    const s = $("span", {class: "tok" + (i === ex.focus ? " focus" : ""), title: fmt(v), "data-value": fmt(v)}, show(t));
    s.dataset.text = t;
    if (v > 0) s.style.background = `rgba(232,134,12,${Math.min(1, 0.12 + 0.88 * v / scale).toFixed(3)})`;
    row.appendChild(s);
  });
  return row;
}

function histogram(heights, edges, label, logScale) {
  const w = 520, h = 120, n = heights.length, top = Math.max(1, ...heights);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h + 28); svg.setAttribute("class", "hist");
  heights.forEach((c, i) => {
    const r = document.createElementNS(svg.namespaceURI, "rect");
    const bh = c ? Math.max(1, (h * c) / top) : 0;
    Object.entries({x: (i * w) / n, y: h - bh, width: w / n - 1, height: bh, class: "bar"}).forEach(([k, v]) => r.setAttribute(k, v));
    const t = document.createElementNS(svg.namespaceURI, "title");
    const lo = logScale ? 10 ** edges[i] : edges[i], hi = logScale ? 10 ** edges[i + 1] : edges[i + 1];
    t.textContent = `${fmt(lo)} to ${fmt(hi)}: ${c}`;
    r.appendChild(t); svg.appendChild(r);
  });
  [[0, "start", edges[0]], [w, "end", edges[n]]].forEach(([x, anchor, e]) => {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", x); t.setAttribute("y", h + 14); t.setAttribute("text-anchor", anchor);
    t.textContent = fmt(logScale ? 10 ** e : e); svg.appendChild(t);
  });
  const cap = document.createElementNS(svg.namespaceURI, "text");
  cap.setAttribute("x", w / 2); cap.setAttribute("y", h + 26); cap.setAttribute("text-anchor", "middle");
  cap.textContent = label; svg.appendChild(cap);
  return svg;
}

function featurePage() {
  const f = D.feature, main = document.getElementById("main");
  document.title = `Feature ${f.index}`;
  const stats = $("div", {class: "stats"});
  [["fires on", `${(100 * f.frac_nonzero).toPrecision(3)}% of tokens (${f.count} of ${f.n_tokens})`],
   ["max", fmt(f.max)], ["mean when firing", fmt(f.mean)]].forEach(([k, v]) => stats.appendChild($("span", {}, `${k}: ${v}`)));
  main.appendChild(stats);
  const cols = $("div", {class: "cols"}), left = $("div"), right = $("div");
  cols.append(left, right); main.appendChild(cols);
  left.appendChild($("h2", {}, "Activation density"));
  const nz = f.hist.map((c, i) => (c ? i : -1)).filter(i => i >= 0);
  if (nz.length) {
    const a = nz[0], b = nz[nz.length - 1] + 1;
    left.appendChild(histogram(f.hist.slice(a, b), f.hist_edges.slice(a, b + 1), "activation (log scale)", true));
  } else left.appendChild($("p", {class: "meta"}, "never fired on the corpus read"));
  if (f.logit_hist[0].length) {
    left.appendChild($("h2", {}, "Logit effects"));
    left.appendChild(histogram(f.logit_hist[0], f.logit_hist[1], "direct effect on each vocabulary logit", false));
  }
  right.appendChild($("h2", {}, "Tokens it promotes / suppresses"));
  const lt = $("table", {class: "logits"});
  const n = Math.max(f.pos_logits.length, f.neg_logits.length);
  for (let i = 0; i < n; i++) {
    const tr = $("tr"), p = f.pos_logits[i] || ["", NaN], q = f.neg_logits[i] || ["", NaN];
    tr.append($("td", {class: "pos"}, show(p[0])), $("td", {class: "num pos"}, isNaN(p[1]) ? "" : "+" + fmt(p[1])),
              $("td", {class: "neg"}, show(q[0])), $("td", {class: "num neg"}, isNaN(q[1]) ? "" : fmt(q[1])));
    lt.appendChild(tr);
  }
  right.appendChild(lt);
  if (f.correlated.length) {
    right.appendChild($("h2", {}, "Fires together with"));
    const ct = $("table", {class: "correlated"});
    const head = $("tr");
    ["feature", "correlation", "tokens both fire on"].forEach(h => head.appendChild($("th", {}, h)));
    ct.appendChild(head);
    f.correlated.forEach(([g, r, c]) => {
      const tr = $("tr"), td = $("td");
      td.appendChild($("a", {href: `${g}.html`}, String(g)));
      tr.append(td, $("td", {class: "num"}, r.toFixed(3)),
                $("td", {class: "num"}, `${c} (${(100 * c / Math.max(1, f.count)).toPrecision(3)}%)`));
      ct.appendChild(tr);
    });
    right.appendChild(ct);
  }
  main.appendChild($("h2", {}, `Top activations (${f.top.length})`));
  const top = $("div", {id: "top"});
  f.top.forEach(ex => top.appendChild(example(ex, f.max)));
  main.appendChild(top);
  const q = $("div", {id: "quantiles"});
  f.quantiles.slice().reverse().forEach(([lo, hi, share, exs]) => {
    q.appendChild($("h2", {}, `Activations ${fmt(lo)} to ${fmt(hi)} (random sample, ${(100 * share).toFixed(0)}% of firing tokens)`));
    exs.forEach(ex => q.appendChild(example(ex, f.max)));
  });
  main.appendChild(q);
  main.appendChild($("h2", {}, "Steer with it"));
  D.steer.forEach(line => main.appendChild($("pre", {class: "cmd"}, line)));
}

function chips(tokens) {
  const td = $("td");
  tokens.forEach(t => td.appendChild($("code", {class: "chip"}, show(t))));
  return td;
}

function indexPage() {
  const body = document.getElementById("rows"), heads = [...document.querySelectorAll("th[data-key]")];
  let key = "count", asc = false;
  const render = () => {
    const q = document.getElementById("search").value.trim().toLowerCase();
    const rows = D.rows.filter(r => !q || String(r.id) === q || r.search.includes(q));
    rows.sort((a, b) => (asc ? 1 : -1) * (a[key] - b[key]) || a.id - b.id);
    body.replaceChildren(...rows.slice(0, 2000).map(r => {
      const tr = $("tr");
      const a = $("a", {href: `f/${r.id}.html`}, String(r.id));
      const td = $("td"); td.appendChild(a); tr.appendChild(td);
      tr.append($("td", {class: "num"}, (100 * r.freq).toPrecision(3) + "%"), $("td", {class: "num"}, fmt(r.max)),
                $("td", {class: "num"}, fmt(r.mean)), chips(r.tokens), chips(r.logits));
      return tr;
    }));
    document.getElementById("shown").textContent = `${rows.length} of ${D.rows.length} features` + (rows.length > 2000 ? " (first 2000 listed)" : "");
    heads.forEach(h => h.className = h.dataset.key === key ? "sorted" + (asc ? " asc" : "") : "");
  };
  heads.forEach(h => h.addEventListener("click", () => { asc = h.dataset.key === key ? !asc : false; key = h.dataset.key; render(); }));
  document.getElementById("search").addEventListener("input", render);
  render();
}

tooltip();
(D.feature ? featurePage : indexPage)();
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="{root}static/dash.css"></head>
<body>{nav}<h1>{title}</h1><p class="meta">{subtitle}</p>
{body}
<script type="application/json" id="data">{data}</script>
<script src="{root}static/dash.js"></script>
</body></html>
"""

_INDEX_BODY = """<input id="search" type="search" placeholder="search: a feature id, or a token it fires on or promotes">
<p class="meta" id="shown"></p>
<table><thead><tr><th data-key="id">feature</th><th data-key="freq">fires on</th><th data-key="max">max</th>
<th data-key="mean">mean</th><th>top tokens</th><th>promotes</th></tr></thead><tbody id="rows"></tbody></table>"""


def _json(obj) -> str:
    # inside <script>: no "</" may close the element early
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def _example(ex: Example) -> dict:
    return {"tokens": list(ex.tokens), "values": list(ex.values), "focus": ex.focus}


def _feature_data(r: FeatureReport) -> dict:
    n_sampled = sum(len(q.examples) for q in r.quantiles)
    return {"index": r.index, "count": r.count, "n_tokens": r.n_tokens, "frac_nonzero": r.frac_nonzero,
            "mean": r.mean, "max": r.max, "hist": list(r.hist), "hist_edges": list(r.hist_edges),
            "top": [_example(e) for e in r.top],
            "quantiles": [[q.lo, q.hi, len(q.examples) / n_sampled, [_example(e) for e in q.examples]]
                          for q in r.quantiles],
            "pos_logits": [list(p) for p in r.pos_logits], "neg_logits": [list(p) for p in r.neg_logits],
            "logit_hist": [list(r.logit_hist[0]), list(r.logit_hist[1])],
            "correlated": [list(c) for c in r.correlated]}


def top_tokens(r: FeatureReport, n: int = 5) -> list[str]:
    """The tokens its top examples fire on, most frequent first."""
    return [t for t, _ in Counter(e.tokens[e.focus] for e in r.top).most_common(n)]


def steering_lines(r: FeatureReport, *, dictionary: str, site: str) -> list[str]:
    """Command lines that steer generation with the feature: add it at about twice its largest
    activation, and ablate it."""
    base = f"python3 launch/generate.py --dictionary {dictionary} --prompt 'The weather today is'"
    add = float(f"{2 * r.max:.3g}") if r.max > 0 else 1.0
    return [f"{base} --steer {site}:feature={r.index}:add={add:g}",
            f"{base} --steer {site}:feature={r.index}:ablate"]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_site(out_dir, reports: Sequence[FeatureReport], *, dictionary: str, site: str, title: str = "Features",
               subtitle: str = "") -> Path:
    """Write the dashboard of `reports` into `out_dir` (`dictionary`: the path the steering lines
    name, `site`: where the dictionary reads); returns index.html's path."""
    out = Path(out_dir)
    (out / "f").mkdir(parents=True, exist_ok=True)
    (out / "static").mkdir(exist_ok=True)
    _write(out / "static" / "dash.css", _CSS)
    _write(out / "static" / "dash.js", _JS)
    ids = [r.index for r in reports]
    for i, r in enumerate(reports):
        nav = ('<p class="meta"><a href="../index.html">all features</a>'
               + (f' · <a href="{ids[i - 1]}.html">previous</a>' if i else "")
               + (f' · <a href="{ids[i + 1]}.html">next</a>' if i + 1 < len(ids) else "") + "</p>")
        data = {"feature": _feature_data(r), "steer": steering_lines(r, dictionary=dictionary, site=site)}
        _write(out / "f" / f"{r.index}.html",
               _PAGE.format(title=f"Feature {r.index}", subtitle=html.escape(subtitle), root="../", nav=nav,
                            body='<div id="main"></div>', data=_json(data)))
    rows = []
    for r in reports:
        tokens, logits = top_tokens(r), [t for t, _ in r.pos_logits[:5]]
        rows.append({"id": r.index, "count": r.count, "freq": r.frac_nonzero, "max": r.max, "mean": r.mean,
                     "tokens": tokens, "logits": logits, "search": " ".join(tokens + logits).lower()})
    _write(out / "index.html", _PAGE.format(title=html.escape(title), subtitle=html.escape(subtitle), root="", nav="",
                                            body=_INDEX_BODY, data=_json({"rows": rows})))
    return out / "index.html"
