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


def absorbing_weight(discount: float, step: int, horizon: int) -> float:
    """Weight of an absorbing (terminal) state's value reached at ``step``: counted at
    that step and every step after, ``discount**step / (1 - discount)``; with
    ``discount = 1`` to the end of the horizon."""
    if discount < 1.0:
        return discount**step / (1.0 - discount)
    return float(horizon - step)


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
) -> Callable[[np.ndarray], np.ndarray]:
    """``evaluate(actions [N, H, A]) -> returns [N]`` by forking ``root`` N times.

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

    def evaluate(seqs: np.ndarray) -> np.ndarray:
        seqs = np.asarray(seqs, dtype=np.float32)
        n, horizon = seqs.shape[:2]
        states = [root] * n
        returns = np.zeros(n)
        alive = np.ones(n, dtype=bool)
        outs: list[StepOutput] = []
        obs = [root_observation] * n
        for h in range(horizon):
            actions = seqs[:, h] if action_map is None else action_map(obs, seqs[:, h])
            states, outs = model.step_batch(states, actions, render=render)
            obs = [o.observation for o in outs]
            values = np.array([objective(model, o, s) for o, s in zip(outs, states)])
            ended = alive & np.array([o.terminated for o in outs])
            returns += (alive & ~ended) * discount**h * values
            returns += ended * values * absorbing_weight(discount, h, horizon)
            alive &= ~ended
        if on_rollout is not None:
            on_rollout(seqs, outs)
        return returns

    return evaluate


class WorldSearch:
    """MCTS's ``root`` / ``recurrent_fn`` over a backend, recorded in a trajectory tree.

    Args:
        model: any backend (it is used as a stepping engine: its own state is clobbered).
        candidates: ``candidates(observation) -> [A, action_dim]``, the discrete action
            set at a node (e.g. moves relative to the agent, or the model's proposals), or
            ``-> (actions [A, action_dim], prior_logits [A])`` to give MCTS a prior over
            them. It is called with the node's state loaded in ``model``, so it may ask
            the model for its own action proposals there.
        store, tree: where expanded nodes go (new ones by default).
        objective: reward of a transition (default: the backend's reward).
        value_fn: value estimate of a new leaf, ``value_fn(model, out, state)``; default
            ``objective / (1 - discount)`` -- as if the reward held forever, a cheap
            optimistic estimate for dense rewards.
        discount: MCTS discount.
        session_id: the tree's session label for search nodes.
    """

    def __init__(
        self,
        model: WorldModel,
        candidates: Callable[[dict[str, np.ndarray]], np.ndarray],
        *,
        store: StateManager | None = None,
        tree: TrajectoryTree | None = None,
        objective: Objective = reward_objective,
        value_fn: Objective | None = None,
        discount: float = 0.95,
        session_id: str = "search",
    ):
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {discount}")
        self.model = model
        self.candidates = candidates
        self.store = store if store is not None else StateManager(model)
        self.tree = tree if tree is not None else TrajectoryTree(store=self.store)
        self.objective = objective
        self.value_fn = value_fn
        self.discount = float(discount)
        self.session_id = session_id
        self._actions: dict[str, np.ndarray] = {}  # checkpoint id -> [A, action_dim]
        self._logits: dict[str, np.ndarray] = {}  # checkpoint id -> [A] prior logits
        self._owned: list[str] = []
        self.expansions = 0

    # --- mctx plumbing --------------------------------------------------------------------
    def root(
        self, states: Sequence[ModelState], *, parent_ids: Sequence[str | None] | None = None
    ) -> RootFnOutput:
        """The roots of a batch of searches (one per state); priors from ``candidates``
        (uniform by default); value 0 (no value of the current frame is available)."""
        ids = []
        for b, state in enumerate(states):
            parent = None if parent_ids is None else parent_ids[b]
            ids.append(self._put(state, parent, kind="search-root", action=None, reward=None))
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
        next_states, outs = self.model.step_batch(states, continuous)
        self.expansions += len(ids)
        rewards, values, discounts, new_ids = [], [], [], []
        for cid, act, state, out in zip(ids, continuous, next_states, outs):
            r = self.objective(self.model, out, state)
            v = (self.value_fn(self.model, out, state) if self.value_fn is not None
                 else r / max(1e-6, 1.0 - self.discount))  # fmt: skip
            new_ids.append(self._put(state, cid, kind="search", action=act.tolist(), reward=r))
            # A terminal state is absorbing: its reward holds forever (see
            # absorbing_weight), so that reaching the goal beats hovering next to it.
            rewards.append(r / max(1e-6, 1.0 - self.discount) if out.terminated else r)
            values.append(0.0 if out.terminated else v)
            discounts.append(0.0 if out.terminated else self.discount)
        return (
            RecurrentFnOutput(
                reward=np.asarray(rewards, dtype=np.float32),
                discount=np.asarray(discounts, dtype=np.float32),
                prior_logits=np.stack([self._logits[cid] for cid in new_ids]),
                value=np.asarray(values, dtype=np.float32),
            ),
            np.array(new_ids, dtype=object),
        )

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
    def _put(self, state: ModelState, parent: str | None, **meta: Any) -> str:
        model = self.model
        model.load_state(state)  # to read the node's frame index and observation
        snap = WorldStateSnapshot(
            tensors=state.tensors, meta=state.meta, backend=model.name,
            backend_config=model.config(), frame_index=model.frame_count - 1,
            prompt=model.prompt, seed=model.seed, session_id=self.session_id, parent_id=parent,
        )  # fmt: skip
        cid = self.store.put(snap)
        self._owned.append(cid)
        cands = self.candidates(model.observe())
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

