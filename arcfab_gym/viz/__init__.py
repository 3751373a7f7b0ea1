"""Pictures of trajectory trees: an interactive offline HTML page and a matplotlib figure.

Note: the package attribute ``tree_figure`` is the *function*; import the module's other
names with ``from arcfab_gym.viz.tree_figure import ...``.
"""

from __future__ import annotations

from arcfab_gym.viz.tree_figure import figure_to_rgb, tree_figure
from arcfab_gym.viz.tree_page import render_tree_html, write_tree_html

__all__ = ["figure_to_rgb", "render_tree_html", "tree_figure", "write_tree_html"]
