"""The batched MCTS engine behind the policies: numpy only, vectorised over the batch.

One simulation = select (descend from every root at once) -> expand (one batched
``recurrent_fn`` call) -> backup (along the path recorded during selection, with flat
indices) -> rescore (the nodes on the path).

Why it is fast in numpy (see /work/shared/MCTX_NOTES.md for the general recipe):
- A node's selection score depends only on its own statistics, which change only when a
  simulation passes through it. So after each simulation the nodes on its path are
  rescored in one vectorised pass and each stores the action it would pick next and the
  child that leads to; selection is then a pointer chase, one gather per level.
- Per-edge data lives in one node-major block ``[nodes, A, fields]``: a rescore is one
  gather, transposed to actions-first ``[fields, A, M]`` where numpy reduces fast.
- Rows whose descent ended ride on a dummy node (its children are itself, its edges have
  reward 0 and discount 1) instead of being compressed out, so selection and backup run
  on whole ``[depth, B]`` arrays with a handful of numpy calls per level.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np

from planners._tree import NodeStats, Tree, compact, freeze, softmax_axis0

F32 = np.float32
TINY = np.finfo(F32).tiny
MIN_LOGIT = np.finfo(F32).min
_NEG_INF = F32(-np.inf)
_ZERO = F32(0.0)

# Fields of the per-edge block, block[node, action, field].
_CV, _Q, _P, _L, _MASK = range(5)
_NF = 5


# ----------------------------------------------------------------------------------------
# Sequential halving (Gumbel MuZero's root schedule)


def considered_visit_sequence(max_num_considered: int, num_simulations: int) -> list[int]:
    """Visit count an action must have to be eligible at each simulation of Sequential
    Halving with ``max_num_considered`` actions (Karnin et al. 2013; Danihelka et al. 2022).

    Each phase gives every remaining action ``max(1, n / (log2(m) * remaining))`` more
    visits, then halves the remaining actions (never below two).
    """
    if max_num_considered <= 1:
        return list(range(num_simulations))
    rounds = math.ceil(math.log2(max_num_considered))
    out: list[int] = []
    visits = [0] * max_num_considered
    remaining = max_num_considered
    while len(out) < num_simulations:
        extra = max(1, int(num_simulations / (rounds * remaining)))
        for _ in range(extra):
            out.extend(visits[:remaining])
            for i in range(remaining):
                visits[i] += 1
        remaining = max(2, remaining // 2)
    return out[:num_simulations]


@functools.lru_cache(maxsize=32)
def considered_visit_table(max_num_considered: int, num_simulations: int) -> np.ndarray:
    """``[m + 1, num_simulations]`` float32: row ``k`` is the schedule for ``k`` actions."""
    rows = [considered_visit_sequence(k, num_simulations) for k in range(max_num_considered + 1)]
    table = np.asarray(rows, dtype=F32).reshape(max_num_considered + 1, num_simulations)
    table.flags.writeable = False
    return table


# ----------------------------------------------------------------------------------------
# Scorers: the selection score of M nodes from their NodeStats, [A, M].


class MuZeroScorer:
    """PUCT: ``qtransform(q) + sqrt(n) * pb_c * prior / (visits + 1)`` plus ``1e-7 * U[0, 1)``
    tie-breaking noise, as in mctx. The root uses the same rule (its invalid actions are
    masked). mctx draws the noise at each selection; here it is drawn when a node is
    rescored, which happens after every pass through it, so each selection still sees
    fresh noise."""

    def __init__(
        self, qtransform: Callable, pb_c_init: float, pb_c_base: float, rng: np.random.Generator
    ) -> None:
        self.qtransform = qtransform
        self.pb_c_init = float(pb_c_init)
        self.pb_c_base = float(pb_c_base)
        self.rng = rng
        self._noise = np.empty(0, F32)  # a pool of 1e-7 * U[0, 1)

    def tie_noise(self, shape: tuple[int, int]) -> np.ndarray:
        """``1e-7 * U[0, 1)`` of ``shape``: a window at a random offset into a pool (drawing
        fresh floats for every rescored node would cost more than the rest of the rescore)."""
        need = shape[0] * shape[1]
        if need > self._noise.size // 2:
            self._noise = self.rng.random(max(4 * need, 4096), dtype=F32) * F32(1e-7)
        start = int(self.rng.integers(0, self._noise.size - need + 1))
        return self._noise[start : start + need].reshape(shape)

    def scores(self, stats: NodeStats, mask: np.ndarray, num_roots: int, sims_done: int):
        """Selection scores ``[A, M]``; the first ``num_roots`` columns are roots."""
        n = stats.node_visits
        pb_c = self.pb_c_init + np.log((n + self.pb_c_base + 1.0) / self.pb_c_base)
        out = self.qtransform(stats)
        out += np.sqrt(n) * pb_c * stats.prior_probs / (stats.visit_counts + 1)
        out += self.tie_noise(out.shape)
        out += mask
        return out


class GumbelScorer:
    """Gumbel MuZero: Sequential Halving with Gumbel at the root, the deterministic
    ``softmax(logits + q) - visits / (1 + sum visits)`` rule below it."""

    def __init__(
        self,
        qtransform: Callable,
        gumbel_logits: np.ndarray,  # [A, B] gumbel + root logits - max(root logits)
        considered: np.ndarray,  # [num_simulations, B] visit count eligible per simulation
        root_visits0: np.ndarray | None,  # [A, B] root child visits before this search
    ) -> None:
        self.qtransform = qtransform
        self.gumbel_logits = gumbel_logits
        self.considered = considered
        self.root_visits0 = root_visits0

    def scores(self, stats: NodeStats, mask: np.ndarray, num_roots: int, sims_done: int):
        """Selection scores ``[A, M]``; the first ``num_roots`` columns are the roots."""
        q = self.qtransform(stats)
        visits = stats.visit_counts
        out = softmax_axis0(stats.prior_logits + q)
        out -= visits / (1 + np.add.reduce(visits, axis=0))
        out += mask
        if num_roots:
            k = num_roots
            root_visits = self.root_visits(visits[:, :k])
            penalty = np.where(root_visits == self.considered[sims_done], _ZERO, _NEG_INF)
            out[:, :k] = self.score_considered(q[:, :k], penalty) + mask[:, :k]
        return out

    def root_visits(self, visits: np.ndarray) -> np.ndarray:
        """Visits made by this search (reused visits don't count for the schedule). [A, B]"""
        if self.root_visits0 is None:
            return visits
        return visits - self.root_visits0

    def score_considered(self, q: np.ndarray, penalty: np.ndarray) -> np.ndarray:
        """``max(-1e9, gumbel + logits + q) + penalty`` at the roots. [A, B]"""
        return np.maximum(F32(-1e9), self.gumbel_logits + q) + penalty


# ----------------------------------------------------------------------------------------
# Input checks shared with the policies


def as_matrix(x: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=F32)
    if arr.shape != shape:
        raise ValueError(f"{what} must have shape [B, A]={shape}, got {arr.shape}")
    return arr


def as_vector(x: Any, b: int, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=F32)
    if arr.shape != (b,):
        raise ValueError(f"{what} must have shape [B]=({b},), got {arr.shape}")
    return arr


def as_mask(x: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != shape:
        raise ValueError(f"{what} must have shape [B, A]={shape}, got {arr.shape}")
    return arr.astype(bool)


def as_embeddings(x: Any, b: int, what: str) -> np.ndarray:
    """A numeric ``[B, ...]`` array, or a ``[B]`` object array of opaque handles."""
    if isinstance(x, np.ndarray) and x.dtype != object:
        if x.ndim == 0 or x.shape[0] != b:
            raise ValueError(f"{what} must have a leading batch axis of size {b}, got {x.shape}")
        return x
    if isinstance(x, np.ndarray) and x.shape == (b,):
        return x
    items = list(x)
    if len(items) != b:
        raise ValueError(f"{what} must hold one embedding per batch row ({b}), got {len(items)}")
    out = np.empty(b, dtype=object)
    for i, item in enumerate(items):  # element-wise: tuples must stay opaque objects
        out[i] = item
    return out


def mask_invalid(logits: np.ndarray, invalid: np.ndarray | None) -> np.ndarray:
    """Shift by the max and give invalid actions the smallest finite logit (as mctx). [B, A]"""
    if invalid is None:
        return logits
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return np.where(invalid, MIN_LOGIT, shifted).astype(F32)


# ----------------------------------------------------------------------------------------
# The engine


def prepare_reuse(root_tree: Tree, b: int, a: int) -> tuple[Tree, np.ndarray]:
    """Check ``root_tree`` against the batch and compact it (drop unused nodes)."""
    if not isinstance(root_tree, Tree):
        raise TypeError(f"root_tree must be a Tree (e.g. from get_subtree), got {type(root_tree)}")
    if root_tree.batch_size != b or root_tree.num_actions != a:
        raise ValueError(
            f"root_tree has B={root_tree.batch_size}, A={root_tree.num_actions}; "
            f"the root has B={b}, A={a}"
        )
    return compact(root_tree, root_tree.node_visits > 0)


class Engine:
    """Search state of one batch: allocate, ``simulate``, then read ``to_tree``/``root_stats``."""

    def __init__(
        self,
        *,
        root_logits: np.ndarray,
        root_value: np.ndarray | None,
        root_embedding: Any,
        root_invalid: np.ndarray,
        num_simulations: int,
        max_depth: int | None,
        root_tree: Tree | None,
    ) -> None:
        b, a = root_logits.shape
        s = num_simulations
        if root_tree is None:
            n_used = np.ones(b, np.int64)
        else:
            root_tree, n_used = prepare_reuse(root_tree, b, a)
            empty = n_used == 0
            if empty.any() and (root_value is None or root_embedding is None):
                raise ValueError(
                    f"rows {np.flatnonzero(empty).tolist()} of root_tree are empty (the "
                    "chosen child was never expanded); pass a root (RootFnOutput) for them"
                )
            n_used = np.maximum(n_used, 1)
        n = int(n_used.max()) + s
        bn = b * n
        self.b, self.a, self.n, self.bn, self.s = b, a, n, bn, s
        self.dummy = bn  # padding node for paths: its edges have reward 0, discount 1
        self.max_depth = n if max_depth is None else int(max_depth)
        self.rowbase = np.arange(b, dtype=np.int64) * n  # [B] flat index of each root
        self.next_base = self.rowbase + n_used  # [B] flat index of the first free node

        self.block = np.zeros((bn + 1, a, _NF), F32)  # [nodes, A, fields] per-edge data
        self.node = np.zeros((3, bn + 1), F32)  # [visits, value, raw value] per node
        # Flat child index per edge; the dummy marks an unvisited child, so a row whose
        # path ended walks on through the dummy (whose children are the dummy again).
        self.children = np.full((bn + 1, a), self.dummy, np.int64)  # [nodes, A]
        self.reward = np.zeros((bn + 1) * a, F32)  # per edge
        self.discount = np.zeros((bn + 1) * a, F32)  # per edge
        self.discount[bn * a :] = 1.0
        self.child_value = np.zeros((bn + 1) * a, F32)  # per edge
        self.parents = np.full(bn, Tree.NO_PARENT, np.int64)  # in-row index
        self.action_from_parent = np.full(bn, Tree.NO_PARENT, np.int64)
        # The action each node would select next and the child it leads to (the dummy if
        # unvisited): a node's score changes only when a simulation passes through it, and
        # then it is rescored, so selection is a pointer chase along best_child.
        self.best_act = np.zeros(bn + 1, np.int64)  # [nodes]
        self.best_child = np.full(bn + 1, self.dummy, np.int64)  # [nodes]
        # Interior nodes whose actions are all invalid (terminal states): a simulation that
        # reaches one re-evaluates it instead of taking an invalid action there.
        self.dead_end = np.zeros(bn + 1, bool)  # [nodes]
        self.has_dead_ends = False
        self.loaded: np.ndarray | None = None  # flat indices of nodes taken from root_tree

        # [B, ...] example of the embeddings: numeric ones are stored in one array.
        proto = root_embedding if root_tree is None else root_tree.embeddings[:, 0]
        if isinstance(proto, np.ndarray) and proto.dtype != object:
            self.emb = np.zeros((bn + 1,) + proto.shape[1:], proto.dtype)
        else:
            self.emb = np.empty(bn + 1, object)

        if root_tree is not None:
            self._load(root_tree)
        self._init_roots(root_logits, root_value, root_embedding, root_invalid)

    # -- construction -------------------------------------------------------------------

    def _load(self, tree: Tree) -> None:
        """Copy a compacted tree into the first ``tree.num_nodes`` slots of each row."""
        b, n, a, m = self.b, self.n, self.a, tree.num_nodes
        m = min(m, n)
        blk = self.block[: self.bn].reshape(b, n, a, _NF)
        blk[:, :m, :, _CV] = tree.children_visits[:, :m]
        blk[:, :m, :, _Q] = tree.children_rewards[:, :m] + (
            tree.children_discounts[:, :m] * tree.children_values[:, :m]
        )
        logits = np.asarray(tree.children_prior_logits[:, :m], F32)
        blk[:, :m, :, _L] = logits
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        blk[:, :m, :, _P] = e / e.sum(axis=-1, keepdims=True)
        blk[:, :m, :, _MASK] = np.where(tree.node_invalid_actions[:, :m], _NEG_INF, _ZERO)
        node = self.node[:, : self.bn].reshape(3, b, n)
        node[0, :, :m] = tree.node_visits[:, :m]
        node[1, :, :m] = tree.node_values[:, :m]
        node[2, :, :m] = tree.raw_values[:, :m]
        ci = np.asarray(tree.children_index[:, :m], np.int64)
        flat_ci = np.where(ci >= 0, ci + self.rowbase[:, None, None], self.dummy)
        self.children[: self.bn].reshape(b, n, a)[:, :m] = flat_ci
        self.reward[: self.bn * a].reshape(b, n, a)[:, :m] = tree.children_rewards[:, :m]
        disc = self.discount[: self.bn * a].reshape(b, n, a)
        disc[:, :m] = tree.children_discounts[:, :m]
        self.child_value[: self.bn * a].reshape(b, n, a)[:, :m] = tree.children_values[:, :m]
        self.parents.reshape(b, n)[:, :m] = tree.parents[:, :m]
        self.action_from_parent.reshape(b, n)[:, :m] = tree.action_from_parent[:, :m]
        self.emb[: self.bn].reshape((b, n) + self.emb.shape[1:])[:, :m] = tree.embeddings[:, :m]
        self.loaded = np.flatnonzero(node[0].reshape(-1) > 0)  # flat indices of kept nodes
        dead = tree.node_invalid_actions[:, :m].all(axis=-1)  # [B, m]
        dead[:, 0] = False  # the root is never skipped (mctx: argmax falls back to action 0)
        self.dead_end[: self.bn].reshape(b, n)[:, :m] = dead
        self.has_dead_ends = bool(dead.any())

    def _init_roots(
        self,
        logits: np.ndarray,
        value: np.ndarray | None,
        embedding: Any,
        invalid: np.ndarray,
    ) -> None:
        roots = self.rowbase
        lt = np.ascontiguousarray(logits.T)  # [A, B]
        self.block[roots, :, _L] = logits
        self.block[roots, :, _P] = softmax_axis0(lt).T
        self.block[roots, :, _MASK] = np.where(invalid, _NEG_INF, _ZERO)
        visits = self.node[0, roots]
        if value is not None:
            fresh = visits == 0  # rows without a reused root start like mctx: 1 visit
            self.node[2, roots] = value
            self.node[1, roots] = np.where(fresh, value, self.node[1, roots])
            self.node[0, roots] = np.where(fresh, 1, visits)
        if embedding is not None:
            self.emb[roots] = embedding
        self.root_invalid = invalid

    # -- helpers ------------------------------------------------------------------------

    def _stats(self, ids: np.ndarray) -> tuple[NodeStats, np.ndarray]:
        """NodeStats of nodes ``ids`` [M] and their invalid-action mask (0/-inf) [A, M]."""
        g = self.block.take(ids, axis=0).transpose(2, 1, 0).copy()  # [fields, A, M]
        s = self.node.take(ids, axis=1)  # [3, M]
        return NodeStats(g[_CV], g[_Q], g[_P], g[_L], s[0], s[1], s[2]), g[_MASK]

    def _rescore(self, scorer, ids: np.ndarray, num_roots: int, sims_done: int) -> None:
        """Recompute the selection scores of nodes ``ids``, the first ``num_roots`` roots."""
        stats, mask = self._stats(ids)
        act = scorer.scores(stats, mask, num_roots, sims_done).argmax(axis=0)  # [M]
        self.best_act[ids] = act
        self.best_child[ids] = self.children[ids, act]

    def root_stats(self) -> NodeStats:
        return self._stats(self.rowbase)[0]

    # -- the search loop ----------------------------------------------------------------

    def simulate(self, params: Any, rng: np.random.Generator, recurrent_fn, scorer) -> None:
        b, a, s, dummy = self.b, self.a, self.s, self.dummy
        if s == 0:
            return
        roots = self.rowbase
        # Scores of every node that already exists (the roots; plus reused nodes).
        ids = roots
        if self.loaded is not None:
            ids = np.concatenate((roots, np.setdiff1d(self.loaded, roots)))
        self._rescore(scorer, ids, b, 0)

        max_depth = self.max_depth
        depth_cap = min(max_depth, self.n) + 1
        path_node = np.full((depth_cap + 1, b), dummy, np.int64)  # [depth, B] flat nodes
        path_node[0] = roots
        path_node_flat = path_node.reshape(-1)
        rows_all = np.arange(b)
        block_flat, children = self.block.reshape(-1), self.children
        best_act, best_child, dead_end = self.best_act, self.best_child, self.dead_end
        node_visits, node_value, raw_value = self.node
        reward, discount, child_value = self.reward, self.discount, self.child_value
        emb = self.emb
        emb_numeric = emb.dtype != object
        min_reduce = np.minimum.reduce

        for sim in range(s):
            # ---- selection: every row follows its nodes' best children while they exist
            # and the depth is below max_depth; rows that stopped sit on the dummy node.
            cur = roots
            depth = 1
            while depth < max_depth:
                child = best_child.take(cur)
                if min_reduce(child) == dummy:
                    break
                path_node[depth] = cur = child
                depth += 1
            # The last real edge of each row: a new child, or an existing one at max_depth.
            path_len = np.add.reduce(path_node[:depth] != dummy, axis=0)  # [B]
            last_node = path_node_flat.take((path_len - 1) * b + rows_all)
            last_act = best_act.take(last_node)
            last_child = best_child.take(last_node)
            dead = dead_end.take(last_node) if self.has_dead_ends else None
            if dead is not None and dead.any():  # step back to its parent, re-evaluate it
                rows = dead.nonzero()[0]
                level = path_len[rows] - 1  # >= 1: the root is never a dead end
                path_node[level, rows] = dummy
                last_child[rows] = last_node[rows]
                last_act[rows] = self.action_from_parent[last_node[rows]]
                last_node[rows] = path_node[level - 1, rows]

            # ---- expansion: one batched model call for the whole batch.
            leaf = np.where(last_child == dummy, self.next_base + sim, last_child)  # [B]
            step, new_emb = recurrent_fn(params, rng, last_act, emb[last_node])
            r = as_vector(step.reward, b, "recurrent_fn output reward")
            g = as_vector(step.discount, b, "recurrent_fn output discount")
            v = as_vector(step.value, b, "recurrent_fn output value")
            logits = as_matrix(step.prior_logits, (b, a), "recurrent_fn output prior_logits")
            invalid = getattr(step, "invalid_actions", None)
            blk_leaf = self.block.take(leaf, axis=0)  # [B, A, fields], written back below
            if invalid is not None:
                invalid = as_mask(invalid, (b, a), "recurrent_fn output invalid_actions")
                logits = mask_invalid(logits, invalid)
                blk_leaf[:, :, _MASK] = np.where(invalid, _NEG_INF, _ZERO)
                dead = invalid.all(axis=1)
                dead_end[leaf] = dead
                self.has_dead_ends |= bool(dead.any())
            else:
                blk_leaf[:, :, _MASK] = 0.0
                dead_end[leaf] = False
            blk_leaf[:, :, _L] = logits
            blk_leaf[:, :, _P] = softmax_axis0(np.ascontiguousarray(logits.T)).T
            self.block[leaf] = blk_leaf
            node_visits[leaf] += 1
            node_value[leaf] = v
            raw_value[leaf] = v
            edge = last_node * a + last_act
            children.reshape(-1)[edge] = leaf
            reward[edge] = r
            discount[edge] = g
            self.parents[leaf] = last_node - self.rowbase
            self.action_from_parent[leaf] = last_act
            if emb_numeric:
                new_emb = np.asarray(new_emb)
                if new_emb.shape[:1] != (b,):
                    raise ValueError(
                        f"recurrent_fn's new embedding must have a leading batch axis of size "
                        f"{b}, got shape {new_emb.shape}"
                    )
                emb[leaf] = new_emb
            else:
                emb[leaf] = as_embeddings(new_emb, b, "recurrent_fn's new embedding")

            # ---- backup along the recorded path, all levels and rows at once.
            nodes = path_node[:depth]  # [D, B], dummy where a row stopped earlier
            edges = nodes * a + best_act.take(nodes)  # dummy entries hit its (0, 1) edges
            r_path = reward.take(edges)
            g_path = discount.take(edges)
            kids = path_node[1 : depth + 1]
            kids = np.where(kids == dummy, leaf, kids)  # the last real edge leads to the leaf
            returns = np.empty((depth, b), F32)
            ret = node_value.take(leaf)
            for d in range(depth - 1, -1, -1):
                np.multiply(g_path[d], ret, out=returns[d])
                ret = np.add(r_path[d], returns[d], out=returns[d])
            count = node_visits.take(nodes)
            node_value[nodes] = (node_value.take(nodes) * count + returns) / (count + 1)
            node_visits[nodes] = count + 1
            kid_value = node_value.take(kids)
            child_value[edges] = kid_value
            base = edges * _NF
            block_flat[base + _Q] = r_path + g_path * kid_value
            block_flat[base] += 1  # children visits; duplicates only on the dummy

            # ---- rescore the nodes whose statistics changed (roots first).
            if sim + 1 < s:
                inner = nodes[1:]
                ids = np.concatenate((roots, inner[inner != dummy], leaf))
                self._rescore(scorer, ids, b, sim + 1)
                path_node[1:depth] = dummy

    # -- output -------------------------------------------------------------------------

    def to_tree(self, extra_data: Any) -> Tree:
        b, n, a, bn = self.b, self.n, self.a, self.bn
        blk = self.block[:bn].reshape(b, n, a, _NF)
        ci = self.children[:bn].reshape(b, n, a)
        ci = np.where(ci != self.dummy, ci - self.rowbase[:, None, None], Tree.UNVISITED)
        node = self.node[:, :bn].reshape(3, b, n)
        return freeze(
            Tree(
                node_visits=node[0].astype(np.int32),
                raw_values=node[2].copy(),
                node_values=node[1].copy(),
                parents=self.parents.reshape(b, n).astype(np.int32),
                action_from_parent=self.action_from_parent.reshape(b, n).astype(np.int32),
                children_index=ci.astype(np.int32),
                children_prior_logits=blk[..., _L].copy(),
                children_visits=blk[..., _CV].astype(np.int32),
                children_rewards=self.reward[: bn * a].reshape(b, n, a).copy(),
                children_discounts=self.discount[: bn * a].reshape(b, n, a).copy(),
                children_values=self.child_value[: bn * a].reshape(b, n, a).copy(),
                embeddings=self.emb[:bn].reshape((b, n) + self.emb.shape[1:]).copy(),
                root_invalid_actions=np.array(self.root_invalid, dtype=bool),
                node_invalid_actions=blk[..., _MASK] == _NEG_INF,
                extra_data=extra_data,
            )
        )
