"""Model-predictive control: plan inside a model, act in the real Push-T, re-sync, repeat.

The model is any registered backend. After each real step the model is brought back in
step with the real world: a learned model steps with the executed action and then takes
the real frame and pusher position into its caches (``resync``); the simulator, being
exact, simply loads the real state. Planning is CEM / MPPI (via
:func:`planners.world.sequence_evaluator`) or MCTS (via :class:`planners.world.WorldSearch`)
over relative moves of the pusher, or -- ``candidates="plan"`` -- over perturbations of a
receding-horizon plan, with progressive widening and rollout leaf values
(``configs/planner/mcts_pw.yaml``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agents.objectives import OBJECTIVES, GoalPoseObjective
from arcfab_gym.fabric.store import StateManager
from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.models.base import WorldModel
from arcfab_gym.tasks import pusht
from planners.cem import CEMConfig, CEMPlanner
from planners.icem import ICEMConfig, ICEMPlanner, MPPIConfig, MPPIPlanner
from planners.mcts import gumbel_muzero_policy, muzero_policy
from planners.proposals import PlanProposal
from planners.widening import Widening
from planners.world import (
    GoalObjective,
    Pessimistic,
    WorldSearch,
    check_risk,
    reward_objective,
    sequence_evaluator,
)


def relative_action_map(scale_px: float):
    """``map(observations, u [N, 2]) -> actions``: the pusher's target ``u * scale_px``
    from where each fork's pusher is."""

    def action_map(observations, u: np.ndarray) -> np.ndarray:
        pos = np.stack([np.asarray(o["agent_pos"], dtype=np.float64) for o in observations])
        target = np.clip(pos + np.asarray(u, dtype=np.float64) * scale_px, 0.0, pusht.WORLD_SIZE)
        return pusht.target_to_action(target)

    return action_map


def relative_moves(step_px: float = 40.0, n_directions: int = 8, rings: int = 2):
    """Candidate actions around the pusher: stay, then ``n_directions`` headings at
    ``rings`` distances (``step_px``, ``2 * step_px``, ...). Returns
    ``candidates(observation) -> [1 + n_directions * rings, 2]`` in action units."""
    angles = np.arange(n_directions) * (2 * np.pi / n_directions)
    unit = np.stack([np.cos(angles), -np.sin(angles)], axis=1)
    offsets = np.concatenate(
        [np.zeros((1, 2))] + [unit * step_px * (k + 1) for k in range(rings)], axis=0
    )

    def candidates(obs: dict[str, np.ndarray]) -> np.ndarray:
        target = np.clip(obs["agent_pos"].astype(np.float64) + offsets, 0.0, pusht.WORLD_SIZE)
        return pusht.target_to_action(target)

    return candidates


#: Planners over action sequences (a sampling distribution refit to elites).
SEQUENCE_PLANNERS = ("cem", "icem", "mppi")
PLANNERS = ("mcts", "gumbel", *SEQUENCE_PLANNERS, "random")


def proposal_moves(model: WorldModel, num_proposals: int, rng: np.random.Generator,
                   *, step_px: float = 40.0, prior_mass: float = 0.5):
    """MCTS's candidate actions at a node: ``num_proposals`` actions drawn from the
    model's own action-proposal head there (DreamZero predicts actions as well as video;
    mini-dreamzero's head is a Gaussian mixture), which share ``prior_mass`` of the
    prior, plus the relative moves of :func:`relative_moves`, which share the rest.

    For a backend without proposals (``propose_actions``; pusht-sim) the candidates are
    the relative moves alone, under a uniform prior -- the documented fallback.
    """
    moves = relative_moves(step_px)
    propose = getattr(model, "propose_actions", None)
    if propose is None or num_proposals < 1:
        return moves
    if not 0.0 < prior_mass < 1.0:
        raise ValueError(f"prior_mass must be in (0, 1), got {prior_mass}")

    def candidates(obs: dict[str, np.ndarray]):
        fixed = moves(obs)
        proposed = propose(num_proposals, rng)  # the node's state is loaded in the model
        logits = np.concatenate([np.full(num_proposals, np.log(prior_mass / num_proposals)),
                                 np.full(len(fixed), np.log((1 - prior_mass) / len(fixed)))])
        return np.concatenate([proposed, fixed]).astype(np.float32), logits.astype(np.float32)

    return candidates


@dataclass
class MPCConfig:
    """Arguments of the MPC agent."""

    planner: str = "mcts"
    """mcts, gumbel, cem, mppi, or random."""
    num_simulations: int = 32
    """MCTS simulations per action."""
    max_depth: int = 4
    """MCTS depth limit (model steps ahead)."""
    discount: float = 0.9
    """Discount of the planning objective."""
    step_px: float = 40.0
    """Size of the MCTS relative moves (px)."""
    cem: CEMConfig = field(default_factory=lambda: CEMConfig(horizon=5, num_samples=32,
                                                             num_elites=6, iterations=3))
    """CEM settings."""
    icem: ICEMConfig = field(default_factory=ICEMConfig)
    """iCEM settings."""
    mppi: MPPIConfig = field(default_factory=MPPIConfig)
    """MPPI settings (TD-MPC2's)."""
    objective: str = "reward"
    """reward (the model's reward head), shaped (reward + distances read from the
    observation), or goal (distance to a goal state's embedding, via set_goal)."""
    pessimism: float = 0.0
    """Objective charged per px of the backend's disagreement about a step
    (``info["disagreement"]``: a state-dynamics ensemble's spread; planners.world.Pessimistic).
    0 = trust the model's mean."""
    hypotheses: int = 1
    """CEM / iCEM / MPPI: score each sequence under this many of the model's hypotheses
    about its dynamics (its ensemble members, each rolling out its own future: PETS'
    trajectory sampling) by their mean return less ``risk`` times its spread; 1 = the
    model's readout alone, 0 = every hypothesis the model holds (1 for a simulator).
    Costs that many times the rollouts."""
    risk: float = 0.0
    """With ``hypotheses > 1``: the charge per standard deviation of the members' returns."""
    record_tree: bool = True
    """Record every expanded node in the trajectory tree."""
    actions: str = "absolute"
    """What CEM / MPPI search over: absolute pusher targets (the action space), or
    relative moves (``u * relative_px`` from where the pusher is at each step)."""
    relative_px: float = 64.0
    """Largest relative move per step (px)."""
    proposals: int = 0
    """MCTS: candidate actions per node drawn from the model's action proposals (beside
    the relative moves, or beside the plan and its perturbations; 0 = none)."""
    candidates: str = "moves"
    """MCTS candidates: moves (the relative moves, plus proposals) or plan (the
    receding-horizon warm-start plan -- the previous search's best sequence, shifted --
    continued at each node, the model's proposals where the backend has them, and
    coloured-noise perturbations of the node's sequence; planners/proposals.py)."""
    num_candidates: int = 16
    """MCTS with candidates=plan: candidate slots per node."""
    perturb_std: float = 0.3
    """MCTS with candidates=plan: std of the perturbations (half-widths of the box)."""
    perturb_beta: float = 2.0
    """MCTS with candidates=plan: colour of the perturbations along time (0 white, 2 red)."""
    perturb_decay: float = 1.0
    """MCTS with candidates=plan: the perturbation std at depth d is std * decay**d."""
    plan_horizon: int = 6
    """MCTS: the warm-start plan's length, and the horizon of rollouts and of held /
    absorbing values with discount 1."""
    plan_mass: float = 0.3
    """MCTS with candidates=plan: prior mass of the plan's step."""
    widening_c: float = 0.0
    """MCTS progressive widening: ceil(c * N**alpha) selectable children at a node of N
    visits (0 = off: every candidate selectable, the mctx search)."""
    widening_alpha: float = 0.5
    """MCTS progressive widening exponent."""
    select: str = "visits"
    """MCTS: the action executed: visits (the most visited root child, mctx's greedy
    act) or best (the first step of the best sequence seen in the search -- path to a
    leaf, then its rollout -- as iCEM executes its best sample; for deterministic
    models such as the simulator)."""
    leaf_value: str = "hold"
    """MCTS leaf value: hold (the leaf's objective held to the horizon, r / (1 - discount))
    or rollout (the warm-start plan's remaining steps from the leaf, candidates=plan only;
    its model steps count in model_steps)."""


class MPCAgent:
    """Plans with ``model`` and returns actions for the real environment."""

    def __init__(self, model: WorldModel, cfg: MPCConfig, rng: np.random.Generator,
                 *, tree: TrajectoryTree | None = None):
        if cfg.planner not in PLANNERS:
            raise ValueError(f"unknown planner {cfg.planner!r}: {', '.join(PLANNERS)}")
        self.model, self.cfg, self.rng = model, cfg, rng
        # One store for every search of the agent: a tree shared between searches must not
        # see two stores' checkpoint ids (each store counts from 1).
        self.tree = tree if tree is not None else TrajectoryTree(store=StateManager(model))
        self.candidates = proposal_moves(model, cfg.proposals, rng, step_px=cfg.step_px)
        self.proposal: PlanProposal | None = None
        if cfg.candidates == "plan":
            propose = getattr(model, "propose_actions", None)
            proposer = (None if propose is None or cfg.proposals < 1
                        else (lambda n: propose(n, rng)))  # fmt: skip
            # Without a proposal head (pusht-sim) the candidates are the plan's step and
            # its perturbations alone: the documented fallback.
            self.proposal = PlanProposal(
                [-1.0, -1.0], [1.0, 1.0], horizon=cfg.plan_horizon,
                num_candidates=cfg.num_candidates, std=cfg.perturb_std, rng=rng,
                proposer=proposer, num_proposed=cfg.proposals if proposer else 0,
                plan_mass=cfg.plan_mass, noise_beta=cfg.perturb_beta,
                std_decay=cfg.perturb_decay)  # fmt: skip
            self.candidates = self.proposal
        elif cfg.candidates != "moves":
            raise ValueError(f"unknown candidates {cfg.candidates!r}: moves or plan")
        if cfg.select not in ("visits", "best"):
            raise ValueError(f"unknown select {cfg.select!r}: visits or best")
        if cfg.leaf_value not in ("hold", "rollout"):
            raise ValueError(f"unknown leaf_value {cfg.leaf_value!r}: hold or rollout")
        if cfg.leaf_value == "rollout" and self.proposal is None:
            raise ValueError("leaf_value=rollout rolls out the warm-start plan: candidates=plan")
        self.widening = (Widening(cfg.widening_c, cfg.widening_alpha)
                         if cfg.widening_c > 0 else None)  # fmt: skip
        if self.widening is not None and cfg.planner != "mcts":
            raise ValueError("progressive widening (widening_c > 0) is for planner=mcts")
        box = ([-1.0, -1.0], [1.0, 1.0])
        if cfg.planner == "cem":
            self.cem = CEMPlanner(*box, cfg.cem)
        elif cfg.planner == "icem":
            self.cem = ICEMPlanner(*box, cfg.icem)
        elif cfg.planner == "mppi":
            self.cem = MPPIPlanner(*box, cfg.mppi)
        if cfg.objective == "reward":
            self.objective = reward_objective
        elif cfg.objective in OBJECTIVES:
            self.objective = OBJECTIVES[cfg.objective]
        elif cfg.objective != "goal":  # "goal" is set by set_goal()
            raise ValueError(f"unknown objective {cfg.objective!r}: reward, "
                             f"{', '.join(OBJECTIVES)} or goal")
        if not np.isfinite(cfg.pessimism) or cfg.pessimism < 0:
            raise ValueError(f"pessimism must be finite and >= 0, got {cfg.pessimism}")
        if int(cfg.hypotheses) != cfg.hypotheses or not 0 <= cfg.hypotheses <= model.hypotheses:
            raise ValueError(f"hypotheses must be a whole number in 0..{model.hypotheses} "
                             f"({model.name} holds {model.hypotheses}; 0 = all), got {cfg.hypotheses}")
        #: The hypotheses each sequence is scored under (``cfg.hypotheses``, 0 resolved).
        self.hypotheses = int(cfg.hypotheses) or model.hypotheses
        if self.hypotheses > 1 and cfg.planner not in SEQUENCE_PLANNERS:
            raise ValueError(f"hypotheses={cfg.hypotheses} is for the sequence planners "
                             f"({', '.join(SEQUENCE_PLANNERS)}), not {cfg.planner}")
        check_risk(cfg.risk)  # at start-up, not at the first planning call
        if cfg.actions not in ("absolute", "relative"):
            raise ValueError(f"unknown actions {cfg.actions!r}: absolute or relative")
        self.action_map = relative_action_map(cfg.relative_px) if cfg.actions == "relative" else None
        self.stats: dict[str, Any] = {}
        #: The action sequence behind the last action (its first row): CEM's sequence, or
        #: MCTS's principal variation (most visited children from the chosen action on).
        self.plan = np.zeros((0, 2), dtype=np.float32)

    @property
    def objective(self):
        """What the planner maximises per step: the configured objective, less the
        pessimism charge when ``cfg.pessimism > 0``."""
        return self._objective

    @objective.setter
    def objective(self, objective) -> None:
        self._objective = Pessimistic(objective, self.cfg.pessimism) if self.cfg.pessimism > 0 else objective

    def set_goal(self, goal_state) -> None:
        """Plan towards ``goal_state`` (a ModelState of this model) in the model's own
        embedding space (DINO-WM's cost) instead of the reward."""
        self.objective = GoalObjective.from_state(self.model, goal_state)

    def set_goal_pose(self, agent_pos: np.ndarray, block_pose: np.ndarray) -> None:
        """Plan towards a goal pusher position and T pose (read from the predicted state)."""
        self.objective = GoalPoseObjective(agent_pos, block_pose)

    def reset(self) -> None:
        if hasattr(self, "cem"):
            self.cem.reset()
        if self.proposal is not None:
            self.proposal.reset()

    # --- acting ----------------------------------------------------------------------------
    def act(self) -> np.ndarray:
        """An action planned from the model's current state (which it leaves unchanged)."""
        root = self.model.extract_state()
        t0 = time.perf_counter()
        planner = self.cfg.planner
        if planner == "random":
            action = self.rng.uniform(-1, 1, 2).astype(np.float32)
            self.stats = {}
            self.plan = action[None]
        elif planner in SEQUENCE_PLANNERS:
            root_obs = self.model.observe()
            action = self._plan_sequence(root_obs, sequence_evaluator(
                self.model, root, objective=self.objective, discount=self.cfg.discount,
                action_map=self.action_map, root_observation=root_obs,
                render=getattr(self.objective, "reads_frames", False),
                hypotheses=self.hypotheses, risk=self.cfg.risk))
        else:
            action = self._search(root)
        self.model.load_state(root)
        self.stats["planning_seconds"] = time.perf_counter() - t0
        return action

    def _plan_sequence(self, root_obs, evaluate) -> np.ndarray:
        """Run the sequence planner on ``evaluate``; the action to execute."""
        res = self.cem.plan(evaluate, self.rng)
        action, self.plan = res.action, res.sequence
        if self.action_map is not None:  # the executed move; the plan stays relative
            action = self.action_map([root_obs], action[None])[0]
        self.stats = {"best_return": res.best_return, "evaluations": res.evaluations,
                      "model_steps": res.evaluations * self.cem.cfg.horizon}
        return action

    @property
    def search_horizon(self) -> int:
        """MCTS: steps from the root to the end of the planning horizon."""
        return max(self.cfg.plan_horizon, self.cfg.max_depth)

    @property
    def search_renders(self) -> bool:
        """MCTS: whether nodes need their frames (only proposals or an embedding goal
        read them)."""
        return self.cfg.proposals > 0 or getattr(self.objective, "reads_frames", False)

    def _search(self, root) -> np.ndarray:
        rollout = self.proposal.rollout if self.cfg.leaf_value == "rollout" else None
        search = WorldSearch(self.model, self.candidates, objective=self.objective,
                             discount=self.cfg.discount, tree=self.tree,
                             store=getattr(self.tree, "store", None), rollout=rollout,
                             horizon=self.search_horizon, render=self.search_renders)
        root_out = search.root([root])
        policy = muzero_policy if self.cfg.planner == "mcts" else gumbel_muzero_policy
        kwargs = ({"dirichlet_fraction": 0.0, "temperature": 0.0, "widening": self.widening}
                  if policy is muzero_policy else {})  # fmt: skip
        out = policy(None, self.rng, root_out, search.recurrent_fn, self.cfg.num_simulations,
                     max_depth=self.cfg.max_depth, **kwargs)
        root_id = root_out.embedding[0]
        index = int(out.action[0])
        if self.cfg.record_tree:
            search.record(out.search_tree)
        q = out.search_tree.summary().qvalues[0]
        visits = out.search_tree.children_visits[0, 0]
        depth = _max_depth(out.search_tree)
        self.stats = {"root_visits": int(out.search_tree.node_visits[0, 0]),
                      "q_spread": float(q[visits > 0].max() - q[visits > 0].min()) if (visits > 0).any() else 0.0,
                      "depth": depth, "model_steps": search.model_steps,
                      "rollout_steps": search.rollout_steps,
                      "root_value": float(out.search_tree.node_values[0, 0])}  # fmt: skip
        action = search.action_of(root_id, index)
        self.plan = np.stack([action] + _principal_variation(out.search_tree, search, index))
        if self.cfg.select == "best":
            best, best_return = search.best_sequence(root_id)
            if len(best):
                action, self.plan = best[0].copy(), best
                self.stats["best_return"] = best_return
        if self.proposal is not None:
            self.proposal.update(self.plan)
        search.release()
        return action


def _principal_variation(tree, search: WorldSearch, first: int) -> list[np.ndarray]:
    """Actions below the root's child ``first``, following the most visited child."""
    actions = []
    node = int(tree.children_index[0, 0, first])
    while node >= 0:
        index = tree.most_visited_child(0, node)
        if index is None:
            break
        actions.append(search.action_of(tree.embeddings[0][node], index))
        node = int(tree.children_index[0, node, index])
    return actions


def _max_depth(tree) -> int:
    parents = tree.parents[0]
    depth = np.zeros(len(parents), dtype=int)
    for n in range(1, len(parents)):
        if parents[n] >= 0:
            depth[n] = depth[parents[n]] + 1
    return int(depth.max())
