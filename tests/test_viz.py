"""Tests of the tree pictures: the offline D3 HTML page and the matplotlib figure."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.figure import Figure

from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.viz import figure_to_rgb, tree_figure, write_tree_html
from arcfab_gym.viz.tree_figure import CHOSEN_EDGES_GID, EDGES_GID, NODES_GID, tidy_layout
from arcfab_gym.viz.tree_page import (
    _APP_JS,
    DATA_BEGIN,
    DATA_END,
    extract_embedded_json,
    load_d3,
    render_tree_html,
)


def forest() -> TrajectoryTree:
    """a0-a1-a2-a3 with forks b2-b3 and c2 at a1, d3 at a2; a second root z0-z1."""
    t = TrajectoryTree()
    t.add_node("a0", "a", 0, prompt="walk", seed=3, reward=0.0, visits=9, value=0.1, chosen=True)
    t.add_node("a1", "a", 1, "a0", reward=0.5, chosen=True)
    t.add_node("a2", "a", 2, "a1", reward=1.0, chosen=True)
    t.add_node("a3", "a", 3, "a2", reward=2.0)
    t.add_node("b2", "b", 2, "a1", reward=-1.0, kind="fork")
    t.add_node("b3", "b", 3, "b2")
    t.add_node("c2", "c", 2, "a1", kind="fork", prompt="</script><script>alert('x')</script>")
    t.add_node("d3", "d", 3, "a2", kind="fork", value=0.7)
    t.add_node("z0", "z", 0)
    t.add_node("z1", "z", 1, "z0")
    return t


def chain(n: int) -> TrajectoryTree:
    t = TrajectoryTree()
    prev = None
    for i in range(n):
        t.add_node(f"c{i}", "main", i, prev)
        prev = f"c{i}"
    return t


# ---------------------------------------------------------------- HTML page
def test_page_is_self_contained_and_embeds_the_flat_tree(tmp_path: Path) -> None:
    t = forest()
    out = write_tree_html(t, tmp_path / "sub" / "tree.html", title="My <tree> & co")
    assert out == tmp_path / "sub" / "tree.html" and out.is_file()
    page = out.read_text(encoding="utf-8")

    # D3 is inlined from the vendored file, not fetched.
    assert 't.version="7.9.2"' in page and "t.stratify=function" in page
    assert load_d3() in page
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.IGNORECASE)
    assert not re.search(r"src\s*=\s*[\"']?https?://", page, flags=re.IGNORECASE)
    assert "<link" not in page.lower()

    # The flat node list comes back exactly; every id is in the page.
    assert extract_embedded_json(page) == t.to_dict()
    for node_id in t.nodes:
        assert f'"id":"{node_id}"' in page

    # The hostile prompt cannot close the script element early: exactly the two real
    # </script> tags (d3 and the app) appear, and the data region holds no "</" at all.
    assert page.lower().count("</script") == 2
    data = page[page.index(DATA_BEGIN) : page.index(DATA_END)]
    assert "</" not in data and "<" not in data

    # The page builds the hierarchy from the flat list, iteratively, with the features asked for.
    for needle in ("d3.stratify()", "d3.tree()", "d3.zoom()", "linkHorizontal", '"title"', "legend"):
        assert needle in page
    assert "My &lt;tree&gt; &amp; co" in page
    assert "10 nodes · 5 leaves · 2 fork points · 5 sessions · 2 roots" in page

    # Written atomically: no temp file left beside it.
    assert sorted(p.name for p in out.parent.iterdir()) == ["tree.html"]


def test_page_options_for_colouring_and_big_trees() -> None:
    page = render_tree_html(forest(), color_by="reward")
    assert '"color_by":"reward"' in page and '"big":false' in page
    big = render_tree_html(chain(5001))
    assert '"big":true' in big and '"collapse_depth":30' in big
    assert "opened collapsed below depth 30" in big
    with pytest.raises(ValueError, match="color_by='colour' is not supported"):
        render_tree_html(forest(), color_by="colour")
    with pytest.raises(TypeError, match="expected a TrajectoryTree"):
        render_tree_html({"nodes": []})  # type: ignore[arg-type]


def test_empty_tree_page(tmp_path: Path) -> None:
    page = write_tree_html(TrajectoryTree(), tmp_path / "empty.html").read_text()
    assert extract_embedded_json(page)["nodes"] == []
    assert "0 nodes" in page


def test_app_script_never_contains_a_closing_tag() -> None:
    assert "</" not in _APP_JS


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_inline_scripts_are_valid_javascript(tmp_path: Path) -> None:
    page = render_tree_html(forest(), color_by="value")
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    assert len(scripts) == 2
    for i, body in enumerate(scripts):
        path = tmp_path / f"script{i}.js"
        path.write_text(body, encoding="utf-8")
        result = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_deep_chain_page_keeps_flat_data(tmp_path: Path) -> None:
    t = chain(20_000)
    page = write_tree_html(t, tmp_path / "chain.html").read_text()
    data = extract_embedded_json(page)
    assert len(data["nodes"]) == 20_000 and data["nodes"][-1]["parent_id"] == "c19998"


# ------------------------------------------------------------------- figure
def _nodes(fig: Figure) -> PathCollection:
    (coll,) = [c for c in fig.axes[0].collections if c.get_gid() == NODES_GID]
    assert isinstance(coll, PathCollection)
    return coll


def _edges(fig: Figure, gid: str) -> LineCollection:
    (coll,) = [c for c in fig.axes[0].collections if c.get_gid() == gid]
    assert isinstance(coll, LineCollection)
    return coll


def test_figure_draws_every_node_and_edge() -> None:
    t = forest()
    fig = tree_figure(t)
    assert isinstance(fig, Figure)
    offsets = np.asarray(_nodes(fig).get_offsets())
    assert offsets.shape == (10, 2)
    # x is the frame index, in BFS order of the drawn nodes.
    assert offsets[:, 0].tolist() == [n.frame_index for n in t.bfs_order()]
    # 8 edges: a0-a1 and a1-a2 are on the chosen path, the other 6 are plain.
    assert len(_edges(fig, CHOSEN_EDGES_GID).get_segments()) == 2
    assert len(_edges(fig, EDGES_GID).get_segments()) == 6
    # Fork points (a1, a2) are drawn larger than the others.
    sizes = dict(zip((n.node_id for n in t.bfs_order()), _nodes(fig).get_sizes()))
    assert sizes["a1"] > sizes["a0"] and sizes["a2"] > sizes["b3"]
    assert "10 nodes" in fig.axes[0].get_title()


def test_figure_to_rgb_shape_and_dtype() -> None:
    fig = tree_figure(forest(), figsize=(4, 3), dpi=50)
    rgb = figure_to_rgb(fig)
    assert rgb.dtype == np.uint8 and rgb.shape == (150, 200, 3)
    assert rgb.min() < 128 < rgb.max()  # something was drawn on the white background
    default = figure_to_rgb(tree_figure(forest()))
    assert default.shape == (600, 1000, 3)


def test_figure_truncates_to_max_nodes_in_bfs_order() -> None:
    t = forest()
    fig = tree_figure(t, max_nodes=5, title="search")
    assert len(_nodes(fig).get_offsets()) == 5
    title = fig.axes[0].get_title()
    assert title.startswith("search") and "first 5 of 10 nodes" in title
    big = tree_figure(chain(3000), max_nodes=2000)
    assert len(_nodes(big).get_offsets()) == 2000
    assert "2,000 of 3,000" in big.axes[0].get_title()


def test_figure_colour_by_value_adds_a_colorbar() -> None:
    fig = tree_figure(forest(), color_by="reward")
    assert len(fig.axes) == 2  # the tree and its colorbar
    colors = _nodes(fig).get_facecolors()
    assert len(colors) == 10
    # Nodes without a reward are grey, the others are not.
    by_id = dict(zip((n.node_id for n in forest().bfs_order()), colors))
    assert np.allclose(by_id["z0"][:3], by_id["z1"][:3])
    assert not np.allclose(by_id["a0"][:3], by_id["a3"][:3])


def test_figure_edge_cases() -> None:
    empty = tree_figure(TrajectoryTree())
    assert "empty" in empty.axes[0].get_title()
    assert figure_to_rgb(empty).shape == (600, 1000, 3)
    with pytest.raises(ValueError, match="color_by"):
        tree_figure(forest(), color_by="nope")
    with pytest.raises(ValueError, match="max_nodes"):
        tree_figure(forest(), max_nodes=0)


def test_tidy_layout_centres_parents_over_children() -> None:
    t = forest()
    y = tidy_layout(t)
    leaves = [n.node_id for n in t.get_subtree("a0") if not n.children]
    assert [y[n] for n in leaves] == [0.0, 1.0, 2.0, 3.0]  # a3, d3, b3, c2 in preorder
    for node in t:
        if node.children:
            kids = node.children
            assert y[node.node_id] == (y[kids[0]] + y[kids[-1]]) / 2
    assert y["z1"] == 5.0  # one empty row separates the two trees
    deep = chain(50_000)
    assert len(tidy_layout(deep)) == 50_000  # iterative: no recursion limit
