"""On a real local Ray cluster (2 CPUs, loopback only, shut down after): the backend
contract suite against the remote backend, local vs remote bit for bit, root-parallel
search equal to the one-process run, a killed actor, and a two-job sweep through the
hydra-ray-launcher and a submitit-local sweep.

Skipped with a reason where the ``ray`` extra is not installed; in CI (``CI=true``, whose
``.ci/run`` installs the extra) a missing Ray fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

try:
    import ray
except ImportError:  # pragma: no cover - depends on the install
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("Ray is not installed: pip install -e '.[ray]' (CI installs it)",
                allow_module_level=True)  # fmt: skip

import test_backend_contract as contract
from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.models import create_world_model
from arcfab_gym.models.remote import (
    RemoteState,
    RemoteWorldError,
    RemoteWorldModel,
    WorldHostClient,
    init_local_ray,
)
from planners.cem import CEMConfig, CEMPlanner
from planners.parallel import WorkerPool

# The contract tests, collected here again and run against the remote backend (the
# registry test is not per backend).
from test_backend_contract import (  # noqa: F401 - collected by pytest
    test_bad_actions_are_rejected_and_leave_the_state_alone,
    test_config_rebuilds_an_equivalent_backend,
    test_decode_frame_shapes_and_bounds,
    test_extracted_state_is_a_copy,
    test_restore_then_step_equals_uninterrupted,
    test_same_seed_and_actions_give_identical_outputs,
    test_set_prompt_continues_the_history,
    test_snapshot_file_round_trip_resumes_exactly,
    test_start_and_step_outputs_are_well_formed,
    test_step_batch_equals_a_loop,
    test_unknown_prompt_lists_the_valid_ones,
)

ROOT = Path(__file__).resolve().parents[1]
# Generous: a killed actor's replacement starts slowly on a loaded 2-core machine (one
# test ran past 180 s there beside three planning jobs).
pytestmark = pytest.mark.timeout(360)


@pytest.fixture(scope="module")
def cluster():
    ray_ = init_local_ray(num_cpus=2)
    yield ray_
    ray_.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    """One actor shared by the contract tests (a model per test, as they make them). It
    reserves no CPU, so the tests' own actors (one CPU each) fit the 2-CPU cluster."""
    c = WorldHostClient(num_cpus=0)
    yield c
    c.kill()


@pytest.fixture(params=["pusht-sim", "mini-dreamzero"])
def name(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def remote_make(request, monkeypatch):
    """The contract suite's ``make`` builds remote models (on the shared actor)."""
    if "client" not in request.fixturenames and request.function.__module__ != contract.__name__:
        yield
        return
    c = request.getfixturevalue("client")
    monkeypatch.setattr(contract, "make",
                        lambda n: RemoteWorldModel(n, client=c, **contract.FAST_KWARGS.get(n, {})))
    yield


def test_contract_models_are_remote(client):
    model = contract.make("pusht-sim")
    assert isinstance(model, RemoteWorldModel)
    model.start(model.prompts[0], seed=0)
    pid = client.call("stats")["pid"]
    assert pid != os.getpid()
    state = model.extract_state()
    assert isinstance(state, RemoteState) and state._local is None  # an id, no tensors


# --- local vs remote, bit for bit ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["pusht-sim", "mini-dreamzero"])
def test_local_and_remote_are_bit_identical(cluster, backend, one_thread):
    # one_thread: the actors run torch on one thread, and the bits of a matrix product
    # can depend on how many threads split it (they do on some CPUs: AMD EPYC here).
    acts = contract.random_actions(25, seed=11)
    local = create_world_model(backend)
    remote = RemoteWorldModel(backend)  # its own actor
    try:
        local.start(local.prompts[0], seed=4)
        remote.start(remote.prompts[0], seed=4)
        contract.assert_same_outputs(contract.rollout(local, acts[:10]),
                                     contract.rollout(remote, acts[:10]))
        # States, and their snapshots: same tensors, same header.
        contract.assert_same_state(local.extract_state(), remote.extract_state().fetch())
        here = WorldStateSnapshot.from_model(local)
        there = WorldStateSnapshot.from_bytes(remote.export_snapshot())
        assert here.equals(there)
        # Batched steps from ids equal local batched steps.
        root_l, root_r = local.extract_state(), remote.extract_state()
        batch = contract.random_actions(3, seed=12)
        ns_l, out_l = local.step_batch([root_l] * 3, batch)
        ns_r, out_r = remote.step_batch([root_r] * 3, batch)
        contract.assert_same_outputs(out_l, out_r)
        for a, b in zip(ns_l, ns_r):
            contract.assert_same_state(a, b.fetch())
        # A remote state moved to another actor as snapshot bytes, and a remote state
        # restored locally, continue exactly like the local one.
        local.load_state(root_l)  # (step_batch left it in the last world's state)
        expected = contract.rollout(local, acts[10:])
        other = RemoteWorldModel(backend)
        try:
            moved = remote.move_state(root_r, other)
            assert moved.on(other.client)
            other.load_state(moved)
            contract.assert_same_outputs(contract.rollout(other, acts[10:]), expected)
        finally:
            other.close()
        fresh = create_world_model(backend)
        fresh.load_state(root_r)  # reading a RemoteState's tensors fetches them
        contract.assert_same_outputs(contract.rollout(fresh, acts[10:]), expected)
    finally:
        remote.close()
    assert remote.client.dead  # the owned actor went with its last model


def test_a_session_over_a_remote_model_forks_and_rewinds_like_a_local_one(client):
    """The state layer on top: checkpoint, fork (a spawn on the same actor), rewind and
    restore give the local session's observations."""
    from arcfab_gym.fabric.session import Session

    acts = contract.random_actions(12, seed=3)

    def script(model) -> list:
        s = Session(model)
        s.reset(prompt=model.prompts[0], seed=1)
        seen = [s.step(a)[0]["block_pose"] for a in acts[:4]]
        cid = s.checkpoint()
        branch = s.fork(cid, new_seed=5, actions=acts[4:8])
        seen.append(branch.observe()["block_pose"])
        seen += [s.step(a)[0]["block_pose"] for a in acts[8:]]
        s.rewind(2)
        seen.append(s.observe()["block_pose"])
        s.restore(cid)
        seen.append(s.step(acts[0])[0]["block_pose"])
        s.close()
        branch.close()
        return seen

    local = script(create_world_model("pusht-sim"))
    remote = script(RemoteWorldModel("pusht-sim", client=client))
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_array_equal(a, b)


# --- root-parallel search -----------------------------------------------------------------
def _plan_cem(pool: WorkerPool, model, seed: int, iterations: int = 2, on_eval=None):
    pool.set_root(model)
    evaluate = pool.sequence_evaluator(discount=0.9)
    if on_eval is not None:
        inner = evaluate

        def evaluate(seqs):  # noqa: F811
            out = inner(seqs)
            on_eval()
            return out

    planner = CEMPlanner([-1.0, -1.0], [1.0, 1.0],
                         CEMConfig(horizon=3, num_samples=8, num_elites=3, iterations=iterations))
    return planner.plan(evaluate, np.random.default_rng(seed))


# Nine fixed targets around the centre (the planners know nothing of the task). A lambda,
# so that cloudpickle sends it by value to actors that cannot import this test module.
_GRID = np.array([[x, y] for x in (-0.5, 0.0, 0.5) for y in (-0.5, 0.0, 0.5)], np.float32)
_candidates = lambda obs: _GRID  # noqa: E731


def test_root_parallel_mcts_equals_one_process(cluster):
    kwargs = {"action_repeat": 4, "frame_size": 64}
    model = create_world_model("pusht-sim", **kwargs)
    model.start(model.prompts[0], seed=3)
    out = {}
    for actors in (0, 2):
        with WorkerPool("pusht-sim", kwargs, actors=actors) as pool:
            pool.set_root(model)
            out[actors] = pool.root_parallel_search(_candidates, searches=4, seed=5,
                                                    num_simulations=8, max_depth=3,
                                                    policy="gumbel")  # fmt: skip
    a, b = out[0], out[2]
    assert a.visits.sum() == 4 * 8  # four searches of 8 simulations, merged
    np.testing.assert_array_equal(a.visits, b.visits)
    np.testing.assert_array_equal(a.q, b.q)
    assert a.index == b.index
    np.testing.assert_array_equal(a.plan, b.plan)
    # The searches were seeded apart (Gumbel noise differs), so they are not all alike.
    assert len({tuple(s["visits"]) for s in a.searches}) > 1


def _plan_candidates(seed: int):
    from planners.proposals import PlanProposal

    return PlanProposal([-1.0, -1.0], [1.0, 1.0], horizon=4, num_candidates=6, std=0.5,
                        rng=np.random.default_rng(seed))  # fmt: skip


def test_root_parallel_mcts_runs_the_agents_settings_and_equals_one_process(cluster):
    """Widening, rollout leaf values and the horizon reach every root search (each from
    the same warm-start candidates), the best sequence seen comes back, and the Ray run
    equals the in-process one."""
    from planners.parallel import SearchSettings
    from planners.widening import Widening

    kwargs = {"action_repeat": 4, "frame_size": 64}
    model = create_world_model("pusht-sim", **kwargs)
    model.start(model.prompts[0], seed=3)
    budget = dict(searches=2, seed=5, num_simulations=10, max_depth=3, policy="mcts")
    widened = SearchSettings(widening=Widening(1.0, 0.5), leaf_rollout=True, horizon=4)
    out = {}
    for actors in (0, 2):
        with WorkerPool("pusht-sim", kwargs, actors=actors) as pool:
            pool.set_root(model)
            out[actors] = pool.root_parallel_search(_plan_candidates(1), settings=widened, **budget)
            if actors == 0:
                plain = pool.root_parallel_search(_plan_candidates(1), **budget)
    a, b = out[0], out[2]
    np.testing.assert_array_equal(a.visits, b.visits)
    np.testing.assert_array_equal(a.best, b.best)
    assert a.best_return == b.best_return and np.isfinite(a.best_return)
    assert len(a.best) == 4  # the path to the best leaf, then its rollout to the horizon
    # The rollouts' model steps are counted; the plain search (hold values) has none.
    assert a.searches[0]["model_steps"] > a.searches[0]["expansions"]
    assert plain.searches[0]["model_steps"] == plain.searches[0]["expansions"]
    # The settings reached the searches: plain MCTS (hold values, no widening) spends
    # the visits otherwise.
    assert not np.array_equal(a.visits, plain.visits)


def test_parallel_agent_carries_the_plan_and_executes_the_best_sequence():
    """planner=mcts_pw's settings through ParallelMPCAgent (in process: the same code the
    actors run): the executed action is the best sequence's first step and the warm-start
    plan moves on; the model's proposals are refused with the reason."""
    from agents.mpc import MPCConfig
    from agents.parallel import ParallelMPCAgent

    model = create_world_model("pusht-sim", action_repeat=4, frame_size=64)
    model.start(model.prompts[0], seed=3)
    cfg = MPCConfig(planner="mcts", num_simulations=12, max_depth=3, candidates="plan",
                    num_candidates=6, plan_horizon=4, widening_c=1.0, select="best",
                    objective="pose", record_tree=False)  # fmt: skip
    with WorkerPool("pusht-sim", {"action_repeat": 4, "frame_size": 64}, actors=0) as pool:
        agent = ParallelMPCAgent(model, cfg, np.random.default_rng(0), pool=pool, searches=2)
        agent.proposal.set_plan(np.linspace([-0.6, 0.2], [0.3, -0.4], 4))
        before = agent.proposal.plan.copy()
        action = agent.act()
        np.testing.assert_array_equal(action, agent.plan[0])
        assert np.isfinite(agent.stats["best_return"])
        want = before.copy()  # the executed sequence over the plan, shifted by one
        want[: len(agent.plan)] = agent.plan[:4]
        np.testing.assert_array_equal(agent.proposal.plan, np.r_[want[1:], want[-1:]])
        assert not np.array_equal(agent.proposal.plan, before)
        with pytest.raises(ValueError, match="proposals > 0 .* not supported over Ray"):
            ParallelMPCAgent(model, MPCConfig(planner="mcts", proposals=2),
                             np.random.default_rng(0), pool=pool)  # fmt: skip


def test_parallel_config_group_composes():
    from test_plan import compose_plan

    assert compose_plan().parallel.actors == 0  # the default: one process, no Ray
    cfg = compose_plan("parallel=ray", "parallel.actors=3")
    assert (cfg.parallel.actors, cfg.parallel.searches, cfg.parallel.max_retries) == (3, 0, 1)


def test_parallel_agent_plans_as_one_process_in_the_plan_app(cluster, tmp_path):
    """experiments.plan with parallel=ray: CEM's real-world rewards equal the one-process
    run's (same seeds); MCTS runs as root-parallel searches."""
    from experiments.plan import ParallelConfig, PlanConfig, PlannerConfig, run
    from experiments.plan import BackendConfig, ExperimentConfig

    def plan(actors: int, planner: str) -> dict:
        cfg = PlanConfig(
            backend=BackendConfig(name="pusht-sim", kwargs={"action_repeat": 4, "frame_size": 64}),
            planner=PlannerConfig(planner=planner, horizon=3, num_samples=8, num_elites=3,
                                  iterations=2, num_simulations=6, max_depth=2),
            experiment=ExperimentConfig(episodes=1, max_steps=3),
            parallel=ParallelConfig(actors=actors), objective="shaped", tree_pages=False,
            audit_plans=False)  # fmt: skip
        return run(cfg, tmp_path / f"{planner}_{actors}")

    one, two = plan(0, "cem"), plan(2, "cem")
    assert two["summary"]["actors"] == 2 and two["config"]["parallel"]["actors"] == 2
    assert one["episodes"][0]["rewards"] == two["episodes"][0]["rewards"]
    mcts = plan(2, "mcts")
    assert mcts["episodes"][0]["steps"] == 3
    assert mcts["episodes"][0]["model_steps_per_action"] == 2 * 6  # two searches of 6


# --- a killed actor -------------------------------------------------------------------------
def test_killed_actor_mid_cem_is_retried_or_a_clear_error(cluster):
    model = create_world_model("pusht-sim")
    model.start(model.prompts[0], seed=2)
    reference = _plan_cem(WorkerPool("pusht-sim", actors=0), model, seed=9, iterations=3)

    def killer(pool):
        done = []

        def kill():
            if not done:  # after the first iteration, kill actor 1 for real
                ray.kill(pool.workers[1].client.actor, no_restart=True)
                done.append(True)

        return kill

    pool = WorkerPool("pusht-sim", actors=2, max_retries=1)
    try:
        got = _plan_cem(pool, model, seed=9, iterations=3, on_eval=killer(pool))
        assert pool.stats.retries == 1
        for ra, rb in zip(reference.returns, got.returns, strict=True):
            np.testing.assert_array_equal(ra, rb)  # the retry gave the same answer
    finally:
        pool.close()
    pool = WorkerPool("pusht-sim", actors=2, max_retries=0)
    try:
        with pytest.raises(RemoteWorldError, match="lost with their Ray actor"):
            _plan_cem(pool, model, seed=9, iterations=3, on_eval=killer(pool))
    finally:
        pool.close()


def test_killed_actor_mid_root_parallel_mcts_is_retried_with_the_same_answer(cluster):
    kwargs = {"action_repeat": 4, "frame_size": 64}
    model = create_world_model("pusht-sim", **kwargs)
    model.start(model.prompts[0], seed=1)
    budget = {"searches": 2, "seed": 3, "num_simulations": 300, "max_depth": 4}
    with WorkerPool("pusht-sim", kwargs, actors=0) as local:
        local.set_root(model)
        t0 = time.perf_counter()
        reference = local.root_parallel_search(_candidates, **budget)
        one_search_s = (time.perf_counter() - t0) / 2
    with WorkerPool("pusht-sim", kwargs, actors=2, max_retries=1) as pool:
        pool.set_root(model)
        victim = pool.workers[1].client.actor
        # Killed a third of the way into its search (each search took one_search_s here).
        timer = threading.Timer(one_search_s / 3, lambda: ray.kill(victim, no_restart=True))
        timer.start()
        got = pool.root_parallel_search(_candidates, **budget)
        timer.join()
        assert pool.stats.retries == 1, one_search_s
    np.testing.assert_array_equal(got.visits, reference.visits)
    np.testing.assert_array_equal(got.q, reference.q)
    assert got.index == reference.index


def test_killed_actor_under_a_remote_model_is_a_clear_error(cluster):
    """A model whose actor dies mid-search says so on the next call; no stale answer."""
    from planners.mcts import muzero_policy
    from planners.world import WorldSearch

    model = RemoteWorldModel("pusht-sim")
    model.start(model.prompts[0], seed=0)
    search = WorldSearch(model, _candidates)
    root = search.root([model.extract_state()])
    timer = threading.Timer(0.3, lambda: ray.kill(model.client.actor, no_restart=True))
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(RemoteWorldError, match="died"):
        muzero_policy(None, np.random.default_rng(0), root, search.recurrent_fn, 10_000,
                      max_depth=4, dirichlet_fraction=0.0, temperature=0.0)
    timer.cancel()
    assert time.perf_counter() - t0 < 60
    with pytest.raises(RemoteWorldError, match="died"):
        model.step(np.zeros(2, np.float32))
    model.close()


# --- Hydra launchers ------------------------------------------------------------------------
def _sweep(tmp_path: Path, launcher: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "experiments.plan", "-m", "backend=pusht_sim", "planner=random",
           "seed=0,1", "experiment.episodes=1", "experiment.max_steps=2", "tree_pages=false",
           "audit_plans=false", f"hydra.sweep.dir={tmp_path}", *launcher]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    assert len(docs) == 2, (sorted(p.name for p in tmp_path.iterdir()), proc.stderr[-2000:])
    return docs


def test_two_job_sweep_through_the_ray_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="pip install -e '.[ray]'")
    docs = _sweep(tmp_path, ["hydra/launcher=ray_local"])
    assert sorted(d["config"]["seed"] for d in docs) == [0, 1]
    assert all(d["summary"]["episodes"] == 1 for d in docs)


def test_two_job_sweep_through_the_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[ray]'")
    docs = _sweep(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=4"])
    assert sorted(d["config"]["seed"] for d in docs) == [0, 1]
