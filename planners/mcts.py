"""MuZero and Gumbel MuZero search in numpy, with mctx's API (no jax, no compile step).

The user's model plugs in as ``recurrent_fn(params, rng, action [B], embedding [B]) ->
(RecurrentFnOutput, new_embedding [B])``, called once per simulation for the whole batch.
Beyond mctx: subtree reuse (:func:`get_subtree` + ``root_tree=``), invalid-action masks
at interior nodes (``RecurrentFnOutput.invalid_actions``), and sampled continuous actions
(:mod:`planners.sampled`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import numpy as np

from planners._search import (
    F32,
    TINY,
    Engine,
    GumbelScorer,
    MuZeroScorer,
    as_embeddings,
    as_mask,
    as_vector,
    considered_visit_table,
    mask_invalid,
)
from planners.widening import Widening, WideningScorer
from planners._tree import GumbelMuZeroExtraData, SearchSummary, Tree, get_subtree
from planners.qtransforms import (
    qtransform_by_min_max,
    qtransform_by_parent_and_siblings,
    qtransform_completed_by_mix_value,
)

__all__ = [
    "GumbelMuZeroExtraData",
    "PolicyOutput",
    "RecurrentFnOutput",
    "RootFnOutput",
    "SearchSummary",
    "Tree",
    "get_subtree",
    "gumbel_muzero_policy",
    "muzero_policy",
    "qtransform_by_min_max",
    "qtransform_by_parent_and_siblings",
    "qtransform_completed_by_mix_value",
]

T = TypeVar("T")


@dataclass(frozen=True)
class RootFnOutput:
    """The model's output at the root of each row."""

    prior_logits: np.ndarray  # [B, A] policy logits
    value: np.ndarray  # [B] state value
    embedding: Any  # [B, ...] numeric array, or a length-B sequence of opaque handles

    def replace(self, **changes: Any) -> RootFnOutput:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RecurrentFnOutput:
    """The model's output for the node reached by ``action`` from ``embedding``."""

    reward: np.ndarray  # [B] reward of the transition
    discount: np.ndarray  # [B] discount applied to the new node's value (0 at episode end)
    prior_logits: np.ndarray  # [B, A] policy logits at the new node
    value: np.ndarray  # [B] value of the new node
    # [B, A] bool or None: True marks actions that are invalid at the new node. They get
    # zero prior probability and are never selected there (mctx only masks the root).
    invalid_actions: np.ndarray | None = None

    def replace(self, **changes: Any) -> RecurrentFnOutput:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PolicyOutput(Generic[T]):
    """What a policy returns."""

    action: np.ndarray  # [B] int32, the action to take
    action_weights: np.ndarray  # [B, A] float32, policy training target
    search_tree: Tree[T]  # the tree of the search


RecurrentFn = Callable[[Any, np.random.Generator, np.ndarray, Any], tuple[RecurrentFnOutput, Any]]


def muzero_policy(
    params: Any,
    rng: np.random.Generator,
    root: RootFnOutput | None,
    recurrent_fn: RecurrentFn,
    num_simulations: int,
    invalid_actions: np.ndarray | None = None,
    max_depth: int | None = None,
    *,
    qtransform: Callable = qtransform_by_parent_and_siblings,
    dirichlet_fraction: float = 0.25,
    dirichlet_alpha: float = 0.3,
    pb_c_init: float = 1.25,
    pb_c_base: float = 19652,
    temperature: float = 1.0,
    root_tree: Tree | None = None,
    widening: Widening | None = None,
) -> PolicyOutput[None]:
    """Run MuZero search (PUCT) and sample an action from the root's visit counts.

    ``B`` is the batch size and ``A`` the number of actions.

    Args:
      params: forwarded to ``recurrent_fn``.
      rng: a ``numpy.random.Generator``; Dirichlet noise, the 1e-7 tie-breaking noise and
        the final sample are drawn from it, and it is passed on to ``recurrent_fn``.
      root: the model's output at the root. May be None only with ``root_tree``, whose
        stored root prior is then used.
      recurrent_fn: ``(params, rng, action [B], embedding) -> (RecurrentFnOutput,
        new_embedding)``, called once per simulation for the whole batch. ``embedding``
        is ``[B, ...]`` if the root's was a numeric array, else a ``[B]`` object array.
        An interior node whose actions are all invalid is treated as terminal: reaching
        it re-evaluates it (as at ``max_depth``) instead of taking an action there.
      num_simulations: simulations per row (>= 0).
      invalid_actions: ``[B, A]``, True (or 1) marks an invalid action at the root.
      max_depth: maximum number of edges from the root to an expanded node (>= 1);
        None means unbounded. A simulation reaching it re-evaluates the node there.
      qtransform: completes and normalises Q-values: a function of ``NodeStats``
        (actions-first ``[A, M]`` arrays) returning ``[A, M]``; see
        ``planners.qtransforms``. Bind options with ``functools.partial``.
      dirichlet_fraction: weight of the Dirichlet noise mixed into the root prior.
      dirichlet_alpha: concentration of that noise.
      pb_c_init: ``c_1`` of the PUCT formula.
      pb_c_base: ``c_2`` of the PUCT formula.
      temperature: act proportionally to ``visit_counts ** (1 / temperature)``; 0 is
        greedy (ties broken at random).
      root_tree: continue from this tree (normally ``get_subtree(previous_tree,
        action)``): its statistics are kept and ``num_simulations`` more are added. The
        root's prior, raw value and embedding are replaced by ``root``'s when given; the
        root invalid mask is ``invalid_actions`` when given, else the stored one.
      widening: progressive widening (:class:`planners.widening.Widening`): a node
        visited ``N`` times selects only among its first ``ceil(c * N**alpha)`` actions
        (the order of the actions is the order they unlock in). None (default): all
        actions, the mctx search.

    Returns:
      ``PolicyOutput`` with ``action`` [B], ``action_weights`` [B, A] (the root's visit
      distribution) and the search tree.
    """
    logits, value, embedding, invalid, b, a = _prepare_root(root, invalid_actions, root_tree)
    _check_budget(num_simulations, max_depth)
    if not 0.0 <= dirichlet_fraction <= 1.0:
        raise ValueError(f"dirichlet_fraction must lie in [0, 1], got {dirichlet_fraction}")

    probs = _softmax_rows(logits)
    if dirichlet_fraction > 0:
        if dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
        noise = rng.dirichlet(np.full(a, dirichlet_alpha), size=b).astype(F32)
        probs = (1 - dirichlet_fraction) * probs + dirichlet_fraction * noise
    noisy_logits = mask_invalid(np.log(np.maximum(probs, TINY)).astype(F32), invalid)

    engine = Engine(
        root_logits=noisy_logits,
        root_value=value,
        root_embedding=embedding,
        root_invalid=_root_mask(invalid, b, a),
        num_simulations=num_simulations,
        max_depth=max_depth,
        root_tree=root_tree,
    )
    scorer = MuZeroScorer(qtransform, pb_c_init, pb_c_base, rng)
    if widening is not None:
        scorer = WideningScorer(scorer, widening)
    engine.simulate(params, rng, recurrent_fn, scorer)
    tree = engine.to_tree(extra_data=None)
    action_weights = tree.summary().visit_probs
    action = _sample_categorical(rng, np.log(np.maximum(action_weights, TINY)), temperature)
    return PolicyOutput(action=action, action_weights=action_weights, search_tree=tree)


def gumbel_muzero_policy(
    params: Any,
    rng: np.random.Generator,
    root: RootFnOutput | None,
    recurrent_fn: RecurrentFn,
    num_simulations: int,
    invalid_actions: np.ndarray | None = None,
    max_depth: int | None = None,
    *,
    qtransform: Callable = qtransform_completed_by_mix_value,
    max_num_considered_actions: int = 16,
    gumbel_scale: float = 1.0,
    root_tree: Tree | None = None,
) -> PolicyOutput[GumbelMuZeroExtraData]:
    """Run Full Gumbel MuZero ("Policy improvement by planning with Gumbel", Danihelka et
    al. 2022): Sequential Halving with Gumbel at the root, deterministic selection below.

    Args:
      params, rng, root, recurrent_fn, num_simulations, invalid_actions, max_depth: as in
        :func:`muzero_policy`.
      qtransform: completes the Q-values (see ``planners.qtransforms``).
      max_num_considered_actions: actions sampled without replacement at the root; fewer
        if a row has fewer valid actions.
      gumbel_scale: scale of the Gumbel noise; 0 makes the search deterministic.
      root_tree: continue from this tree (see :func:`muzero_policy`). Its statistics are
        kept everywhere; at the root, Sequential Halving schedules only this search's
        visits (reused visits still inform the root's Q-values and ``action_weights``).

    Returns:
      ``PolicyOutput`` with ``action`` [B] (the best of the most visited considered
      actions), ``action_weights`` [B, A] = softmax(prior logits + completed Q) and the
      tree, whose ``extra_data`` is ``GumbelMuZeroExtraData(root_gumbel)``.
    """
    logits, value, embedding, invalid, b, a = _prepare_root(root, invalid_actions, root_tree)
    _check_budget(num_simulations, max_depth)
    if max_num_considered_actions < 1:
        raise ValueError(
            f"max_num_considered_actions must be >= 1, got {max_num_considered_actions}"
        )
    logits = mask_invalid(logits, invalid)
    if gumbel_scale != 0:
        gumbel = (gumbel_scale * rng.gumbel(size=(b, a))).astype(F32)
    else:
        gumbel = np.zeros((b, a), F32)
    root_mask = _root_mask(invalid, b, a)

    # Sequential Halving: eligible visit count per simulation and row (rows differ when
    # they have fewer valid actions than max_num_considered_actions).
    num_valid = (~root_mask).sum(axis=1)
    num_considered = np.minimum(max_num_considered_actions, num_valid)  # [B]
    steps = max(num_simulations, 1)
    table = considered_visit_table(max_num_considered_actions, steps)
    considered = np.ascontiguousarray(table[num_considered].T)  # [num_simulations, B]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    gumbel_logits = np.ascontiguousarray((gumbel + shifted).T)  # [A, B]
    visits0 = None
    if root_tree is not None:
        visits0 = np.ascontiguousarray(root_tree.children_visits[:, Tree.ROOT_INDEX].T, F32)
    scorer = GumbelScorer(qtransform, gumbel_logits, considered, visits0)

    engine = Engine(
        root_logits=logits,
        root_value=value,
        root_embedding=embedding,
        root_invalid=root_mask,
        num_simulations=num_simulations,
        max_depth=max_depth,
        root_tree=root_tree,
    )
    engine.simulate(params, rng, recurrent_fn, scorer)
    tree = engine.to_tree(GumbelMuZeroExtraData(root_gumbel=gumbel))

    # Act with the best action among the most visited ones: argmax of gumbel + logits +
    # completed Q over actions whose (this search's) visit count is the maximum.
    stats = engine.root_stats()
    completed_q = qtransform(stats)  # [A, B]
    visits = scorer.root_visits(stats.visit_counts)  # [A, B]
    penalty = np.where(visits == visits.max(axis=0), F32(0), F32(-np.inf))
    to_argmax = scorer.score_considered(completed_q, penalty)
    to_argmax = np.where(root_mask.T, -np.inf, to_argmax)
    action = to_argmax.argmax(axis=0).astype(np.int32)

    completed_q = completed_q.T  # [B, A]
    action_weights = _softmax_rows(mask_invalid(logits + completed_q, invalid))
    return PolicyOutput(action=action, action_weights=action_weights, search_tree=tree)


# ----------------------------------------------------------------------------------------


def _prepare_root(
    root: RootFnOutput | None, invalid_actions: Any, root_tree: Tree | None
) -> tuple[np.ndarray, np.ndarray | None, Any, np.ndarray | None, int, int]:
    """Validated (logits [B, A], value [B] | None, embedding | None, invalid | None, B, A)."""
    if root is None:
        if root_tree is None:
            raise ValueError("root is None: pass a RootFnOutput (or root_tree to reuse a tree)")
        b, a = root_tree.batch_size, root_tree.num_actions
        logits = np.asarray(root_tree.children_prior_logits[:, Tree.ROOT_INDEX], F32)
        value = embedding = None
    else:
        logits = np.asarray(root.prior_logits, F32)
        if logits.ndim != 2:
            raise ValueError(f"root.prior_logits must have shape [B, A], got {logits.shape}")
        b, a = logits.shape
        value = as_vector(root.value, b, "root.value")
        embedding = as_embeddings(root.embedding, b, "root.embedding")
    if invalid_actions is not None:
        invalid = as_mask(invalid_actions, (b, a), "invalid_actions")
    elif root_tree is not None and root_tree.root_invalid_actions.any():
        invalid = as_mask(root_tree.root_invalid_actions, (b, a), "root_tree.root_invalid_actions")
    else:
        invalid = None
    if root_tree is not None and (root_tree.batch_size, root_tree.num_actions) != (b, a):
        raise ValueError(
            f"root_tree has B={root_tree.batch_size}, A={root_tree.num_actions}; "
            f"the root has B={b}, A={a}"
        )
    return logits, value, embedding, invalid, b, a


def _root_mask(invalid: np.ndarray | None, b: int, a: int) -> np.ndarray:
    return np.zeros((b, a), bool) if invalid is None else invalid


def _check_budget(num_simulations: int, max_depth: int | None) -> None:
    if int(num_simulations) != num_simulations or num_simulations < 0:
        raise ValueError(f"num_simulations must be an int >= 0, got {num_simulations!r}")
    if max_depth is not None and (int(max_depth) != max_depth or max_depth < 1):
        raise ValueError(f"max_depth must be None or an int >= 1, got {max_depth!r}")


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(F32)


def _sample_categorical(
    rng: np.random.Generator, logits: np.ndarray, temperature: float
) -> np.ndarray:
    """Sample ``[B]`` from ``softmax(logits / temperature)`` (Gumbel-max); 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits - logits.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaled = logits / max(float(TINY), float(temperature))
    return (scaled + rng.gumbel(size=logits.shape)).argmax(axis=-1).astype(np.int32)
