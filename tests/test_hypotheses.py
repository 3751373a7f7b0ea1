"""Trajectory sampling: a state stepped by one ensemble member alone (``assume``), and the
sequence planners scoring each sequence by the mean of the members' returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.mpc import MPCAgent, MPCConfig
from arcfab_gym.errors import StateMismatchError
from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.models.base import ModelState
from arcfab_gym.models.mini_dreamzero import features
from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero
from arcfab_gym.models.pusht_sim import PushTSim
from arcfab_gym.tasks import pusht
from planners.cem import CEMConfig
from planners.world import hedged, hypothesis_roots, sequence_evaluator

P0 = pusht.DEFAULT_PROMPT
pytestmark = pytest.mark.usefixtures("one_thread")

ACTS = np.array([[0.3, -0.2], [0.1, 0.4], [-0.6, 0.2], [0.2, 0.2]], np.float32)


def _rollout(model, state, acts=ACTS, render=False):
    states = [state]
    for a in acts:
        states, _ = model.step_batch(states, a[None], render=render)
    return states[0]


@pytest.fixture
def model(tiny_weights_dir):
    m = MiniDreamZero(weights_dir=tiny_weights_dir)
    m.start(P0, seed=3)
    m.step(np.array([0.2, 0.1], np.float32))
    yield m
    m.close()


def test_a_hypothesis_steps_the_state_by_its_member_alone(model):
    """The tiny weights hold two members and follow their mean: under hypothesis k each
    step's state is member k's own prediction, and the two futures differ."""
    assert model.hypotheses == 2
    root = model.extract_state()
    ends = []
    for k in (0, 1):
        state = model.assume(root, k)
        assert state.meta["hypothesis"] == k and "hypothesis" not in root.meta
        model.load_state(state)
        w = model._w
        now = torch.from_numpy(w.task[w.n - 1][None])
        prev = torch.from_numpy(w.task[w.n - 2][None])
        last = torch.from_numpy(w.acts[w.n - 1][None])
        net = model.weights.state_net
        deltas = net.member_deltas(now, prev, torch.from_numpy(ACTS[:1]), last)
        want = features.apply_delta(now, deltas[k] * net.delta_scale)[0].numpy()
        out = model.step(ACTS[0])
        np.testing.assert_allclose(model._w.task[model._w.n - 1], want, atol=1e-6)
        assert out.info["disagreement"] > 0  # still the ensemble's doubt
        ends.append(_rollout(model, model.assume(root, k)).tensors["task_state"][-1].numpy())
    assert np.abs(ends[0] - ends[1]).max() > 1e-4
    readout = _rollout(model, root).tensors["task_state"][-1].numpy()
    assert np.abs(readout - ends[0]).max() > 1e-5  # the mean is neither member
    # None returns to the readout: the same bits as never assuming anything.
    back = _rollout(model, model.assume(model.assume(root, 1), None)).tensors["task_state"]
    np.testing.assert_array_equal(back.numpy(), _rollout(model, root).tensors["task_state"].numpy())


def test_mixed_hypotheses_batch_like_each_alone(model):
    """One batch may hold worlds of every hypothesis (and the readout): each gets what
    it gets stepped alone."""
    root = model.extract_state()
    states = [model.assume(root, 1), root, model.assume(root, 0)]
    batch = states
    for a in ACTS:
        batch, _ = model.step_batch(batch, np.stack([a] * 3), render=False)
    for s, b in zip(states, batch):
        alone = _rollout(model, s)
        np.testing.assert_allclose(b.tensors["task_state"].numpy(), alone.tensors["task_state"].numpy(),
                                   atol=1e-6)
        assert b.meta.get("hypothesis") == s.meta.get("hypothesis")


def test_a_hypothesis_travels_with_the_state_bit_for_bit(model, tmp_path):
    """Saved, loaded, restored: the same state under the same hypothesis and the same
    actions gives the same bits, video included."""
    state = model.assume(model.extract_state(), 1)
    path = tmp_path / "h1.safetensors"
    model.load_state(state)
    WorldStateSnapshot.from_model(model).save(path)
    loaded = WorldStateSnapshot.load(path).model_state
    assert loaded.meta["hypothesis"] == 1
    a = _rollout(model, state, render=True)
    b = _rollout(model, loaded, render=True)
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    assert a.meta == b.meta


def test_a_bad_hypothesis_is_refused_by_name(model):
    root = model.extract_state()
    for bad in (2, -1):
        with pytest.raises(ValueError, match="hypothesis .* outside 0..1"):
            model.assume(root, bad)
    forged = ModelState(tensors=root.tensors, meta={**root.meta, "hypothesis": 5})
    with pytest.raises(StateMismatchError, match="hypothesis 5.*hold 2"):
        model.load_state(forged)
    sim = PushTSim(action_repeat=4, frame_size=64)
    sim.start(P0, 0)
    assert sim.hypotheses == 1
    s = sim.extract_state()
    assert sim.assume(s, 0) is s and sim.assume(s, None) is s
    with pytest.raises(ValueError, match="holds 1"):
        hypothesis_roots(sim, s, 2)
    with pytest.raises(ValueError, match="whole number"):
        hypothesis_roots(sim, s, 0)
    sim.close()


def test_the_evaluator_scores_the_mean_over_members_less_the_risk(model):
    root = model.extract_state()
    seqs = np.random.default_rng(0).uniform(-1, 1, (5, 3, 2)).astype(np.float32)
    alone = np.stack([sequence_evaluator(model, model.assume(root, k), render=False)(seqs)
                      for k in (0, 1)])
    np.testing.assert_allclose(sequence_evaluator(model, root, hypotheses=2, render=False)(seqs),
                               alone.mean(0), atol=1e-6)
    hedge = sequence_evaluator(model, root, hypotheses=2, risk=0.5, render=False)(seqs)
    np.testing.assert_allclose(hedge, alone.mean(0) - 0.5 * alone.std(0), atol=1e-6)
    assert alone.std(0).max() > 0  # the members disagree about these sequences
    np.testing.assert_array_equal(hedged(alone[:1], 3.0), alone[0])
    with pytest.raises(ValueError, match="risk"):
        sequence_evaluator(model, root, hypotheses=2, risk=-1.0)
    with pytest.raises(ValueError, match="holds 2"):
        sequence_evaluator(model, root, hypotheses=3)


def test_the_agent_plans_under_hypotheses_and_refuses_what_it_cannot(model):
    cem = CEMConfig(horizon=3, num_samples=8, num_elites=2, iterations=2)
    root = model.extract_state()
    best = []
    for k in (1, 2):
        model.load_state(root)
        agent = MPCAgent(model, MPCConfig(planner="cem", objective="pose", cem=cem, hypotheses=k),
                         np.random.default_rng(4))
        agent.act()
        best.append(agent.stats["best_return"])
        assert agent.stats["evaluations"] == 16
        for key in root.tensors:  # planning leaves the model where it was
            assert torch.equal(model.extract_state().tensors[key], root.tensors[key])
    assert best[0] != best[1]  # scored by another rule (the tiny members differ little)
    assert MPCAgent(model, MPCConfig(planner="cem", hypotheses=0), np.random.default_rng(0)).hypotheses == 2
    sim = PushTSim(action_repeat=4, frame_size=64)
    sim.start(P0, 0)
    assert MPCAgent(sim, MPCConfig(planner="icem", hypotheses=0), np.random.default_rng(0)).hypotheses == 1
    sim.close()
    for bad, match in ((dict(planner="cem", hypotheses=3), "0..2"),
                       (dict(planner="cem", hypotheses=-1), "0..2"),
                       (dict(planner="mcts", hypotheses=2), "sequence planners"),
                       (dict(planner="cem", hypotheses=2, risk=float("nan")), "risk")):
        with pytest.raises(ValueError, match=match):
            MPCAgent(model, MPCConfig(**bad), np.random.default_rng(0))


def test_the_plan_audit_promises_what_the_planner_scored(model):
    """With hypotheses, the audit's promise is the members' mean, as the planner saw it."""
    from experiments.plan import plan_returns

    real = PushTSim(action_repeat=4, frame_size=64)
    real.start(P0, 3)
    scratch = real.spawn()
    root = model.extract_state()
    plan = ACTS[:3]
    each = []
    for k in (0, 1):
        model.load_state(model.assume(root, k))
        each.append(plan_returns(model, real, scratch, plan))
    model.load_state(root)
    both = plan_returns(model, real, scratch, plan, hypotheses=2)
    assert both[0] == pytest.approx((each[0][0] + each[1][0]) / 2, abs=1e-9)
    assert both[2] == pytest.approx((each[0][2] + each[1][2]) / 2, abs=1e-9)
    assert both[1] == each[0][1] and both[3] == each[0][3]  # the real side is unchanged
    assert model.extract_state().tensors["task_state"].shape == root.tensors["task_state"].shape
    real.close()
    scratch.close()
