"""Progressive widening for MCTS over sampled actions (Coulom 2007; Couetoux et al. 2011).

A node visited ``N`` times may select among its first ``k(N) = ceil(c * N**alpha)``
children only (never fewer than one, never more than its ``A`` slots). It fits the
mctx-style engine without changing it: every node still carries a fixed number ``A`` of
candidate slots (drawn when the node is created, in the order they are to be unlocked),
and the scorer masks the slots beyond ``k(N)`` out of selection with ``-inf``; the PUCT
prior is renormalised over the unlocked slots, and a newly unlocked slot is tried first.
Since the engine rescores a node after every simulation through it, a node's width
follows its visit count exactly.

The candidates are drawn up front, not lazily at the moment of widening: the draws are
independent of the search statistics, so this gives the same distribution of trees.

Drawing all ``A`` candidates up front rather than lazily costs only the proposal calls
(no model steps: a candidate is stepped only when selected), and it keeps the search
deterministic for a seed and the tree a plain ``[B, N, A]`` array.

``muzero_policy(..., widening=Widening(c, alpha))`` turns it on; ``widening=None`` (the
default) is the unchanged mctx search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planners._tree import NodeStats

__all__ = ["Widening", "WideningScorer"]

_F32 = np.float32


@dataclass(frozen=True)
class Widening:
    """``k(N) = ceil(c * N**alpha)`` selectable children at a node visited ``N`` times."""

    c: float = 1.0
    alpha: float = 0.5

    def __post_init__(self):
        if not self.c > 0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"widening needs c > 0 and 0 <= alpha <= 1, got {self}")

    def width(self, visits: np.ndarray | float, num_actions: int) -> np.ndarray:
        """Unlocked children at nodes with ``visits`` visits (at least 1, at most A)."""
        n = np.maximum(np.asarray(visits, dtype=np.float64), 1.0)
        # A hair below the exact value before ceil, so that c * N**alpha = 3.0000000001
        # from rounding still unlocks 3 children.
        k = np.ceil(self.c * n**self.alpha - 1e-9)
        return np.clip(k, 1, num_actions).astype(np.int64)

    def widths_upto(self, visits: int, num_actions: int) -> list[int]:
        """``k(1) .. k(visits)`` (for tests and docs)."""
        return [int(self.width(n, num_actions)) for n in range(1, visits + 1)]


class WideningScorer:
    """Wraps a scorer (``scores(stats, mask, num_roots, sims_done) -> [A, M]``): slots at
    or beyond ``k(N)`` get ``-inf``, and the prior of the unlocked ones is renormalised.

    A slot just unlocked and not yet visited is selected first (highest prior first, then
    lowest index), as in classic progressive widening, where widening *adds* a child and
    evaluates it. Without this, mctx's qtransforms give an unvisited child the lowest
    Q-value and the renormalised prior of each new child shrinks like ``1 / k(N)``, so for
    ``alpha >= 0.5`` the exploration term never grows enough to try it."""

    def __init__(self, inner, widening: Widening):
        self.inner = inner
        self.widening = widening

    def __getattr__(self, name):  # root_visits, score_considered, ... of the inner scorer
        return getattr(self.inner, name)

    def scores(self, stats: NodeStats, mask: np.ndarray, num_roots: int, sims_done: int):
        a = stats.prior_probs.shape[0]
        k = self.widening.width(stats.node_visits, a)  # [M]
        locked = np.arange(a)[:, None] >= k[None, :]  # [A, M]
        probs = np.where(locked, _F32(0), stats.prior_probs)
        total = probs.sum(axis=0, keepdims=True)
        stats.prior_probs = (probs / np.maximum(total, np.finfo(_F32).tiny)).astype(_F32)
        out = self.inner.scores(stats, mask, num_roots, sims_done)
        fresh = ~locked & ~stats.visited & np.isfinite(mask)  # unlocked, unvisited, valid
        out = np.where(fresh, _F32(1e6) + stats.prior_probs, out)
        return np.where(locked, _F32(-np.inf), out)


def width_schedule(c: float, alpha: float, visits: int, num_actions: int) -> list[int]:
    """``[k(1), ..., k(visits)]`` without numpy (documentation helper)."""
    return [max(1, min(num_actions, math.ceil(c * n**alpha - 1e-9))) for n in range(1, visits + 1)]
