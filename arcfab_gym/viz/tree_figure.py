"""Draw a trajectory tree as a static matplotlib figure (e.g. for TensorBoard's add_image).

Uses :class:`matplotlib.figure.Figure` with the Agg canvas directly, never pyplot, so it
touches no global state and works in threads and headless jobs. The layout is computed
iteratively: x is the frame index, y a tidy order where leaves are spaced evenly and each
parent sits centred over its children.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from arcfab_gym.fabric.tree import TrajectoryTree, TreeNode
from arcfab_gym.viz.tree_page import check_color_by

#: gids of the artists drawn, so callers (and tests) can find them on the axes.
NODES_GID = "arcfab-tree-nodes"
EDGES_GID = "arcfab-tree-edges"
CHOSEN_EDGES_GID = "arcfab-tree-chosen-edges"

_CHOSEN_COLOR = "#ff7f0e"
_NO_VALUE_RGBA = to_rgba("#bbbbbb")


def _is_chosen(node: TreeNode) -> bool:
    return node.meta.get("chosen") is True


def tidy_layout(tree: TrajectoryTree, keep: set[str] | None = None) -> dict[str, float]:
    """y position of every node (of those in ``keep``): leaves 0, 1, 2, ... in preorder,
    parents centred over their first and last child, one empty row between root trees.
    """
    nodes = tree.nodes
    inside = (lambda nid: True) if keep is None else keep.__contains__
    preorder: list[str] = []
    y: dict[str, float] = {}
    row = 0.0
    for root in tree.roots:
        if not inside(root):
            continue
        if preorder:
            row += 1.0  # a gap separates the trees of a forest
        stack = [root]
        while stack:
            nid = stack.pop()
            preorder.append(nid)
            kids = [c for c in nodes[nid].children if inside(c)]
            if kids:
                stack.extend(reversed(kids))
            else:
                y[nid] = row
                row += 1.0
    # Reverse preorder visits every child before its parent: centre parents bottom-up.
    for nid in reversed(preorder):
        if nid in y:
            continue
        kids = [c for c in nodes[nid].children if inside(c)]
        y[nid] = (y[kids[0]] + y[kids[-1]]) / 2.0
    return y


def _session_colors(sessions: list[str]) -> dict[str, tuple[float, ...]]:
    if len(sessions) <= 10:
        palette = colormaps["tab10"].colors
    elif len(sessions) <= 20:
        palette = colormaps["tab20"].colors
    else:
        cmap = colormaps["hsv"]
        palette = [cmap(i / len(sessions)) for i in range(len(sessions))]
    return {s: to_rgba(palette[i % len(palette)]) for i, s in enumerate(sessions)}


def tree_figure(
    tree: TrajectoryTree,
    *,
    max_nodes: int = 2000,
    color_by: str = "session",
    title: str | None = None,
    figsize: tuple[float, float] = (10.0, 6.0),
    dpi: int = 100,
) -> Figure:
    """A picture of ``tree``: x = frame index, fork points larger, the chosen path thicker.

    Trees with more than ``max_nodes`` nodes are cut to their first ``max_nodes`` nodes in
    breadth-first order (every drawn node's ancestors are drawn too), and the title says so.
    """
    if not isinstance(tree, TrajectoryTree):
        raise TypeError(f"expected a TrajectoryTree, got {type(tree).__name__}")
    check_color_by(color_by)
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1:
        raise ValueError(f"max_nodes must be an int >= 1, got {max_nodes!r}")

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    ax = fig.add_subplot(1, 1, 1)
    total = len(tree)
    base_title = title if title is not None else "Arc Fabric trajectory tree"
    if total == 0:
        ax.set_title(f"{base_title} (empty)")
        ax.text(0.5, 0.5, "empty tree", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig

    order = tree.bfs_order()
    shown = order[:max_nodes]
    if total > max_nodes:
        ax.set_title(
            f"{base_title}\nshowing the first {max_nodes:,} of {total:,} nodes (breadth-first)"
        )
        keep: set[str] | None = {n.node_id for n in shown}
    else:
        ax.set_title(f"{base_title} ({total:,} nodes)")
        keep = None
    y = tidy_layout(tree, keep)
    nodes = tree.nodes

    # ---- edges: ordinary ones thin and grey, the chosen path thick on top.
    plain: list[list[tuple[float, float]]] = []
    chosen: list[list[tuple[float, float]]] = []
    for n in shown:
        if n.parent_id is None:
            continue
        p = nodes[n.parent_id]
        seg = [(p.frame_index, y[p.node_id]), (n.frame_index, y[n.node_id])]
        (chosen if _is_chosen(n) and _is_chosen(p) else plain).append(seg)
    scale = 1.0 if len(shown) <= 300 else max(0.25, (300 / len(shown)) ** 0.5)
    ax.add_collection(
        LineCollection(plain, colors="#9a9a9a", linewidths=0.9 * scale, zorder=1, gid=EDGES_GID)
    )
    ax.add_collection(
        LineCollection(
            chosen, colors=_CHOSEN_COLOR, linewidths=3.0, zorder=2, gid=CHOSEN_EDGES_GID
        )
    )

    # ---- node colours
    colors: list[tuple[float, ...]]
    if color_by == "session":
        sessions = list(dict.fromkeys(n.session_id for n in shown))
        by_session = _session_colors(sessions)
        colors = [by_session[n.session_id] for n in shown]
        if len(sessions) <= 10:
            handles: list[Any] = [
                Line2D([], [], marker="o", linestyle="", color=by_session[s], label=s)
                for s in sessions
            ]
            ax.legend(handles=handles, title="session", loc="best", fontsize=8, title_fontsize=8)
    else:
        values = [n.meta.get(color_by) for n in shown]
        numeric = [
            float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
        ]
        cmap = colormaps["viridis"]
        if numeric:
            lo, hi = min(numeric), max(numeric)
            norm = Normalize(lo - 1, hi + 1) if lo == hi else Normalize(lo, hi)
            colors = [
                cmap(norm(float(v)))
                if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                else _NO_VALUE_RGBA
                for v in values
            ]
            fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"meta.{color_by}")
        else:
            colors = [_NO_VALUE_RGBA] * len(shown)

    # ---- node markers: one scatter, so its offsets are exactly the drawn nodes.
    size = np.array([70.0 if len(n.children) > 1 else 22.0 for n in shown]) * scale
    is_chosen = np.array([_is_chosen(n) for n in shown])
    ax.scatter(
        [n.frame_index for n in shown],
        [y[n.node_id] for n in shown],
        s=size,
        c=colors,
        edgecolors=[_CHOSEN_COLOR if c else "#333333" for c in is_chosen],
        linewidths=np.where(is_chosen, 1.6, 0.4 * scale),
        zorder=3,
        gid=NODES_GID,
    )

    xs = [n.frame_index for n in shown]
    x_pad = max(1.0, (max(xs) - min(xs)) * 0.03)
    ax.set_xlim(min(xs) - x_pad, max(xs) + x_pad)
    ys = list(y.values())
    ax.set_ylim(max(ys) + 1.0, min(ys) - 1.0)  # first leaf at the top
    ax.set_xlabel("frame index")
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` with Agg and return its pixels as uint8 [H, W, 3]."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])
