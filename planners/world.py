"""The world behind the search: planners over any backend through the Arc Fabric state layer.

* :class:`WorldSearch` gives MCTS its ``recurrent_fn``: an embedding is a checkpoint id in
  a :class:`~arcfab_gym.fabric.store.StateManager`; expanding ``B`` leaves forks their
  checkpoints and steps them in one batched model call (``step_batch``), and every
  expanded node is recorded in a :class:`~arcfab_gym.fabric.tree.TrajectoryTree`
  (action, reward, then visits / value / chosen path after the search).
* :func:`sequence_evaluator` gives CEM/MPPI its ``evaluate``: fork the root ``N`` times,
  step all ``N`` action sequences batched, return their returns; the root is never
  touched (the rewind is free).

Objectives are pluggable: :func:`reward_objective` (the backend's reward head, default)
or :class:`GoalObjective` (distance to a goal in the model's own embedding space, DINO-WM
style). Nothing here knows which task the backend simulates.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.fabric.store import StateManager
from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.models.base import ModelState, StepOutput, WorldModel
from planners.mcts import RecurrentFnOutput, RootFnOutput, Tree

#: objective(model, step_output, next_state) -> float, higher is better.
Objective = Callable[[WorldModel, StepOutput, ModelState], float]
#: action_map(observations, u [N, A]) -> backend actions [N, A] (float32).
ActionMap = Callable[[Sequence[dict[str, np.ndarray]], np.ndarray], np.ndarray]


def reward_objective(model: WorldModel, out: StepOutput, state: ModelState) -> float:
    """The backend's own reward (for a learned model: its reward head)."""
    return float(out.reward)


class GoalObjective:
    """Minus the distance to a goal in the backend's embedding space (``model.embed``),
    scaled so that a typical distance is about 1."""

    #: It reads each step's frame (its embedding), not just the observation and reward.
    reads_frames = True

    def __init__(self, goal_embedding: np.ndarray, scale: float = 1.0):
        self.goal = np.asarray(goal_embedding, dtype=np.float64)
        self.scale = float(scale)

    @classmethod
    def from_state(cls, model: WorldModel, goal_state: ModelState, scale: float | None = None):
        goal = model.embed(goal_state)
        return cls(goal, scale if scale is not None else max(1e-6, float(np.linalg.norm(goal))))

    def __call__(self, model: WorldModel, out: StepOutput, state: ModelState) -> float:
        return -float(np.linalg.norm(model.embed(state) - self.goal)) / self.scale


class Pessimistic:
    """``objective`` minus ``weight`` times the backend's own doubt about each step,
    ``info["disagreement"]`` (for mini-dreamzero: how far apart its state-dynamics
    ensemble puts the T, in px). A sampling planner picks the best-looking of many
    sequences, and the best-looking is where the model errs most in its favour (the
    winner's curse); charging for disagreement steers it to plans the model is sure of.
    A backend that reports no disagreement (the simulator) counts as certain."""

    def __init__(self, objective: Objective, weight: float):
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"pessimism weight must be finite and >= 0, got {weight}")
        self.objective, self.weight = objective, float(weight)
        self.reads_frames = getattr(objective, "reads_frames", False)

    def __call__(self, model: WorldModel, out: StepOutput, state: ModelState) -> float:
        doubt = float(out.info.get("disagreement", 0.0))
        return self.objective(model, out, state) - self.weight * doubt


def absorbing_weight(discount: float, step: int, horizon: int) -> float:
    """Weight of an absorbing (terminal) state's value reached at ``step``: counted at
    that step and every step after, ``discount**step / (1 - discount)``; with
    ``discount = 1`` to the end of the horizon."""
    if discount < 1.0:
        return discount**step / (1.0 - discount)
    return float(horizon - step)


def absorbing_value(reward: float, discount: float, step: int, horizon: int | None) -> float:
    """The one rule for an absorbing state entered with ``reward`` at ``step`` (0-based,
    counted from where the value is taken): the reward held at that step and every one
    after, i.e. ``reward * absorbing_weight(discount, 0, horizon - step)`` -- forever
    (``reward / (1 - discount)``) for ``discount < 1``, to the end of ``horizon`` for
    ``discount = 1`` (which then needs a horizon)."""
    if discount >= 1.0 and horizon is None:
        raise ValueError("discount = 1 needs a horizon for absorbing (held) values")
    return float(reward) * absorbing_weight(discount, 0, max(0, (horizon or 0) - step))


def rollout_returns(
    model: WorldModel,
    states: Sequence[ModelState],
    seqs: np.ndarray,
    *,
    objective: Objective = reward_objective,
    discount: float = 1.0,
    action_map: ActionMap | None = None,
    observations: Sequence[dict[str, np.ndarray] | None] | None = None,
    render: bool = True,
) -> tuple[np.ndarray, list[StepOutput]]:
    """Discounted returns of ``N`` action sequences ``seqs [N, H, A]``, sequence ``i``
    stepped from ``states[i]`` (batched, ``H`` model calls); a terminal step is absorbing
    (:func:`absorbing_weight`). ``render=False``: the objective reads no frames (see
    :meth:`WorldModel.step_batch`). Returns ``(returns [N], last step outputs)``."""
    seqs = np.asarray(seqs, dtype=np.float32)
    n, horizon = seqs.shape[:2]
    states = list(states)
    returns = np.zeros(n)
    alive = np.ones(n, dtype=bool)
    outs: list[StepOutput] = []
    obs = list(observations) if observations is not None else [None] * n
    for h in range(horizon):
        actions = seqs[:, h] if action_map is None else action_map(obs, seqs[:, h])
        states, outs = model.step_batch(states, actions, render=render)
        obs = [o.observation for o in outs]
        values = np.array([objective(model, o, s) for o, s in zip(outs, states)])
        ended = alive & np.array([o.terminated for o in outs])
        returns += (alive & ~ended) * discount**h * values
        returns += ended * values * absorbing_weight(discount, h, horizon)
        alive &= ~ended
    return returns, outs


def hypothesis_roots(model: WorldModel, root: ModelState, hypotheses: int) -> list[ModelState]:
    """``[root]`` for one hypothesis, else ``root`` under each of the model's first
    ``hypotheses`` (:meth:`WorldModel.assume`); a clear error when it holds fewer."""
    if int(hypotheses) != hypotheses or hypotheses < 1:
        raise ValueError(f"hypotheses must be a whole number >= 1, got {hypotheses}")
    if hypotheses == 1:
        return [root]
    if hypotheses > model.hypotheses:
        raise ValueError(f"hypotheses={hypotheses}, but {model.name} holds "
                         f"{model.hypotheses} (its ensemble members)")
    return [model.assume(root, k) for k in range(int(hypotheses))]


def check_risk(risk: float) -> float:
    """``risk`` (the spread charged to a sequence's returns under several hypotheses) if it
    is finite and >= 0; otherwise a ValueError naming it."""
    if not np.isfinite(risk) or risk < 0:
        raise ValueError(f"risk must be finite and >= 0, got {risk}")
    return float(risk)


def hedged(returns: np.ndarray, risk: float) -> np.ndarray:
    """Per column of ``returns [K, N]`` (one row per hypothesis): the mean less ``risk``
    times the standard deviation; a single row passes unchanged."""
    if len(returns) == 1:
        return returns[0]
    return returns.mean(0) - risk * returns.std(0)


def sequence_evaluator(
    model: WorldModel,
    root: ModelState,
    *,
    objective: Objective = reward_objective,
    discount: float = 1.0,
    on_rollout: Callable[[np.ndarray, list[StepOutput]], None] | None = None,
    action_map: ActionMap | None = None,
    root_observation: dict[str, np.ndarray] | None = None,
    render: bool = True,
    hypotheses: int = 1,
    risk: float = 0.0,
) -> Callable[[np.ndarray], np.ndarray]:
    """``evaluate(actions [N, H, A]) -> returns [N]`` by forking ``root`` N times.

    ``hypotheses = K > 1`` scores each sequence under the first ``K`` of the model's
    hypotheses about its dynamics (``model.assume``: an ensemble's members, each rolling
    out its own future -- PETS' trajectory sampling) by the mean of the ``K`` returns less
    ``risk`` times their standard deviation, all ``N * K`` rollouts in one batch. A
    planner then picks the sequence most members believe in, not the one a single
    network is most wrong about (the winner's curse); ``K = 1`` is the model's readout.

    A terminal step ends the episode in an absorbing state: its objective value is counted
    for every step after it, forever (``v * discount**h / (1 - discount)`` in all), so
    that reaching the goal early is worth more than hovering next to it; with
    ``discount = 1`` it is counted to the end of the horizon.
    ``on_rollout(actions, last_outputs)`` is called after each evaluation (for logging).
    ``action_map(observations, u [N, A]) -> actions [N, A]`` turns the planner's variables
    into the backend's actions given each fork's last observation (e.g. moves relative to
    an agent); it needs ``root_observation`` for the first step.
    ``render=False`` tells the backend that ``objective`` reads only the observation and
    reward of each step (see :meth:`WorldModel.step_batch`): a backend with a video may
    then skip generating the frames of the rollouts.
    """
    if action_map is not None and root_observation is None:
        raise ValueError("action_map needs root_observation (the observation at the root)")
    roots = hypothesis_roots(model, root, hypotheses)
    risk = check_risk(risk)

    def evaluate(seqs: np.ndarray) -> np.ndarray:
        seqs = np.asarray(seqs, dtype=np.float32)
        n, k = len(seqs), len(roots)
        tiled = np.concatenate([seqs] * k) if k > 1 else seqs  # hypothesis-major
        returns, outs = rollout_returns(model, [r for r in roots for _ in range(n)], tiled,
                                        objective=objective, discount=discount,
                                        action_map=action_map,
                                        observations=[root_observation] * (n * k), render=render)
        if on_rollout is not None:
            on_rollout(tiled, outs)
        return hedged(returns.reshape(k, n), risk)

    return evaluate


class WorldSearch:
    """MCTS's ``root`` / ``recurrent_fn`` over a backend, recorded in a trajectory tree.

    Args:
        model: any backend (it is used as a stepping engine: its own state is clobbered).
        candidates: ``candidates(observation) -> [A, action_dim]``, the discrete action
            set at a node (e.g. moves relative to the agent, or the model's proposals), or
            ``-> (actions [A, action_dim], prior_logits [A])`` to give MCTS a prior over
            them. It is called with the node's state loaded in ``model``, so it may ask
            the model for its own action proposals there. If it takes ``depth`` and / or
            ``action`` keywords it also gets the node's depth below the root (0 at the
            root) and the action into it (None at the root), e.g. to centre the
            candidates on step ``d`` of a warm-start plan
            (:class:`planners.proposals.PlanProposal`).
        store, tree: where expanded nodes go (new ones by default).
        objective: reward of a transition (default: the backend's reward).
        value_fn: value estimate of a new leaf, ``value_fn(model, out, state)``; default
            the "hold" value: the leaf's reward held from there on,
            ``absorbing_value(r, discount, depth, horizon)`` (``r / (1 - discount)`` for
            ``discount < 1``) -- a cheap optimistic estimate for dense rewards.
        rollout: leaf value by a rollout instead: ``rollout(depth) -> actions [L, A]``
            (or ``rollout(depth, action)``, with the action into the leaf), stepped from
            the new leaf (at ``depth``) under ``objective`` with ``discount``;
            the value is its return (a terminal step is absorbing, as everywhere). Its
            model steps count in :attr:`model_steps`. Overrides ``value_fn``.
        discount: MCTS discount.
        horizon: steps from the root to the end of the planning horizon; needed with
            ``discount = 1``, where an absorbing (terminal) or held value counts to the
            horizon (``absorbing_value``, the sequence evaluators' rule).
        session_id: the tree's session label for search nodes.
        render: False when neither ``candidates`` nor the objectives read a node's frame
            or proposals (see :meth:`WorldModel.step_batch`): the backend may then leave
            the nodes' video to be rendered when someone looks at it.
    """

    def __init__(
        self,
        model: WorldModel,
        candidates: Callable[..., Any],
        *,
        store: StateManager | None = None,
        tree: TrajectoryTree | None = None,
        objective: Objective = reward_objective,
        value_fn: Objective | None = None,
        rollout: Callable[[int], np.ndarray] | None = None,
        discount: float = 0.95,
        horizon: int | None = None,
        session_id: str = "search",
        render: bool = True,
    ):
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {discount}")
        if discount >= 1.0 and horizon is None:
            raise ValueError("discount = 1 needs a horizon (absorbing values count to it)")
        self.model = model
        self.candidates = candidates
        self._cand_kw = _keywords(candidates, ("depth", "action"))
        self.store = store if store is not None else StateManager(model)
        self.tree = tree if tree is not None else TrajectoryTree(store=self.store)
        self.objective = objective
        self.value_fn = value_fn
        self.rollout = rollout
        self._rollout_kw = _keywords(rollout, ("action",)) if rollout is not None else {}
        self.discount = float(discount)
        self.horizon = horizon
        self.session_id = session_id
        self.render = bool(render)
        self._actions: dict[str, np.ndarray] = {}  # checkpoint id -> [A, action_dim]
        self._logits: dict[str, np.ndarray] = {}  # checkpoint id -> [A] prior logits
        self._depth: dict[str, int] = {}  # checkpoint id -> depth below the root
        # For the best sequence seen: per node its parent, the action into it, its root,
        # the discounted return from the root to it; per leaf the rollout behind its value.
        self._parent: dict[str, str | None] = {}
        self._edge: dict[str, np.ndarray] = {}
        self._root_of: dict[str, str] = {}
        self._acc: dict[str, float] = {}
        self._tail: dict[str, np.ndarray] = {}
        self._best: dict[str, tuple[float, str]] = {}  # root id -> (return, leaf id)
        self._owned: list[str] = []
        self.expansions = 0
        self.rollout_steps = 0

    @property
    def model_steps(self) -> int:
        """Model steps taken so far: expansions plus leaf rollouts."""
        return self.expansions + self.rollout_steps

    # --- mctx plumbing --------------------------------------------------------------------
    def root(
        self, states: Sequence[ModelState], *, parent_ids: Sequence[str | None] | None = None
    ) -> RootFnOutput:
        """The roots of a batch of searches (one per state); priors from ``candidates``
        (uniform by default); value 0 (no value of the current frame is available)."""
        ids = []
        for b, state in enumerate(states):
            parent = None if parent_ids is None else parent_ids[b]
            cid = self._put(state, parent, 0, None, kind="search-root", action=None,
                            reward=None)  # fmt: skip
            self._parent[cid], self._root_of[cid], self._acc[cid] = None, cid, 0.0
            ids.append(cid)
        return RootFnOutput(
            prior_logits=np.stack([self._logits[cid] for cid in ids]),
            value=np.zeros(len(ids), dtype=np.float32),
            embedding=np.array(ids, dtype=object),
        )

    def recurrent_fn(self, params: Any, rng: np.random.Generator, action: np.ndarray,
                     embedding: np.ndarray) -> tuple[RecurrentFnOutput, np.ndarray]:
        ids = list(embedding)
        action = np.asarray(action)
        continuous = np.stack([self._actions[cid][int(a)] for cid, a in zip(ids, action)])
        states = [self.store.get_snapshot(cid).model_state for cid in ids]
        next_states, outs = self.model.step_batch(states, continuous, render=self.render)
        self.expansions += len(ids)
        rewards, values, discounts, new_ids = [], [], [], []
        for cid, act, state, out in zip(ids, continuous, next_states, outs):
            r = self.objective(self.model, out, state)
            depth = self._depth[cid] + 1  # of the new node; the edge is step depth - 1
            nid = self._put(state, cid, depth, act, kind="search", action=act.tolist(),
                            reward=r)  # fmt: skip
            new_ids.append(nid)
            self._parent[nid], self._edge[nid], self._root_of[nid] = cid, act, self._root_of[cid]
            if out.terminated:
                # Absorbing: the reward held from this step to the end (one rule with the
                # sequence evaluators: absorbing_value / absorbing_weight), so that
                # reaching the goal beats hovering next to it.
                r_edge, v, g = absorbing_value(r, self.discount, depth - 1, self.horizon), 0.0, 0.0
            else:
                if self.rollout is not None:
                    v = self._rollout_value(nid, state, out, depth)
                elif self.value_fn is not None:
                    v = self.value_fn(self.model, out, state)
                else:
                    v = absorbing_value(r, self.discount, depth, self.horizon)
                r_edge, g = r, self.discount
            rewards.append(r_edge)
            values.append(v)
            discounts.append(g)
            self._acc[nid] = self._acc[cid] + self.discount ** (depth - 1) * r_edge
            total = self._acc[nid] + g * self.discount ** (depth - 1) * v
            root_id = self._root_of[nid]
            if root_id not in self._best or total > self._best[root_id][0]:
                self._best[root_id] = (float(total), nid)
        return (
            RecurrentFnOutput(
                reward=np.asarray(rewards, dtype=np.float32),
                discount=np.asarray(discounts, dtype=np.float32),
                prior_logits=np.stack([self._logits[cid] for cid in new_ids]),
                value=np.asarray(values, dtype=np.float32),
            ),
            np.array(new_ids, dtype=object),
        )

    def best_sequence(self, root_id: str) -> tuple[np.ndarray, float]:
        """The best action sequence seen from ``root_id`` and its return: the actions
        down to the leaf whose path return plus value was highest, then (with
        ``rollout``) the rollout behind that leaf's value -- what iCEM executes, its best
        sequence seen. ``(empty [0, A], -inf)`` before any expansion."""
        if root_id not in self._best:
            return np.zeros((0, 0), dtype=np.float32), -np.inf
        ret, node = self._best[root_id]
        tail = self._tail.get(node)
        actions = []
        while self._parent.get(node) is not None:
            actions.append(self._edge[node])
            node = self._parent[node]
        seq = np.stack(actions[::-1]).astype(np.float32)
        if tail is not None and len(tail):
            seq = np.concatenate([seq, tail.astype(np.float32)])
        return seq, ret

    def _rollout_value(self, cid: str, state: ModelState, out: StepOutput, depth: int) -> float:
        kw = {"action": self._edge[cid]} if "action" in self._rollout_kw else {}
        seq = np.asarray(self.rollout(depth, **kw), dtype=np.float32)
        if seq.ndim != 2 or len(seq) == 0:
            return 0.0
        self._tail[cid] = seq
        returns, _ = rollout_returns(self.model, [state], seq[None], objective=self.objective,
                                     discount=self.discount, render=self.render,
                                     observations=[out.observation])  # fmt: skip
        self.rollout_steps += len(seq)
        return float(returns[0])

    # --- after a search ---------------------------------------------------------------------
    def action_of(self, embedding_id: str, index: int) -> np.ndarray:
        """The continuous action behind discrete action ``index`` at a node."""
        return self._actions[embedding_id][int(index)].copy()

    def record(self, tree: Tree) -> None:
        """Write visits and values of a finished search into the trajectory tree, and mark
        the chosen path (root -> most visited child, repeatedly) as ``chosen``."""
        visits, values = tree.node_visits, tree.node_values
        for b in range(visits.shape[0]):
            for n in range(visits.shape[1]):
                cid = tree.embeddings[b][n]  # [B, N] object array; None where unused
                if cid is None or cid not in self.tree:
                    continue
                self.tree.update_node(cid, visits=int(visits[b, n]), value=float(values[b, n]))
            node = 0
            while True:
                cid = tree.embeddings[b][node]
                if cid in self.tree:
                    self.tree.update_node(cid, chosen=True)
                action = tree.most_visited_child(b, node)
                if action is None:
                    break
                node = int(tree.children_index[b, node, action])

    def release(self) -> None:
        """Drop this search's own references (tree nodes keep theirs)."""
        for cid in self._owned:
            if cid in self.store:
                self.store.release(cid)
        self._owned.clear()

    # --- internals ----------------------------------------------------------------------------
    def _put(self, state: ModelState, parent: str | None, depth: int,
             into: np.ndarray | None, **meta: Any) -> str:
        model = self.model
        model.load_state(state)  # to read the node's frame index and observation
        snap = WorldStateSnapshot(
            tensors=state.tensors, meta=state.meta, backend=model.name,
            backend_config=model.config(), frame_index=model.frame_count - 1,
            prompt=model.prompt, seed=model.seed, session_id=self.session_id, parent_id=parent,
        )  # fmt: skip
        cid = self.store.put(snap)
        self._owned.append(cid)
        self._depth[cid] = depth
        obs = model.observe()
        kw = {"depth": depth, "action": into}
        cands = self.candidates(obs, **{k: kw[k] for k in self._cand_kw})
        actions, logits = cands if isinstance(cands, tuple) else (cands, None)
        self._actions[cid] = np.asarray(actions, dtype=np.float32)
        self._logits[cid] = (np.zeros(len(actions), dtype=np.float32) if logits is None
                             else np.asarray(logits, dtype=np.float32))  # fmt: skip
        if self._logits[cid].shape != (len(actions),):
            raise ValueError(f"candidates gave {len(actions)} actions but prior logits of "
                             f"shape {self._logits[cid].shape}")
        self.tree.add_node(cid, self.session_id, snap.frame_index,
                           parent_id=parent if parent in self.tree else None, **meta)
        return cid



def _keywords(fn: Callable[..., Any], names: Sequence[str]) -> tuple[str, ...]:
    """Which of ``names`` ``fn`` accepts as keywords."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ()
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return tuple(names)
    return tuple(n for n in names if n in params)
