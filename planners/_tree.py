"""The batched search tree: an immutable dataclass of numpy arrays, its summary, and re-rooting.

The layout follows mctx's ``Tree`` (one row per batch element, node 0 is the root, a node
expanded on simulation ``i`` of a fresh search has index ``i + 1``) so that trees from the
two libraries can be compared field by field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

T = TypeVar("T")

_F32 = np.float32


@dataclass(frozen=True)
class Tree(Generic[T]):
    """State of a batch of search trees. ``B`` batch, ``N`` nodes, ``A`` actions.

    Every array is read-only: a search never changes a ``Tree`` it was given, it returns a
    new one (``dataclasses.replace`` / :meth:`replace` make modified copies).
    """

    node_visits: np.ndarray  # [B, N] int32, visits of each node (expansion counts as one)
    raw_values: np.ndarray  # [B, N] float32, the value the model predicted for each node
    node_values: np.ndarray  # [B, N] float32, running mean of the backed-up returns
    parents: np.ndarray  # [B, N] int32, parent node index, NO_PARENT for the root/unused
    action_from_parent: np.ndarray  # [B, N] int32, action leading from parent, NO_PARENT
    children_index: np.ndarray  # [B, N, A] int32, node index of each child or UNVISITED
    children_prior_logits: np.ndarray  # [B, N, A] float32, prior logits of each node
    children_visits: np.ndarray  # [B, N, A] int32, visit count of each child
    children_rewards: np.ndarray  # [B, N, A] float32, reward on the edge to each child
    children_discounts: np.ndarray  # [B, N, A] float32, discount on the edge to each child
    children_values: np.ndarray  # [B, N, A] float32, node value of each child
    embeddings: Any  # [B, N, ...] numeric array, or [B, N] object array of opaque handles
    root_invalid_actions: np.ndarray  # [B, A] bool, True marks an invalid action at the root
    node_invalid_actions: np.ndarray  # [B, N, A] bool, invalid-action mask of every node
    extra_data: T  # policy-specific data, e.g. GumbelMuZeroExtraData, or None

    ROOT_INDEX: ClassVar[int] = 0
    NO_PARENT: ClassVar[int] = -1
    UNVISITED: ClassVar[int] = -1

    @property
    def batch_size(self) -> int:
        return self.node_visits.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.node_visits.shape[1]

    @property
    def num_actions(self) -> int:
        return self.children_index.shape[-1]

    @property
    def num_simulations(self) -> int:
        """Node capacity minus the root (what mctx reports; equal for a fresh search)."""
        return self.node_visits.shape[1] - 1

    def replace(self, **changes: Any) -> Tree[T]:
        return dataclasses.replace(self, **changes)

    def most_visited_child(self, b: int, node: int) -> int | None:
        """The action to ``node``'s most visited expanded child in row ``b`` (the first on
        a tie), or ``None`` at a leaf. Following it from the root gives the chosen path."""
        counts = np.where(self.children_index[b, node] >= 0, self.children_visits[b, node], -1)
        action = int(np.argmax(counts))
        return action if counts[action] >= 0 else None

    def qvalues(self, indices: int | np.ndarray) -> np.ndarray:
        """Q-values ``r + discount * child value`` of the node ``indices[b]`` in each row.

        ``indices`` is ``[B]`` (or one int used for every row). Returns ``[B, A]``.
        """
        idx = _node_indices(self, indices)
        rows = np.arange(self.batch_size)
        return (
            self.children_rewards[rows, idx]
            + self.children_discounts[rows, idx] * self.children_values[rows, idx]
        )

    def summary(self) -> SearchSummary:
        """Root statistics as in mctx's ``SearchSummary``."""
        value = self.node_values[:, Tree.ROOT_INDEX]  # [B]
        visit_counts = self.children_visits[:, Tree.ROOT_INDEX].astype(value.dtype)  # [B, A]
        total = visit_counts.sum(axis=-1, keepdims=True)  # [B, 1]
        visit_probs = np.where(
            total > 0, visit_counts / np.maximum(total, 1), _F32(1.0 / self.num_actions)
        ).astype(value.dtype)
        return SearchSummary(
            visit_counts=visit_counts,
            visit_probs=visit_probs,
            value=value,
            qvalues=self.qvalues(Tree.ROOT_INDEX),
        )


@dataclass(frozen=True)
class SearchSummary:
    """Statistics of the root of each row."""

    visit_counts: np.ndarray  # [B, A] float32
    visit_probs: np.ndarray  # [B, A] float32, visit_counts normalised (uniform if no visits)
    value: np.ndarray  # [B] float32, the root's node value
    qvalues: np.ndarray  # [B, A] float32, r + discount * child value (0 if unvisited)


@dataclass(frozen=True)
class GumbelMuZeroExtraData:
    """``Tree.extra_data`` of a Gumbel MuZero search."""

    root_gumbel: np.ndarray  # [B, A] float32, the Gumbel noise drawn for the root


class NodeStats:
    """Statistics of ``M`` nodes, the input of a qtransform.

    Per-action arrays are **actions first**, ``[A, M]``: numpy reduces a small trailing
    axis slowly, so every reduction over actions here runs along axis 0. Per-node arrays are
    ``[M]``. A qtransform returns ``[A, M]``.
    """

    __slots__ = (
        "visit_counts",
        "visited",
        "qvalues",
        "prior_probs",
        "prior_logits",
        "node_visits",
        "node_value",
        "raw_value",
    )

    def __init__(
        self,
        visit_counts: np.ndarray,  # [A, M] float32 child visit counts
        qvalues: np.ndarray,  # [A, M] float32 r + discount * child value (0 if unvisited)
        prior_probs: np.ndarray,  # [A, M] float32 softmax of prior_logits
        prior_logits: np.ndarray,  # [A, M] float32
        node_visits: np.ndarray,  # [M] float32
        node_value: np.ndarray,  # [M] float32
        raw_value: np.ndarray,  # [M] float32
    ) -> None:
        self.visit_counts = visit_counts
        self.visited = visit_counts > 0  # [A, M] bool
        self.qvalues = qvalues
        self.prior_probs = prior_probs
        self.prior_logits = prior_logits
        self.node_visits = node_visits
        self.node_value = node_value
        self.raw_value = raw_value

    @classmethod
    def from_tree(cls, tree: Tree, node_index: int | np.ndarray) -> NodeStats:
        """Statistics of node ``node_index[b]`` of every row ``b`` (``M = B``)."""
        idx = _node_indices(tree, node_index)
        rows = np.arange(tree.batch_size)
        logits = np.asarray(tree.children_prior_logits[rows, idx], _F32).T  # [A, B]
        return cls(
            visit_counts=np.ascontiguousarray(tree.children_visits[rows, idx].T, _F32),
            qvalues=np.ascontiguousarray(tree.qvalues(idx).T, _F32),
            prior_probs=softmax_axis0(logits),
            prior_logits=np.ascontiguousarray(logits),
            node_visits=tree.node_visits[rows, idx].astype(_F32),
            node_value=np.asarray(tree.node_values[rows, idx], _F32),
            raw_value=np.asarray(tree.raw_values[rows, idx], _F32),
        )


def softmax_axis0(x: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of ``[A, M]`` (max-shifted, like ``jax.nn.softmax``)."""
    e = np.exp(x - np.maximum.reduce(x, axis=0))
    return e / np.add.reduce(e, axis=0)


def _node_indices(tree: Tree, indices: int | np.ndarray) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim == 0:
        idx = np.full(tree.batch_size, int(idx))
    if idx.shape != (tree.batch_size,):
        raise ValueError(
            f"node indices must be one int or an array of shape [B]=({tree.batch_size},), "
            f"got shape {idx.shape}"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= tree.num_nodes):
        raise IndexError(f"node indices must lie in [0, {tree.num_nodes}), got {idx}")
    return idx


def freeze(tree: Tree) -> Tree:
    """Mark every array of ``tree`` read-only and return it."""
    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return tree


def compact(tree: Tree, keep: np.ndarray) -> tuple[Tree, np.ndarray]:
    """Keep the nodes marked in ``keep`` [B, N], renumbered 0.. in their original order.

    The first kept node of each row becomes its root. Parents always precede children
    (a node is created after its parent), so the order is preserved and parent < child
    still holds. Returns the new tree (same node capacity) and the number of kept nodes [B].
    """
    b, n = keep.shape
    rows = np.arange(b)[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")  # [B, N] kept nodes first
    kept = np.take_along_axis(keep, order, axis=1)  # [B, N] bool, a prefix of each row
    num_kept = keep.sum(axis=1)  # [B]
    new_index = np.where(keep, np.cumsum(keep, axis=1) - 1, -1)  # [B, N] old -> new

    def remap(old: np.ndarray) -> np.ndarray:  # node indices -> new indices (-1 stays -1)
        flat = np.where(old >= 0, old, 0)
        out = np.take_along_axis(new_index, flat.reshape(b, -1), axis=1).reshape(old.shape)
        return np.where(old >= 0, out, -1).astype(np.int32)

    def gather(x: np.ndarray, fill: Any) -> np.ndarray:
        out = x[rows, order]
        mask = kept.reshape(kept.shape + (1,) * (out.ndim - 2))
        return np.where(mask, out, np.asarray(fill, dtype=out.dtype))

    parents = remap(gather(tree.parents, Tree.NO_PARENT))
    action_from_parent = gather(tree.action_from_parent, Tree.NO_PARENT)
    is_new_root = np.zeros((b, n), bool)
    is_new_root[:, 0] = num_kept > 0
    parents = np.where(is_new_root, Tree.NO_PARENT, parents).astype(np.int32)
    action_from_parent = np.where(is_new_root, Tree.NO_PARENT, action_from_parent)
    children_index = remap(gather(tree.children_index, Tree.UNVISITED))

    emb = tree.embeddings
    emb_out = emb[rows, order]
    if emb_out.dtype != object:
        mask = kept.reshape(kept.shape + (1,) * (emb_out.ndim - 2))
        emb_out = np.where(mask, emb_out, np.zeros((), emb_out.dtype))
    else:
        emb_out = emb_out.copy()
        emb_out[~kept] = None

    invalid = gather(tree.node_invalid_actions, False)
    new = Tree(
        node_visits=gather(tree.node_visits, 0).astype(np.int32),
        raw_values=gather(tree.raw_values, 0),
        node_values=gather(tree.node_values, 0),
        parents=parents,
        action_from_parent=action_from_parent.astype(np.int32),
        children_index=children_index,
        children_prior_logits=gather(tree.children_prior_logits, 0),
        children_visits=gather(tree.children_visits, 0).astype(np.int32),
        children_rewards=gather(tree.children_rewards, 0),
        children_discounts=gather(tree.children_discounts, 0),
        children_values=gather(tree.children_values, 0),
        embeddings=emb_out,
        root_invalid_actions=invalid[:, Tree.ROOT_INDEX].copy(),
        node_invalid_actions=invalid,
        extra_data=None,
    )
    return freeze(new), num_kept


def get_subtree(tree: Tree, action: np.ndarray) -> Tree:
    """Re-root each row of ``tree`` at the root's child reached by ``action[b]``.

    The child keeps its statistics and its whole subtree (visits, values, priors,
    embeddings, invalid-action masks); everything else is dropped and the kept nodes are
    renumbered from 0 in creation order. Pass the result as ``root_tree=`` to a policy to
    continue searching from it. If the chosen child was never expanded the row is empty
    (all visits 0) and the next search needs a ``root`` for it. ``extra_data`` becomes None.

    Args:
      tree: a search tree ``[B, N, ...]``.
      action: ``[B]`` int, the action taken at the root of each row.

    Returns:
      A tree with the same shapes whose node 0 is the chosen child.
    """
    action = np.asarray(action)
    b, n = tree.node_visits.shape
    if action.shape != (b,) or not np.issubdtype(action.dtype, np.integer):
        raise ValueError(
            f"action must be an int array of shape [B]=({b},), got {action.dtype} {action.shape}"
        )
    if (action < 0).any() or (action >= tree.num_actions).any():
        raise ValueError(f"actions must lie in [0, {tree.num_actions}), got {action}")
    child = tree.children_index[np.arange(b), Tree.ROOT_INDEX, action]  # [B]
    # top[b, i]: the depth-1 ancestor of node i (the root's child it descends from).
    # Parents precede children, so one pass in index order fills it.
    top = np.full((b, n), -1, np.int64)
    parents = tree.parents
    rows = np.arange(b)
    for i in range(1, n):
        p = parents[:, i]
        top[:, i] = np.where(p == Tree.ROOT_INDEX, i, np.where(p > 0, top[rows, p], -1))
    keep = (top == child[:, None]) & (child[:, None] >= 0) & (tree.node_visits > 0)
    new, _ = compact(tree, keep)
    return new
