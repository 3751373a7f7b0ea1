"""The task-side planning pieces: the pose objective, terminal states in the sequence
evaluator and in MCTS, relative actions -- on the real Push-T simulator."""

from __future__ import annotations

import numpy as np
import pytest

from agents.mpc import relative_action_map
from agents.objectives import pose_objective
from arcfab_gym.models.base import StepOutput
from arcfab_gym.models.pusht_sim import PushTSim
from arcfab_gym.tasks import pusht
from planners.world import WorldSearch, absorbing_weight, sequence_evaluator

PROMPT = pusht.DEFAULT_PROMPT
GOAL = pusht.goal_pose(PROMPT)


def obs_at(block_pose, agent=(60.0, 60.0)) -> StepOutput:
    obs = {"agent_pos": np.asarray(agent, np.float32), "block_pose": np.asarray(block_pose, np.float32),
           "goal_pose": GOAL.astype(np.float32)}
    return StepOutput(observation=obs, reward=0.0, terminated=False, info={})


def test_pose_objective_falls_with_position_and_angle_error():
    at_goal = pose_objective(None, obs_at(GOAL), None)
    values = [pose_objective(None, obs_at(GOAL + [dx, 0, 0]), None) for dx in (1, 2, 5, 20, 80)]
    assert at_goal > values[0] and all(a > b for a, b in zip(values, values[1:]))
    turned = [pose_objective(None, obs_at(GOAL + [0, 0, a]), None) for a in (0.05, 1.0, 2.0, 3.0)]
    assert at_goal > turned[0] and all(a > b for a, b in zip(turned, turned[1:]))
    # Near the goal one pixel still matters (success needs about two).
    assert values[0] - values[1] > 0.03


def near_goal_sim(offset_px: float) -> PushTSim:
    sim = PushTSim(action_repeat=2, frame_size=32)
    sim.start(PROMPT, 0, pusht.state_for_pose(np.array([60.0, 60.0]), GOAL + [offset_px, 0, 0]))
    return sim


def test_a_terminal_state_counts_for_the_rest_of_the_horizon():
    sim = near_goal_sim(0.5)  # covers > 95 %: any step that leaves the T alone succeeds
    root = sim.extract_state()
    still = pusht.target_to_action(np.array([[60.0, 60.0]]))  # the pusher stays in its corner
    seqs = np.repeat(still[None], 4, axis=1)  # [1, H=4, 2]
    evaluate = sequence_evaluator(sim, root, objective=pose_objective, discount=0.9)
    ret = evaluate(seqs)[0]
    sim.load_state(root)
    out = sim.step(still[0])
    assert out.terminated
    v = pose_objective(sim, out, None)
    assert ret == pytest.approx(v * absorbing_weight(0.9, 0, 4)) == pytest.approx(10 * v)
    assert absorbing_weight(1.0, 1, 4) == 3.0
    # ... so a rollout that succeeds beats the same objective value without success.
    assert ret > v * sum(0.9**h for h in range(4))


def test_mcts_gives_a_terminal_transition_its_absorbing_value():
    sim = near_goal_sim(0.5)
    stay = lambda obs: pusht.target_to_action(np.array([[60.0, 60.0], [62.0, 60.0]]))  # noqa: E731
    search = WorldSearch(sim, stay, objective=pose_objective, discount=0.8)
    root = search.root([sim.extract_state()])
    out, _ = search.recurrent_fn(None, np.random.default_rng(0), np.array([0]), root.embedding)
    assert out.discount[0] == 0.0
    assert out.reward[0] > 4.0 * 0.5  # r / (1 - 0.8) = 5 r, r > 0.5 at the goal
    search.release()


def test_relative_action_map_moves_from_each_pusher():
    amap = relative_action_map(50.0)
    obs = [{"agent_pos": np.array([100.0, 100.0])}, {"agent_pos": np.array([500.0, 10.0])}]
    act = amap(obs, np.array([[1.0, 0.0], [1.0, -1.0]]))
    np.testing.assert_allclose(pusht.action_to_target(act), [[150, 100], [512, 0]], atol=1e-3)


def test_mcts_candidates_come_from_the_models_proposals_with_their_prior():
    from agents.mpc import proposal_moves, relative_moves
    from arcfab_gym.models import create_world_model

    model = create_world_model("mini-dreamzero")
    model.start(PROMPT, 3)
    rng = np.random.default_rng(0)
    search = WorldSearch(model, proposal_moves(model, 6, rng, prior_mass=0.6))
    root = search.root([model.extract_state()])
    cid = root.embedding[0]
    actions = search._actions[cid]
    assert actions.shape == (6 + 17, 2) and np.all(np.abs(actions) <= 1)
    probs = np.exp(root.prior_logits[0])
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[:6].sum(), 0.6, rtol=1e-5)
    # The proposals are the model's own, drawn at the node's state.
    np.testing.assert_array_equal(actions[:6], model.propose_actions(6, np.random.default_rng(0)))
    out, _ = search.recurrent_fn(None, rng, np.array([0]), root.embedding)
    assert out.prior_logits.shape == (1, 23)
    search.release()
    # A backend without proposals falls back to the relative moves, uniform.
    sim = near_goal_sim(10.0)
    assert proposal_moves(sim, 6, rng).__qualname__ == relative_moves(40.0).__qualname__
