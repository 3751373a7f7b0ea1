"""Root-parallel search: CEM/MPPI's batch of forks, or independent MCTS root searches,
spread over N world-model workers (Ray actors), with the same results as one process.

* :class:`WorkerPool` holds ``actors`` copies of one backend, each in its own Ray actor
  (:class:`arcfab_gym.models.remote.RemoteWorldModel`), or, with ``actors=0``, one copy
  in this process running the very same code (the reference the parallel run equals).
* :meth:`WorkerPool.sequence_evaluator` is CEM/MPPI's ``evaluate``: the root travels to
  each actor once per planning call, as the snapshot format's bytes; then each
  iteration sends only the root's id and a contiguous chunk of the ``[N, H, A]``
  sequences, and gets the chunk's returns back (:func:`planners.world.sequence_evaluator`
  inside the actor).
* :meth:`WorkerPool.root_parallel_search` runs ``searches`` independent MCTS searches from
  one root (search ``k`` seeded from ``SeedSequence(seed).spawn``), each whole inside an
  actor (:class:`planners.world.WorldSearch` next to the model), and merges them by
  visit counts (root parallelisation): summed visits, visit-weighted Q, and the action
  with the most visits.

A worker that dies mid-search is replaced and its chunk or search run again from the
root bytes (each is a pure function of root, inputs and seed, so a retry gives the same
answer), ``max_retries`` times; after that :class:`~arcfab_gym.models.remote.RemoteWorldError`.
Nothing here knows which task the backend simulates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.models import create_world_model
from arcfab_gym.models.base import ModelState, WorldModel
from arcfab_gym.models.remote import RemoteWorldError, WorldHost
from planners.widening import Widening
from planners.world import Objective, WorldSearch, reward_objective, sequence_evaluator


@dataclass(frozen=True)
class SearchSettings:
    """How each root search runs, as :class:`agents.mpc.MPCAgent` runs its one search."""

    widening: Widening | None = None
    """Progressive widening (``policy='mcts'`` only)."""
    leaf_rollout: bool = False
    """Leaf values by the candidates' ``rollout`` (a :class:`planners.proposals.PlanProposal`)."""
    horizon: int | None = None
    """Steps to the end of the planning horizon (needed with discount 1)."""
    render: bool = True
    """False when neither the candidates nor the objective read a node's frame."""


# --- what runs next to the model (inside an actor, or in this process) ----------------------
def _import_root(model: WorldModel, host: WorldHost, data: bytes) -> int:
    snap = WorldStateSnapshot.from_bytes(data, source="the search root")
    return host.keep(snap.model_state)


def _release(model: WorldModel, host: WorldHost, sids: Sequence[int]) -> None:
    host.release(sids)


def _evaluate_chunk(model: WorldModel, host: WorldHost, root_sid: int, seqs: np.ndarray,
                    objective: Objective, discount: float, action_map=None,
                    root_observation=None, render: bool = True, hypotheses: int = 1,
                    risk: float = 0.0) -> np.ndarray:
    evaluate = sequence_evaluator(model, host.state(root_sid), objective=objective,
                                  discount=discount, action_map=action_map,
                                  root_observation=root_observation, render=render,
                                  hypotheses=hypotheses, risk=risk)  # fmt: skip
    return evaluate(seqs)


def _search(model: WorldModel, host: WorldHost, root_sid: int, seed: np.random.SeedSequence,
            candidates: Callable, num_simulations: int, max_depth: int | None,
            discount: float, objective: Objective, policy: str, settings: SearchSettings,
            ) -> dict[str, Any]:  # fmt: skip
    """One whole MCTS search from the root; the root's statistics, principal variation and
    best sequence seen."""
    from planners.mcts import gumbel_muzero_policy, muzero_policy

    # Each search gets the candidates as they were sent: a Ray actor unpickles its own
    # copy, and this copy does the same for the in-process worker, so stateful candidates
    # (a warm-start plan drawing perturbations) give every search the same start.
    candidates = copy.deepcopy(candidates)
    rollout = candidates.rollout if settings.leaf_rollout else None
    search = WorldSearch(model, candidates, objective=objective, discount=discount,
                         rollout=rollout, horizon=settings.horizon, render=settings.render)
    root_out = search.root([host.state(root_sid)])
    root_id = root_out.embedding[0]
    rng = np.random.default_rng(seed)
    if policy == "mcts":
        out = muzero_policy(None, rng, root_out, search.recurrent_fn, num_simulations,
                            max_depth=max_depth, dirichlet_fraction=0.0, temperature=0.0,
                            widening=settings.widening)  # fmt: skip
    elif policy == "gumbel":
        if settings.widening is not None:
            raise ValueError("progressive widening is for policy='mcts'")
        out = gumbel_muzero_policy(None, rng, root_out, search.recurrent_fn, num_simulations,
                                   max_depth=max_depth)
    else:
        raise ValueError(f"unknown search policy {policy!r}: mcts or gumbel")
    best, best_return = search.best_sequence(root_id)
    tree = out.search_tree
    n_actions = tree.children_visits.shape[-1]
    actions = np.stack([search.action_of(root_id, a) for a in range(n_actions)])
    visits = np.asarray(tree.children_visits[0, 0], dtype=np.int64)
    q = np.asarray(tree.summary().qvalues[0], dtype=np.float64)
    pv: dict[int, list[np.ndarray]] = {}
    for first in range(n_actions):  # the most visited line below each root action
        line, node = [], int(tree.children_index[0, 0, first])
        while node >= 0:
            index = tree.most_visited_child(0, node)
            if index is None:
                break
            line.append(search.action_of(tree.embeddings[0][node], index))
            node = int(tree.children_index[0, node, index])
        pv[first] = line
    parents = tree.parents[0]
    depth = np.zeros(len(parents), dtype=int)
    for n in range(1, len(parents)):
        if parents[n] >= 0:
            depth[n] = depth[parents[n]] + 1
    result = {"actions": actions, "visits": visits, "q": q, "chosen": int(out.action[0]),
              "pv": pv, "expansions": search.expansions, "model_steps": search.model_steps,
              "depth": int(depth.max()),
              "root_value": float(tree.node_values[0, 0]), "best": best,
              "best_return": float(best_return)}  # fmt: skip
    search.release()
    return result


# --- the pool ---------------------------------------------------------------------------------
class _LocalWorker:
    """The in-process worker: a :class:`WorldHost` in this process (same code path)."""

    def __init__(self, backend: str, kwargs: dict[str, Any]):
        self.host = WorldHost(torch_threads=None)
        self.handle, _ = self.host._add(create_world_model(backend, **kwargs))

    def submit(self, fn, *args):
        return self.host.run(self.handle, fn, *args)  # eager: the result is the "ref"

    def get(self, refs):
        return refs

    def close(self) -> None:
        self.host.close_model(self.handle)


class _RayWorker:
    def __init__(self, backend: str, kwargs: dict[str, Any], num_cpus: float,
                 torch_threads: int | None, timeout_s: float | None):
        from arcfab_gym.models.remote import RemoteWorldModel, WorldHostClient

        self.client = WorldHostClient(num_cpus=num_cpus, torch_threads=torch_threads,
                                      timeout_s=timeout_s)  # fmt: skip
        self.model = RemoteWorldModel(backend, client=self.client, **kwargs)

    def submit(self, fn, *args):
        return self.model.submit_run(fn, *args)

    def get(self, refs):
        return self.client.get(refs)

    def close(self) -> None:
        if self.client.dead is None:
            self.client.kill()


@dataclass
class PoolStats:
    remote_calls: int = 0
    retries: int = 0
    root_bytes: list[int] = field(default_factory=list)


class WorkerPool:
    """``actors`` workers of ``backend`` (one Ray actor each; ``actors=0``: one in-process
    worker running the same code, the one-process reference).

    Args:
        backend, backend_kwargs: the registered backend and its constructor arguments.
        actors: number of Ray actors (0: no Ray at all).
        num_cpus: CPUs each actor reserves; torch_threads: torch threads inside each.
        max_retries: how often a dead worker's chunk or search is run again on a new
            worker before the error is raised.
        timeout_s: the longest one remote call may take.
    """

    def __init__(self, backend: str, backend_kwargs: dict[str, Any] | None = None, *,
                 actors: int = 2, num_cpus: float = 1, torch_threads: int | None = 1,
                 max_retries: int = 1, timeout_s: float | None = 600.0):
        if actors < 0:
            raise ValueError(f"actors must be >= 0, got {actors}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.backend, self.kwargs = backend, dict(backend_kwargs or {})
        self.actors, self.num_cpus, self.torch_threads = actors, num_cpus, torch_threads
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self.workers = [self._new_worker() for _ in range(max(1, actors))]
        self.stats = PoolStats()
        self._root: bytes | None = None
        self._root_sids: list[int | None] = [None] * len(self.workers)

    @property
    def remote(self) -> bool:
        return self.actors > 0

    def _new_worker(self):
        if self.actors == 0:
            return _LocalWorker(self.backend, self.kwargs)
        return _RayWorker(self.backend, self.kwargs, self.num_cpus, self.torch_threads,
                          self.timeout_s)  # fmt: skip

    # --- the root -------------------------------------------------------------------------
    def set_root(self, model: WorldModel, state: ModelState | None = None) -> None:
        """Make ``state`` of ``model`` (default: its current state) the search root on every
        worker: its snapshot bytes go to each worker once."""
        if state is not None:
            model.load_state(state)
        snap = WorldStateSnapshot.from_model(model)
        if snap.backend != self.backend:
            raise ValueError(
                f"the root is a {snap.backend!r} state; this pool runs {self.backend!r}")
        self._root = snap.to_bytes()
        self.stats.root_bytes.append(len(self._root))
        old = self._root_sids
        self._root_sids = [None] * len(self.workers)
        refs = [w.submit(_import_root, self._root) for w in self.workers]
        for k, w in enumerate(self.workers):
            try:
                self._root_sids[k] = w.get(refs[k])
            except RemoteWorldError:
                self._root_sids[k] = None  # replaced (and the root re-sent) when next used
        for k, sid in enumerate(old):
            if sid is not None and self.workers[k] is not None:
                try:
                    self.workers[k].submit(_release, [sid])
                except RemoteWorldError:
                    pass

    def _ensure(self, k: int) -> None:
        if self._root is None:
            raise RuntimeError("set_root() first")
        if self._root_sids[k] is None:
            self._root_sids[k] = self.workers[k].get(
                self.workers[k].submit(_import_root, self._root))

    def _replace(self, k: int) -> None:
        try:
            self.workers[k].close()
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        self.workers[k] = self._new_worker()
        self._root_sids[k] = None
        self.stats.retries += 1

    def _map(self, jobs: Sequence[tuple[Callable, tuple]]) -> list[Any]:
        """Run job ``j`` = ``(fn, args)`` on worker ``j % n`` (the root id is inserted as
        the first argument), all in flight together; dead workers are replaced and their
        jobs rerun."""
        n = len(self.workers)
        results: list[Any] = [None] * len(jobs)
        todo = list(range(len(jobs)))
        attempts = 0
        while todo:
            for k in {j % n for j in todo}:
                try:
                    self._ensure(k)
                except RemoteWorldError:
                    self._replace(k)
                    self._ensure(k)
            refs: dict[int, Any] = {}
            failed: list[int] = []
            for j in todo:
                try:
                    refs[j] = self.workers[j % n].submit(jobs[j][0], self._root_sids[j % n],
                                                         *jobs[j][1])  # fmt: skip
                except RemoteWorldError:
                    failed.append(j)
            self.stats.remote_calls += len(refs) if self.remote else 0
            for j, ref in refs.items():
                try:
                    results[j] = self.workers[j % n].get(ref)
                except RemoteWorldError:
                    failed.append(j)
            if failed:
                attempts += 1
                if attempts > self.max_retries:
                    raise RemoteWorldError(
                        f"{len(failed)} of {len(jobs)} parallel search jobs were lost with "
                        f"their Ray actor(s), and {self.max_retries} retr"
                        f"{'y' if self.max_retries == 1 else 'ies'} did not bring them back; "
                        "no result was returned"
                    )
                for k in {j % n for j in failed}:
                    self._replace(k)
            todo = failed
        return results

    # --- CEM / MPPI ---------------------------------------------------------------------
    def sequence_evaluator(self, *, objective: Objective = reward_objective,
                           discount: float = 1.0, action_map=None, root_observation=None,
                           render: bool = True, hypotheses: int = 1,
                           risk: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
        """``evaluate(actions [N, H, A]) -> returns [N]`` from the root (see
        :meth:`set_root`), the ``N`` sequences split into one contiguous chunk per worker;
        ``hypotheses`` and ``risk`` as in :func:`planners.world.sequence_evaluator` (each
        worker scores its chunk under every hypothesis)."""

        def evaluate(seqs: np.ndarray) -> np.ndarray:
            seqs = np.asarray(seqs, dtype=np.float32)
            chunks = [c for c in np.array_split(seqs, len(self.workers)) if len(c)]
            parts = self._map([(_evaluate_chunk, (c, objective, discount, action_map,
                                                   root_observation, render, hypotheses, risk))
                               for c in chunks])
            return np.concatenate(parts)

        return evaluate

    # --- MCTS -----------------------------------------------------------------------------
    def root_parallel_search(self, candidates: Callable[[dict[str, np.ndarray]], np.ndarray],
                             *, searches: int | None = None, seed: int = 0,
                             num_simulations: int = 32, max_depth: int | None = None,
                             discount: float = 0.95, objective: Objective = reward_objective,
                             policy: str = "mcts",
                             settings: SearchSettings | None = None) -> RootParallelResult:
        """``searches`` (default: one per worker) independent searches from the root, each
        of ``num_simulations``, merged by visit counts."""
        settings = settings if settings is not None else SearchSettings()
        searches = len(self.workers) if searches is None else int(searches)
        if searches < 1:
            raise ValueError(f"searches must be >= 1, got {searches}")
        seeds = np.random.SeedSequence(seed).spawn(searches)
        results = self._map([(_search, (s, candidates, num_simulations, max_depth, discount,
                                         objective, policy, settings))
                             for s in seeds])  # fmt: skip
        return RootParallelResult.merge(results)

    def close(self) -> None:
        for w in self.workers:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - closing a dead worker
                pass
        self.workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class RootParallelResult:
    """Independent root searches merged by visit counts."""

    action: np.ndarray  # [action_dim] the chosen root action
    index: int  # its index among the root's candidate actions
    visits: np.ndarray  # [A] summed root visits
    q: np.ndarray  # [A] visit-weighted mean Q (0 where unvisited)
    plan: np.ndarray  # [T, action_dim] the action and the principal variation below it
    best: np.ndarray  # [L, action_dim] the best sequence any search saw (first search on ties)
    best_return: float  # its return (-inf before any expansion)
    searches: list[dict[str, Any]]

    @classmethod
    def merge(cls, results: list[dict[str, Any]]) -> RootParallelResult:
        actions = results[0]["actions"]
        for r in results[1:]:
            if not np.array_equal(r["actions"], actions):
                raise ValueError("root searches disagree on the root's candidate actions")
        visits = np.sum([r["visits"] for r in results], axis=0)
        weighted = np.sum([r["visits"] * r["q"] for r in results], axis=0)
        q = np.where(visits > 0, weighted / np.maximum(visits, 1), 0.0)
        # Most visits; ties by the higher merged Q, then the lower index.
        order = np.lexsort((np.arange(len(visits)), -q, -visits))
        index = int(order[0])
        best = max(results, key=lambda r: r["visits"][index])
        plan = np.stack([actions[index]] + list(best["pv"][index]))
        top = max(range(len(results)), key=lambda k: (results[k]["best_return"], -k))
        return cls(action=actions[index].copy(), index=index, visits=visits, q=q,
                   plan=plan.astype(np.float32), best=results[top]["best"],
                   best_return=results[top]["best_return"], searches=results)  # fmt: skip
