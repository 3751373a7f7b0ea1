"""The MPC agent with its search spread over Ray actors (:class:`planners.parallel.WorkerPool`).

CEM / MPPI: the same planner, the same RNG stream, the evaluations split over the actors,
so the actions equal :class:`agents.mpc.MPCAgent`'s for the same seed (bit for bit for the
backends tested; see the README). MCTS / Gumbel: root parallelisation, ``searches``
independent searches of ``num_simulations`` each from the same root, merged by visit
counts: a different algorithm from one search of ``searches x num_simulations``, so
its actions are equal only to the same root-parallel search run in one process
(``WorkerPool(actors=0)``). Each search runs with the agent's settings (progressive
widening, rollout leaf values, the horizon, ``select=best`` over the searches' best
sequences, the warm-start plan carried to the next action); the model's own action
proposals are refused (they would be drawn from the driver's model). Their search trees
stay in the actors (not recorded).
"""

from __future__ import annotations

import time

import numpy as np

from agents.mpc import SEQUENCE_PLANNERS, MPCAgent, MPCConfig
from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.models.base import WorldModel
from planners.parallel import SearchSettings, WorkerPool


class ParallelMPCAgent(MPCAgent):
    """:class:`MPCAgent` planning on ``pool`` (``searches``: MCTS root searches per action,
    default one per worker)."""

    def __init__(self, model: WorldModel, cfg: MPCConfig, rng: np.random.Generator, *,
                 pool: WorkerPool, searches: int | None = None,
                 tree: TrajectoryTree | None = None):
        super().__init__(model, cfg, rng, tree=tree)
        if cfg.planner in ("mcts", "gumbel") and cfg.proposals > 0:
            raise ValueError(
                "planner.proposals > 0 (the model's action proposals as MCTS candidates) is "
                "not supported over Ray: the proposals are drawn from the driver's model, "
                "not from the node's state in the actor; use proposals=0 or parallel.actors=0"
            )
        self.pool = pool
        self.searches = searches or None

    def act(self) -> np.ndarray:
        planner = self.cfg.planner
        if planner == "random":
            return super().act()
        root = self.model.extract_state()
        t0 = time.perf_counter()
        self.pool.set_root(self.model)
        if planner in SEQUENCE_PLANNERS:
            root_obs = self.model.observe()
            action = self._plan_sequence(root_obs, self.pool.sequence_evaluator(
                objective=self.objective, discount=self.cfg.discount,
                action_map=self.action_map, root_observation=root_obs,
                render=getattr(self.objective, "reads_frames", False),
                hypotheses=self.hypotheses, risk=self.cfg.risk))
        else:
            res = self.pool.root_parallel_search(
                self.candidates, searches=self.searches, seed=int(self.rng.integers(2**31 - 1)),
                num_simulations=self.cfg.num_simulations, max_depth=self.cfg.max_depth,
                discount=self.cfg.discount, objective=self.objective,
                policy="mcts" if planner == "mcts" else "gumbel",
                settings=SearchSettings(
                    widening=self.widening, leaf_rollout=self.cfg.leaf_value == "rollout",
                    horizon=self.search_horizon, render=self.search_renders))  # fmt: skip
            action, self.plan = res.action.astype(np.float32), res.plan
            seen = res.visits > 0
            self.stats = {
                "root_visits": int(res.visits.sum()),
                "q_spread": float(res.q[seen].max() - res.q[seen].min()) if seen.any() else 0.0,
                "depth": max(s["depth"] for s in res.searches),
                "model_steps": sum(s["model_steps"] for s in res.searches),
                "root_value": float(np.mean([s["root_value"] for s in res.searches])),
                "searches": len(res.searches),
            }
            if self.cfg.select == "best" and len(res.best):
                action, self.plan = res.best[0].copy(), res.best
                self.stats["best_return"] = res.best_return
            if self.proposal is not None:
                self.proposal.update(self.plan)
        self.model.load_state(root)
        self.stats["planning_seconds"] = time.perf_counter() - t0
        self.stats["remote_retries"] = self.pool.stats.retries
        return action
