"""Progressive widening in MCTS, plan-centred candidates, rollout leaf values and the one
absorbing-value rule (planners/widening.py, planners/proposals.py, planners/world.py)."""

from __future__ import annotations

import numpy as np
import pytest

from planners._tree import NodeStats
from planners.mcts import RecurrentFnOutput, RootFnOutput, muzero_policy
from planners.proposals import PlanProposal
from planners.widening import Widening, WideningScorer, width_schedule
from planners.world import absorbing_value, absorbing_weight

# --- a toy bandit-tree: numeric embeddings, reward of an edge = a table lookup ----------


def toy_fn(rewards: np.ndarray, calls: list | None = None):
    """recurrent_fn over ``A = len(rewards)`` actions; reward ``rewards[a]``, uniform
    prior, value 0, discount 1; embedding = depth."""
    a = len(rewards)

    def recurrent_fn(params, rng, action, emb):
        if calls is not None:
            calls.append(np.asarray(action).copy())
        b = len(action)
        out = RecurrentFnOutput(reward=rewards[np.asarray(action)].astype(np.float32),
                                discount=np.ones(b, np.float32),
                                prior_logits=np.zeros((b, a), np.float32),
                                value=np.zeros(b, np.float32))  # fmt: skip
        return out, np.asarray(emb) + 1

    return recurrent_fn


def toy_root(a: int, b: int = 1) -> RootFnOutput:
    return RootFnOutput(prior_logits=np.zeros((b, a), np.float32), value=np.zeros(b, np.float32),
                        embedding=np.zeros(b, np.int64))  # fmt: skip


def search(rewards, sims, widening, seed=0, max_depth=1, calls=None):
    return muzero_policy(None, np.random.default_rng(seed), toy_root(len(rewards)),
                         toy_fn(np.asarray(rewards, np.float32), calls), sims,
                         max_depth=max_depth, dirichlet_fraction=0.0, temperature=0.0,
                         widening=widening)  # fmt: skip


def test_width_schedule_exact_counts():
    w = Widening(1.0, 0.5)
    assert w.widths_upto(10, 16) == [1, 2, 2, 2, 3, 3, 3, 3, 3, 4]
    assert w.widths_upto(10, 3) == [1, 2, 2, 2, 3, 3, 3, 3, 3, 3]  # capped at A
    assert Widening(2.0, 0.5).widths_upto(5, 16) == [2, 3, 4, 4, 5]
    assert Widening(1.0, 0.0).widths_upto(4, 16) == [1, 1, 1, 1]  # never widens
    assert width_schedule(1.0, 0.5, 10, 16) == w.widths_upto(10, 16)
    with pytest.raises(ValueError):
        Widening(0.0, 0.5)


def test_scorer_masks_locked_children_and_renormalises_the_prior():
    class Flat:  # a scorer that returns the prior, to see what the wrapper passes on
        def scores(self, stats, mask, num_roots, sims_done):
            return stats.prior_probs.copy()

    a, visits = 6, np.array([1.0, 4.0, 9.0, 100.0], np.float32)
    m = len(visits)
    z = np.zeros((a, m), np.float32)
    ones = np.ones((a, m), np.float32)  # every child visited once
    prior = np.full((a, m), 1 / a, np.float32)
    stats = NodeStats(ones, z, prior, z, visits, visits * 0, visits * 0)
    out = WideningScorer(Flat(), Widening(1.0, 0.5)).scores(stats, z, 1, 0)
    for col, k in enumerate([1, 2, 3, 6]):
        assert np.isfinite(out[:k, col]).all() and np.isneginf(out[k:, col]).all()
        np.testing.assert_allclose(out[:k, col], 1.0 / k, rtol=1e-6)
    # An unlocked child not yet visited is tried before any visited one.
    counts = ones.copy()
    counts[1, 1] = 0.0  # node 1 (k = 2): child 1 unvisited
    stats = NodeStats(counts, z, np.full((a, m), 1 / a, np.float32), z, visits, visits * 0,
                      visits * 0)  # fmt: skip
    out = WideningScorer(Flat(), Widening(1.0, 0.5)).scores(stats, z, 1, 0)
    assert out[:, 1].argmax() == 1 and out[1, 1] > 1e5


def test_widening_unlocks_root_children_as_visits_grow():
    # Each newly unlocked child is tried at once: after s simulations (the root visited
    # 1 + s times) exactly k(s) children have visits, and none beyond them -- whatever
    # the rewards (falling with the index here, so PUCT alone would not try them).
    rewards = np.linspace(1.0, 0.0, 16)
    w = Widening(1.0, 0.5)
    for sims in (1, 2, 4, 5, 9, 10, 17, 30):
        visits = search(rewards, sims, w).search_tree.children_visits[0, 0]
        k = int(w.width(sims, 16))  # the width at the last selection (root visits = sims)
        assert (visits > 0).sum() == k, (sims, visits)
        assert visits[k:].sum() == 0


def test_widening_respects_the_simulation_budget():
    calls: list = []
    out = search(np.linspace(0, 1, 8), 25, Widening(1.5, 0.6), max_depth=3, calls=calls)
    assert len(calls) == 25
    assert out.search_tree.node_visits[0, 0] == 26  # 1 + the simulations
    assert out.search_tree.children_visits[0, 0].sum() == 25


def test_search_is_deterministic_for_a_seed():
    rewards = np.random.default_rng(3).random(8)
    a = search(rewards, 40, Widening(1.0, 0.5), seed=5, max_depth=3)
    b = search(rewards, 40, Widening(1.0, 0.5), seed=5, max_depth=3)
    for f in ("children_visits", "node_values", "children_index", "node_visits"):
        np.testing.assert_array_equal(getattr(a.search_tree, f), getattr(b.search_tree, f))
    np.testing.assert_array_equal(a.action, b.action)


def test_widening_finds_a_better_action_than_a_fixed_small_set():
    # A continuous bandit with its optimum at 0.73; candidates drawn uniformly. A fixed
    # set of 4 draws vs 64 slots of the same proposal unlocked by widening, same budget.
    def best_action(num_slots, widening, seed):
        rng = np.random.default_rng(seed)
        cands = rng.uniform(-1, 1, num_slots)
        rewards = -((cands - 0.73) ** 2)
        out = search(rewards, 64, widening, seed=seed)
        return cands[int(out.action[0])]

    fixed = [abs(best_action(4, None, s) - 0.73) for s in range(8)]
    widened = [abs(best_action(64, Widening(1.0, 0.8), s) - 0.73) for s in range(8)]
    assert np.mean(widened) < 0.5 * np.mean(fixed)
    assert np.mean(widened) < 0.1
    # All 64 open from the start, without widening: spread too thin for 64 simulations.
    flat = [abs(best_action(64, None, s) - 0.73) for s in range(8)]
    assert np.mean(widened) < np.mean(flat)


def test_plan_proposal_candidates_follow_their_sequence():
    rng = np.random.default_rng(0)
    prop = PlanProposal([-1, -1], [1, 1], horizon=4, num_candidates=5, std=0.5, rng=rng)
    prop.set_plan(np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]]))
    actions, logits = prop(None, depth=0)
    assert actions.shape == (5, 2) and np.all(np.abs(actions) <= 1)
    np.testing.assert_allclose(actions[0], [0.1, 0.1], atol=1e-6)  # the plan first
    np.testing.assert_allclose(np.exp(logits).sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.exp(logits[0]), 0.3, rtol=1e-5)
    # A child reached by a perturbed candidate follows that candidate's sequence.
    tail = prop.rollout(1, actions[2])
    assert tail.shape == (3, 2) and not np.allclose(tail, prop.plan[1:])
    child, _ = prop(None, depth=1, action=actions[2])
    np.testing.assert_allclose(child[0], tail[0], atol=1e-6)
    # The plan's own child follows the plan; after an update the plan shifts by one.
    np.testing.assert_allclose(prop.rollout(1, actions[0]), prop.plan[1:], atol=1e-6)
    prop.update(np.array([[0.5, 0.5], [0.6, 0.6]]))
    np.testing.assert_allclose(prop.plan, [[0.6, 0.6], [0.3, 0.3], [0.4, 0.4], [0.4, 0.4]])


def test_one_absorbing_rule():
    for g in (0.8, 0.9, 1.0):
        for step in range(4):
            # Held from `step` to the horizon 4, discounted from the root = the
            # sequence evaluators' weight.
            assert g**step * absorbing_value(1.0, g, step, 4) == pytest.approx(
                absorbing_weight(g, step, 4))
    assert absorbing_value(2.0, 0.8, 0, None) == pytest.approx(10.0)
    assert absorbing_value(2.0, 1.0, 1, 4) == pytest.approx(6.0)  # not 2e6
    with pytest.raises(ValueError):
        absorbing_value(1.0, 1.0, 0, None)


# --- on the real simulator -----------------------------------------------------------------


def test_terminal_value_in_mcts_matches_the_sequence_evaluator():
    from agents.objectives import pose_objective
    from arcfab_gym.models.pusht_sim import PushTSim
    from arcfab_gym.tasks import pusht
    from planners.world import WorldSearch, sequence_evaluator

    prompt = pusht.DEFAULT_PROMPT
    sim = PushTSim(action_repeat=2, frame_size=32)
    sim.start(prompt, 0, pusht.state_for_pose(np.array([60.0, 60.0]),
                                              pusht.goal_pose(prompt) + [0.5, 0, 0]))
    root_state = sim.extract_state()
    still = pusht.target_to_action(np.array([[60.0, 60.0]]))
    ret = sequence_evaluator(sim, root_state, objective=pose_objective, discount=1.0)(
        np.repeat(still[None], 4, axis=1))[0]
    with pytest.raises(ValueError):
        WorldSearch(sim, lambda obs: still, objective=pose_objective, discount=1.0)
    search = WorldSearch(sim, lambda obs: still, objective=pose_objective, discount=1.0,
                         horizon=4)
    root = search.root([root_state])
    out, _ = search.recurrent_fn(None, np.random.default_rng(0), np.array([0]), root.embedding)
    assert out.discount[0] == 0.0
    assert out.reward[0] == pytest.approx(ret, rel=1e-5)  # 4 r, both ways; was 1e6 r
    assert 2.0 < out.reward[0] < 4.0
    search.release()


def test_mcts_pw_on_pusht_sim_budget_and_determinism():
    from agents.mpc import MPCAgent, MPCConfig
    from arcfab_gym.models.pusht_sim import PushTSim
    from arcfab_gym.tasks import pusht

    def episode(seed, steps=3):
        rng = np.random.default_rng(seed)
        sim = PushTSim(action_repeat=4, frame_size=32)
        sim.start(pusht.DEFAULT_PROMPT, seed, pusht.sample_initial_state(rng))
        cfg = MPCConfig(planner="mcts", objective="pose", candidates="plan", num_simulations=12,
                        max_depth=3, num_candidates=8, perturb_std=0.5, plan_horizon=5,
                        widening_c=1.0, widening_alpha=0.5, leaf_value="rollout",
                        select="best", record_tree=False)  # fmt: skip
        agent = MPCAgent(sim, cfg, rng)
        actions, stats = [], []
        for _ in range(steps):
            before = sim.extract_state()
            a = agent.act()
            after = sim.extract_state()
            np.testing.assert_array_equal(before.tensors["physics/bodies"],
                                          after.tensors["physics/bodies"])
            actions.append(a)
            stats.append(dict(agent.stats))
            sim.step(a)
        sim.close()
        return np.array(actions), stats

    a1, s1 = episode(4)
    a2, s2 = episode(4)
    np.testing.assert_array_equal(a1, a2)  # same seed, same actions
    for s in s1:
        # 12 expansions plus the rollouts, each at most plan_horizon - 1 steps.
        assert s["model_steps"] == 12 + s["rollout_steps"]
        assert 0 < s["rollout_steps"] <= 12 * 4
        assert s["root_visits"] == 13
    a3, _ = episode(5)
    assert not np.array_equal(a1, a3)
