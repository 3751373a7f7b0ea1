"""Write a trajectory tree as one self-contained, interactive HTML page (D3 v7, no network).

The page inlines the vendored D3 library and embeds the tree as its *flat* node list
(:meth:`TrajectoryTree.to_dict`); the browser rebuilds the hierarchy with ``d3.stratify``,
which is iterative, so a 100,000-frame chain loads where a nested JSON tree would hit the
JavaScript parser's or a recursive walker's depth limit.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

from arcfab_gym.atomic import write_atomic
from arcfab_gym.fabric.tree import TrajectoryTree

#: What nodes can be coloured by: their session (= branch) or a numeric meta value.
COLOR_BY = ("session", "reward", "value", "visits")

#: Trees bigger than this open collapsed below :data:`COLLAPSE_DEPTH` to stay responsive.
BIG_TREE_NODES = 5000
COLLAPSE_DEPTH = 30

# Markers around the embedded data, so tools (and the tests) can pull it back out.
DATA_BEGIN = "/*ARCFAB_TREE_JSON_BEGIN*/"
DATA_END = "/*ARCFAB_TREE_JSON_END*/"


def check_color_by(color_by: str) -> str:
    """Return ``color_by`` if it is one of :data:`COLOR_BY`, else raise a ValueError saying so."""
    if color_by not in COLOR_BY:
        raise ValueError(
            f"color_by={color_by!r} is not supported; use one of {', '.join(map(repr, COLOR_BY))}"
        )
    return color_by


@functools.lru_cache(maxsize=1)
def load_d3() -> str:
    """The vendored D3 v7 library, ready to inline in a <script> element."""
    resource = files("arcfab_gym.viz") / "static" / "d3.v7.min.js"
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the vendored D3 library is missing ({resource}); reinstall arcfab-gym, or restore "
            "arcfab_gym/viz/static/d3.v7.min.js from the d3@7 npm package (dist/d3.min.js)"
        ) from None
    # A literal "</script" would end the inline element early; "<\/" means the same in JS
    # strings and regexes, the only places it can occur.
    return re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)


def embed_json(data: Any) -> str:
    """JSON text safe inside an inline <script>: no "</", "<!--" or "]]>" can appear.

    ``<``, ``>`` and ``&`` occur only inside JSON strings, where their ``\\u`` escapes mean
    the same, so the text still parses to ``data`` both as JSON and as a JS literal.
    """
    text = json.dumps(data, separators=(",", ":"))  # ensure_ascii also escapes U+2028/9
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def extract_embedded_json(page: str) -> Any:
    """Parse the tree data back out of a page written by :func:`write_tree_html`."""
    try:
        start = page.index(DATA_BEGIN) + len(DATA_BEGIN)
        end = page.index(DATA_END, start)
    except ValueError:
        raise ValueError(
            "no embedded trajectory tree found; pass the text of a page written by "
            "write_tree_html"
        ) from None
    return json.loads(page[start:end])


def _plural(count: int, word: str) -> str:
    plural = "leaves" if word == "leaf" else word + "s"
    return f"{count:,} {word if count == 1 else plural}"


def _counts(tree: TrajectoryTree) -> dict[str, int]:
    return {
        "nodes": len(tree),
        "leaves": len(tree.get_leaves()),
        "forks": len(tree.get_fork_points()),
        "roots": len(tree.roots),
        "sessions": len(tree.sessions),
    }


def render_tree_html(
    tree: TrajectoryTree,
    *,
    title: str = "Arc Fabric trajectory tree",
    color_by: str = "session",
) -> str:
    """The page :func:`write_tree_html` writes, as a string."""
    if not isinstance(tree, TrajectoryTree):
        raise TypeError(f"expected a TrajectoryTree, got {type(tree).__name__}")
    check_color_by(color_by)
    counts = _counts(tree)
    options = {
        "color_by": color_by,
        "big": counts["nodes"] > BIG_TREE_NODES,
        "collapse_depth": COLLAPSE_DEPTH,
    }
    summary = " · ".join(
        _plural(counts[key], word)
        for key, word in (
            ("nodes", "node"),
            ("leaves", "leaf"),
            ("forks", "fork point"),
            ("sessions", "session"),
            ("roots", "root"),
        )
    )
    if options["big"]:
        summary += f" · opened collapsed below depth {COLLAPSE_DEPTH}"
    page = _TEMPLATE
    for key, value in (
        # "@" escaped so a title can never contain a placeholder.
        ("@@TITLE@@", html.escape(title).replace("@", "&#64;")),
        ("@@SUMMARY@@", html.escape(summary)),
        ("@@COLOR_BY@@", html.escape(color_by)),
        ("@@OPTIONS@@", embed_json(options)),
        ("@@APP@@", _APP_JS),
    ):
        page = page.replace(key, value)
    # The two big pieces go in last, so no placeholder text inside them is ever replaced.
    head, _, rest = page.partition("@@D3@@")
    middle, _, tail = rest.partition("@@DATA@@")
    return "".join((head, load_d3(), middle, DATA_BEGIN, embed_json(tree.to_dict()), DATA_END, tail))


def write_tree_html(
    tree: TrajectoryTree,
    path: str | os.PathLike[str],
    *,
    title: str = "Arc Fabric trajectory tree",
    color_by: str = "session",
) -> Path:
    """Write ``tree`` as one self-contained HTML page at ``path`` (atomically); return the path.

    Open it in any browser, offline: D3 is inlined. Nodes are coloured by session (branch)
    or by ``meta.reward`` / ``meta.value`` / ``meta.visits``; fork points are drawn larger,
    the chosen path (``meta.chosen`` true) thick; hover for details, click to fold.
    """
    text = render_tree_html(tree, title=title, color_by=color_by)
    return write_atomic(path, text)  # a reader never sees half a page


# The page. Placeholders are @@NAME@@; the app script must never contain "</".
_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@@TITLE@@</title>
<style>
  html, body { margin: 0; height: 100%; font: 13px system-ui, sans-serif; color: #222; }
  body { display: flex; flex-direction: column; }
  header { padding: 8px 14px; border-bottom: 1px solid #ddd; background: #fafafa; }
  header h1 { font-size: 16px; margin: 0 0 2px 0; }
  #summary { color: #444; }
  #hint { color: #777; font-size: 12px; }
  #main { position: relative; flex: 1; min-height: 300px; }
  #tree { width: 100%; height: 100%; display: block; cursor: grab; background: #fff; }
  #legend { position: absolute; top: 8px; right: 8px; background: rgba(255,255,255,0.92);
            border: 1px solid #ddd; border-radius: 4px; padding: 6px 10px; max-height: 70%;
            overflow: auto; font-size: 12px; }
  #legend .row { display: flex; align-items: center; gap: 6px; margin: 2px 0; white-space: nowrap; }
  #legend .head { font-weight: 600; margin: 4px 0 2px 0; }
  .link { fill: none; stroke: #b8b8b8; stroke-width: 1.2px; }
  .link.chosen { stroke: #ff7f0e; stroke-width: 4px; }
  .node circle { stroke: #333; stroke-width: 0.8px; cursor: pointer; }
  .node.chosen circle { stroke: #ff7f0e; stroke-width: 2.5px; }
  .node.collapsed circle { stroke: #000; stroke-width: 2.5px; stroke-dasharray: 2 1.5; }
  .node text { font-size: 10px; fill: #333; pointer-events: none; }
  #status { position: absolute; left: 10px; bottom: 8px; color: #666; font-size: 12px;
            background: rgba(255,255,255,0.85); padding: 2px 6px; }
</style>
</head>
<body>
<header>
  <h1>@@TITLE@@</h1>
  <div id="summary">@@SUMMARY@@ · coloured by @@COLOR_BY@@</div>
  <div id="hint">Left to right: steps from the root (frame order). Scroll to zoom, drag to pan,
  click a node to fold or unfold its children, hover for details.</div>
</header>
<div id="main">
  <svg id="tree"></svg>
  <div id="legend"></div>
  <div id="status"></div>
</div>
<script>
/* D3 v7 (ISC license, Copyright 2010-2026 Mike Bostock; see LICENSE-d3.txt), inlined. */
@@D3@@
</script>
<script>
const ARCFAB_TREE = @@DATA@@;
const ARCFAB_OPTIONS = @@OPTIONS@@;
@@APP@@
</script>
</body>
</html>
"""

_APP_JS = r"""
(function () {
  "use strict";
  const rows = ARCFAB_TREE.nodes;
  const opts = ARCFAB_OPTIONS;
  const svg = d3.select("#tree");
  const status = d3.select("#status");
  if (rows.length === 0) {
    status.text("The tree is empty.");
    return;
  }

  // ---- hierarchy: d3.stratify is iterative, so deep chains are fine.
  const ids = new Set(rows.map(r => r.id));
  let forestId = "__arcfab_forest__";
  while (ids.has(forestId)) forestId += "_";
  const nRoots = rows.filter(r => r.parent_id === null).length;
  let table = rows;
  if (nRoots !== 1) {
    const top = {id: forestId, parent_id: null, session_id: null, frame_index: null,
                 meta: {}, synthetic: true};
    table = [top].concat(rows.map(r => r.parent_id === null ? Object.assign({}, r, {parent_id: forestId}) : r));
  }
  const root = d3.stratify().id(d => d.id).parentId(d => d.parent_id)(table);
  const all = root.descendants();
  for (const d of all) d.nkids = d.children ? d.children.length : 0;

  // ---- colour
  const colorBy = opts.color_by;
  let fill;
  const legend = d3.select("#legend");
  if (colorBy === "session") {
    const sessions = Array.from(new Set(rows.map(r => r.session_id)));
    const palette = sessions.length <= 10 ? d3.schemeTableau10
      : d3.quantize(t => d3.interpolateSinebow(t * 0.9), sessions.length);
    const scale = d3.scaleOrdinal(sessions, palette);
    fill = d => d.data.synthetic ? "#999" : scale(d.data.session_id);
    legend.append("div").attr("class", "head").text("session (branch)");
    const shown = sessions.slice(0, 12);
    for (const s of shown) {
      const row = legend.append("div").attr("class", "row");
      row.append("svg").attr("width", 12).attr("height", 12).append("circle")
        .attr("cx", 6).attr("cy", 6).attr("r", 5).attr("fill", scale(s)).attr("stroke", "#333");
      row.append("span").text(s);
    }
    if (sessions.length > shown.length) {
      legend.append("div").attr("class", "row").text("+ " + (sessions.length - shown.length) + " more");
    }
  } else {
    const num = v => typeof v === "number" && isFinite(v);
    const values = rows.map(r => r.meta[colorBy]).filter(num);
    legend.append("div").attr("class", "head").text("meta." + colorBy);
    if (values.length === 0) {
      fill = () => "#bbb";
      legend.append("div").attr("class", "row").text("no node has a numeric meta." + colorBy);
    } else {
      let [lo, hi] = d3.extent(values);
      if (lo === hi) { lo -= 1; hi += 1; }
      const scale = d3.scaleSequential(d3.interpolateViridis).domain([lo, hi]);
      fill = d => num(d.data.meta[colorBy]) ? scale(d.data.meta[colorBy]) : "#bbb";
      const w = 140, bar = legend.append("svg").attr("width", w + 20).attr("height", 34);
      const grad = bar.append("defs").append("linearGradient").attr("id", "arcfab-grad");
      for (let i = 0; i <= 10; i++) {
        grad.append("stop").attr("offset", (i * 10) + "%").attr("stop-color", scale(lo + (hi - lo) * i / 10));
      }
      bar.append("rect").attr("x", 10).attr("y", 2).attr("width", w).attr("height", 12)
        .attr("fill", "url(#arcfab-grad)");
      bar.append("text").attr("x", 10).attr("y", 28).attr("font-size", 10).text(d3.format(".3~g")(lo));
      bar.append("text").attr("x", 10 + w).attr("y", 28).attr("font-size", 10)
        .attr("text-anchor", "end").text(d3.format(".3~g")(hi));
      const row = legend.append("div").attr("class", "row");
      row.append("svg").attr("width", 12).attr("height", 12).append("circle")
        .attr("cx", 6).attr("cy", 6).attr("r", 5).attr("fill", "#bbb").attr("stroke", "#333");
      row.append("span").text("no value");
    }
  }
  legend.append("div").attr("class", "head").text("marks");
  const mark = (draw, label) => {
    const row = legend.append("div").attr("class", "row");
    draw(row.append("svg").attr("width", 24).attr("height", 16));
    row.append("span").text(label);
  };
  mark(s => s.append("circle").attr("cx", 12).attr("cy", 8).attr("r", 7).attr("fill", "#ccc").attr("stroke", "#333"),
       "fork point (larger)");
  mark(s => s.append("line").attr("x1", 0).attr("x2", 24).attr("y1", 8).attr("y2", 8)
                 .attr("stroke", "#ff7f0e").attr("stroke-width", 4), "chosen path");
  mark(s => s.append("circle").attr("cx", 12).attr("cy", 8).attr("r", 5).attr("fill", "#ccc")
                 .attr("stroke", "#000").attr("stroke-width", 2.5).attr("stroke-dasharray", "2 1.5"),
       "folded (click to unfold)");

  // ---- folding
  const unfoldLevels = opts.big ? opts.collapse_depth : 1;
  if (opts.big) {
    for (const d of all) {
      if (d.depth >= opts.collapse_depth && d.children) { d._children = d.children; d.children = null; }
    }
  }
  function fold(d) {
    if (d.children) { d._children = d.children; d.children = null; }
  }
  function unfold(d) {
    // Unfold up to unfoldLevels levels, iteratively; deeper nodes stay folded.
    const stack = [d];
    const limit = d.depth + unfoldLevels;
    while (stack.length) {
      const n = stack.pop();
      if (n.depth >= limit) continue;
      if (n._children) { n.children = n._children; n._children = null; }
      if (n.children) for (const c of n.children) stack.push(c);
    }
  }

  // ---- drawing
  const DX = 18, DY = 80;
  const layout = d3.tree().nodeSize([DX, DY]).separation((a, b) => a.parent === b.parent ? 1 : 1.4);
  const zoomLayer = svg.append("g");
  const linkLayer = zoomLayer.append("g");
  const nodeLayer = zoomLayer.append("g");
  const linkPath = d3.linkHorizontal().x(d => d.y).y(d => d.x);
  const isChosen = d => !!(d.data.meta && d.data.meta.chosen === true);
  const radius = d => d.data.synthetic ? 3 : (d.nkids > 1 ? 8 : 4.5);
  const fmt = v => typeof v === "number" ? d3.format(".4~g")(v) : String(v);

  function tooltip(d) {
    if (d.data.synthetic) return "forest: " + (d.nkids) + " roots";
    const m = d.data.meta || {};
    const lines = ["id: " + d.data.id, "session: " + d.data.session_id, "frame: " + d.data.frame_index];
    for (const k of ["kind", "prompt", "seed", "reward", "visits", "value", "chosen"]) {
      if (m[k] !== undefined && m[k] !== null) lines.push(k + ": " + fmt(m[k]));
    }
    lines.push("children: " + d.nkids);
    if (d._children) lines.push("(folded: click to unfold)");
    return lines.join("\n");
  }
  const shortLabel = s => s.length > 14 ? s.slice(0, 13) + "\u2026" : s;

  function update() {
    layout(root);
    const nodes = root.descendants();
    const links = root.links();
    const labels = nodes.length <= 200;
    linkLayer.selectAll("path").data(links, d => d.target.id).join("path")
      .attr("class", d => isChosen(d.source) && isChosen(d.target) ? "link chosen" : "link")
      .attr("d", linkPath);
    // chosen links on top of the others
    linkLayer.selectAll("path.chosen").raise();
    const g = nodeLayer.selectAll("g.node").data(nodes, d => d.id).join(enter => {
      const e = enter.append("g");
      e.append("circle");
      e.append("title");
      e.append("text").attr("dx", 10).attr("dy", 3.5);
      e.on("click", (event, d) => {
        if (d.children) fold(d); else unfold(d);
        update();
      });
      return e;
    });
    g.attr("class", d => "node" + (isChosen(d) ? " chosen" : "") + (d._children ? " collapsed" : ""))
      .attr("transform", d => "translate(" + d.y + "," + d.x + ")");
    g.select("circle").attr("r", radius).attr("fill", fill);
    g.select("title").text(tooltip);
    g.select("text").text(d => labels && !d.data.synthetic ? shortLabel(d.data.id) : "");
    const folded = nodes.filter(d => d._children).length;
    const real = nodes.length - (root.data.synthetic ? 1 : 0);  // the forest root is not a node
    status.text("showing " + real.toLocaleString() + " of " + rows.length.toLocaleString()
      + " nodes" + (folded ? " (" + folded + " folded)" : ""));
    return nodes;
  }

  const shown = update();
  const zoom = d3.zoom().scaleExtent([0.02, 8]).on("zoom", e => zoomLayer.attr("transform", e.transform));
  svg.call(zoom).on("dblclick.zoom", null);
  // Fit the first view when the tree is small enough to stay readable, else start at the root.
  const box = svg.node().getBoundingClientRect();
  const legendWidth = d3.select("#legend").node().getBoundingClientRect().width;
  const [x0, x1] = d3.extent(shown, d => d.x);
  const [y0, y1] = d3.extent(shown, d => d.y);
  const k = Math.max(0.25, Math.min(1.5, (box.width - legendWidth - 80) / Math.max(1, y1 - y0),
                                     (box.height - 40) / Math.max(1, x1 - x0)));
  const ty = (x1 - x0) * k < box.height ? box.height / 2 - k * (x0 + x1) / 2 : box.height / 2 - k * root.x;
  svg.call(zoom.transform, d3.zoomIdentity.translate(30 - k * y0, ty).scale(k));
})();
"""

assert "</" not in _APP_JS, "the inline app script must not contain '</'"
