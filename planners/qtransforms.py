"""Monotonic transformations of Q-values (mctx's three qtransforms) over many nodes at once.

A qtransform maps the :class:`NodeStats` of ``M`` nodes to completed, normalised Q-values
``[A, M]`` (actions first, see ``NodeStats``). Each also accepts mctx's calling convention
``qtransform(tree, node_index)`` with ``node_index`` ``[B]`` and then returns ``[B, A]``.
Bind keyword arguments with ``functools.partial`` as in mctx.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from planners._tree import NodeStats, Tree

_TINY = np.finfo(np.float32).tiny

QTransform = Callable[..., np.ndarray]


def _stats_or_tree(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Let ``fn(stats, **kw)`` also be called as ``fn(tree, node_index, **kw)``."""

    @functools.wraps(fn)
    def wrapper(stats: NodeStats | Tree, node_index=None, **kwargs) -> np.ndarray:
        if isinstance(stats, NodeStats):
            return fn(stats, **kwargs)
        if isinstance(stats, Tree):
            if node_index is None:
                raise TypeError(f"{fn.__name__}(tree, node_index): node_index is missing")
            return np.ascontiguousarray(fn(NodeStats.from_tree(stats, node_index), **kwargs).T)
        raise TypeError(f"{fn.__name__} takes a NodeStats or a Tree, got {type(stats).__name__}")

    return wrapper


@_stats_or_tree
def qtransform_by_min_max(stats: NodeStats, *, min_value: float, max_value: float) -> np.ndarray:
    """Q-values mapped by ``(q - min_value) / (max_value - min_value)``; unvisited get 0.

    Returns ``[A, M]``.
    """
    value_score = np.where(stats.visited, stats.qvalues, np.float32(min_value))
    return (value_score - min_value) / (max_value - min_value)


@_stats_or_tree
def qtransform_by_parent_and_siblings(stats: NodeStats, *, epsilon: float = 1e-8) -> np.ndarray:
    """Q-values normalised to [0, 1] by the min and max over the node's value and its
    visited children's Q-values; unvisited actions get 0. Returns ``[A, M]``.
    """
    visited, q, v = stats.visited, stats.qvalues, stats.node_value
    # Unvisited Q-values are left out of the min/max by standing in the node's own value.
    safe = np.where(visited, q, v)
    lo = np.minimum(v, np.minimum.reduce(safe, axis=0))
    hi = np.maximum(v, np.maximum.reduce(safe, axis=0))
    completed = np.where(visited, q, lo)
    return (completed - lo) / np.maximum(hi - lo, np.float32(epsilon))


@_stats_or_tree
def qtransform_completed_by_mix_value(
    stats: NodeStats,
    *,
    value_scale: float = 0.1,
    maxvisit_init: float = 50.0,
    rescale_values: bool = True,
    use_mixed_value: bool = True,
    epsilon: float = 1e-8,
) -> np.ndarray:
    """Gumbel MuZero's completed Q-values (Appendix D of "Policy improvement by planning
    with Gumbel"): unvisited actions get the mixed value, then the values are optionally
    rescaled to [0, 1] and multiplied by ``(maxvisit_init + max visits) * value_scale``.

    Returns ``[A, M]``.
    """
    visited, q, n = stats.visited, stats.qvalues, stats.visit_counts
    if use_mixed_value:
        value = _mixed_value(stats)
    else:
        value = stats.raw_value
    completed = np.where(visited, q, value)
    if rescale_values:
        lo = np.minimum.reduce(completed, axis=0)
        hi = np.maximum.reduce(completed, axis=0)
        completed = (completed - lo) / np.maximum(hi - lo, np.float32(epsilon))
    visit_scale = maxvisit_init + np.maximum.reduce(n, axis=0)  # [M]
    return visit_scale * np.float32(value_scale) * completed


def _mixed_value(stats: NodeStats) -> np.ndarray:
    """``(raw + n * sum_visited(p q) / sum_visited(p)) / (n + 1)``, with p >= tiny. [M]"""
    visited, q = stats.visited, stats.qvalues
    sum_visits = np.add.reduce(stats.visit_counts, axis=0)  # [M]
    probs = np.maximum(stats.prior_probs, _TINY) * visited  # [A, M], 0 where unvisited
    sum_probs = np.add.reduce(probs, axis=0)  # [M], >= tiny whenever any child was visited
    weighted_q = np.add.reduce(probs * q / np.maximum(sum_probs, _TINY), axis=0)  # [M]
    return (stats.raw_value + sum_visits * weighted_q) / (sum_visits + 1)
