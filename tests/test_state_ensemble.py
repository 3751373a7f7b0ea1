"""The state dynamics as an ensemble: members stacked into one batched matmul, the state
following their mean change, their spread reported as the step's disagreement and
charged by the planners' pessimistic objective."""

from __future__ import annotations


import json

import numpy as np
import pytest
import torch
from torch import nn

from arcfab_gym.errors import StateMismatchError
from arcfab_gym.models.base import ModelState, StepOutput
from arcfab_gym.models.mini_dreamzero import features
from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero
from arcfab_gym.models.mini_dreamzero.network import StateDynamics, StateDynamicsConfig
from arcfab_gym.tasks import pusht
from planners.world import Pessimistic

P0 = pusht.DEFAULT_PROMPT

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    now = torch.rand(n, 6, generator=g) * 1.6 - 0.8
    ang = torch.rand(n, generator=g) * 6.28
    now[:, 4], now[:, 5] = ang.sin(), ang.cos()
    prev = now.clone()
    prev[:, :4] += 0.01 * torch.randn(n, 4, generator=g)
    act = torch.rand(n, 2, generator=g) * 2 - 1
    last = torch.rand(n, 2, generator=g) * 2 - 1
    return now, prev, act, last


def _random_ensemble(members: int, seed: int = 0) -> StateDynamics:
    torch.manual_seed(seed)
    net = StateDynamics(StateDynamicsConfig(hidden=16, layers=2, members=members))
    with torch.no_grad():
        net.delta_scale.copy_(torch.tensor([0.02, 0.02, 0.01, 0.01, 0.02]))
        nn.init.normal_(net.weight[-1], std=0.3)
        nn.init.normal_(net.linear.weight, std=0.1)
    return net


def test_each_member_computes_what_it_would_alone():
    """The stacked matmul is a batch of independent MLPs: member e of an ensemble gives
    what a one-member model holding only e's weights gives (and the shared linear path)."""
    net = _random_ensemble(3)
    x = _inputs()
    all_members = net.member_deltas(*x)
    assert all_members.shape == (3, 16, features.DELTA_DIM)
    for e in range(3):
        alone = StateDynamics(StateDynamicsConfig(hidden=16, layers=2, members=1))
        sd = {k: (v[e:e + 1] if k.startswith(("weight.", "bias.")) else v) for k, v in net.state_dict().items()}
        alone.load_state_dict(sd)
        torch.testing.assert_close(alone.member_deltas(*x)[0], all_members[e], atol=1e-6, rtol=0)
    assert (all_members[0] - all_members[1]).abs().max() > 1e-3  # they do differ


def test_state_follows_the_mean_change_and_disagreement_is_the_spread():
    net = _random_ensemble(4)
    x = _inputs()
    nxt, spread = net.predict(*x)
    deltas = net.member_deltas(*x) * net.delta_scale
    torch.testing.assert_close(nxt, features.apply_delta(x[0], deltas.mean(0)))
    torch.testing.assert_close(net(*x), nxt)
    # The spread in px of the T's predicted position plus its angle's, per frame.
    members = torch.stack([features.apply_delta(x[0], d) for d in deltas])  # [E, B, 6]
    pos = members[..., 2:4] * (pusht.WORLD_SIZE / 2)
    want = pos.var(0, unbiased=False).sum(-1).sqrt() + 50.0 * deltas[..., 4].std(0, unbiased=False)
    torch.testing.assert_close(spread, want, atol=1e-3, rtol=1e-4)
    assert (spread > 0).all()
    # Identical members agree: no disagreement, and the state is any member's.
    with torch.no_grad():
        for p in [*net.weight, *net.bias]:
            p[:] = p[0]
    nxt, spread = net.predict(*x)
    assert spread.abs().max() < 1e-4
    one = StateDynamics(StateDynamicsConfig(hidden=16, layers=2, members=1))
    assert one.predict(*x)[1].eq(0).all()


def test_weights_saved_before_the_ensemble_load_as_one_member():
    """An ``nn.Sequential`` MLP's state dict (the format of weights up to v2.2) is upgraded
    to one stacked member that computes the same change."""
    torch.manual_seed(1)
    dims = [features.DYNAMICS_INPUT_DIM, 16, 16, features.DELTA_DIM]
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    mlp = nn.Sequential(*layers[:-1])
    linear = nn.Linear(features.DYNAMICS_INPUT_DIM, features.DELTA_DIM)
    old = {**{f"mlp.{k}": v for k, v in mlp.state_dict().items()},
           **{f"linear.{k}": v for k, v in linear.state_dict().items()},
           "delta_scale": torch.full((features.DELTA_DIM,), 0.03)}
    net = StateDynamics(StateDynamicsConfig(hidden=16, layers=2))
    net.load_state_dict(StateDynamics.upgrade_state_dict(old))
    x = _inputs()
    inp = features.dynamics_input(*x)
    want = mlp(inp) * net.mlp_mask + linear(inp)
    torch.testing.assert_close(net.member_deltas(*x)[0], want, atol=1e-6, rtol=0)
    assert StateDynamics.upgrade_state_dict(net.state_dict()) is not None  # new format passes
    with pytest.raises(ValueError, match="at least one member"):
        StateDynamicsConfig(members=0)


def test_the_backend_reports_disagreement_per_generated_frame(tiny_weights_dir):
    m = MiniDreamZero(weights_dir=tiny_weights_dir)
    _, info = m.start(P0, seed=2)
    assert info["disagreement"] == 0.0  # a real frame
    outs = [m.step(np.array([0.3, -0.2], np.float32)) for _ in range(3)]
    assert all(o.info["disagreement"] > 0 for o in outs)
    # The batched state-only step reports the same, per fork.
    root = m.extract_state()
    m.step(np.array([0.3, -0.2], np.float32))
    single = m.step(np.array([0.1, 0.1], np.float32)).info["disagreement"]
    m.load_state(root)
    acts = np.array([[0.3, -0.2], [0.9, 0.9]], np.float32)
    _, batch = m.step_batch([root, root], acts, render=False)
    m.load_state(root)
    again = m.step(np.array([0.3, -0.2], np.float32)).info["disagreement"]
    assert batch[0].info["disagreement"] == pytest.approx(again, rel=1e-4)
    assert batch[1].info["disagreement"] != pytest.approx(again, rel=1e-3)
    assert single > 0
    # It travels with the state: a restored state reads the same.
    state = m.extract_state()
    m.step(np.array([-0.5, 0.5], np.float32))
    m.load_state(state)
    assert m._frame_record_info()["disagreement"] == again
    m.close()


def test_a_version_3_state_reads_with_no_disagreement(tiny_weights_dir):
    """States written before the ensemble (version 3, nine frame_info columns) still load,
    with a disagreement of 0; a frame_info of the wrong width is refused by name."""
    m = MiniDreamZero(weights_dir=tiny_weights_dir)
    m.start(P0, seed=2)
    m.step(np.array([0.3, -0.2], np.float32))
    state = m.extract_state()
    old = ModelState(tensors={**state.tensors, "frame_info": state.tensors["frame_info"][:, :9]},
                     meta={**state.meta, "state_version": 3})
    m.load_state(old)
    np.testing.assert_array_equal(m._w.task[: m._w.n], state.tensors["task_state"].numpy())
    assert m._w.info[m._w.n - 1, 9] == 0.0
    np.testing.assert_array_equal(m._w.info[: m._w.n, :9], state.tensors["frame_info"][:, :9].numpy())
    bad = ModelState(tensors={**state.tensors, "frame_info": state.tensors["frame_info"][:, :9]},
                     meta=dict(state.meta))
    with pytest.raises(StateMismatchError, match="frame_info must have 10 columns"):
        m.load_state(bad)
    m.close()


def test_pessimistic_objective_charges_the_disagreement():
    base = lambda model, out, state: out.reward  # noqa: E731
    out = StepOutput(observation={}, reward=0.7, terminated=False, info={"disagreement": 4.0})
    assert Pessimistic(base, 0.05)(None, out, None) == pytest.approx(0.7 - 0.2)
    sure = StepOutput(observation={}, reward=0.7, terminated=False, info={})
    assert Pessimistic(base, 0.05)(None, sure, None) == pytest.approx(0.7)  # the simulator
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="pessimism weight"):
            Pessimistic(base, bad)


def test_the_agent_plans_on_the_pessimistic_objective(tiny_weights_dir):
    """``pessimism > 0`` wraps whatever objective the agent plans on (also a goal set
    later); with a backend that reports no disagreement the plan is unchanged."""
    from agents.mpc import MPCAgent, MPCConfig
    from planners.cem import CEMConfig
    from arcfab_gym.models.pusht_sim import PushTSim

    m = MiniDreamZero(weights_dir=tiny_weights_dir)
    m.start(P0, seed=1)
    agent = MPCAgent(m, MPCConfig(planner="cem", objective="pose", pessimism=0.1), np.random.default_rng(0))
    assert isinstance(agent.objective, Pessimistic) and agent.objective.weight == 0.1
    agent.set_goal_pose(np.array([200.0, 200.0]), np.array([256.0, 256.0, 0.5]))
    assert isinstance(agent.objective, Pessimistic)
    with pytest.raises(ValueError, match="pessimism"):
        MPCAgent(m, MPCConfig(planner="cem", pessimism=-1.0), np.random.default_rng(0))
    m.close()

    cfg = dict(planner="cem", objective="pose", cem=CEMConfig(horizon=3, num_samples=8, num_elites=2, iterations=2))
    plans = []
    for pessimism in (0.0, 0.5):
        sim = PushTSim(action_repeat=4, frame_size=64)
        sim.start(P0, 3)
        agent = MPCAgent(sim, MPCConfig(**cfg, pessimism=pessimism), np.random.default_rng(5))
        plans.append([agent.act() for _ in range(2)])
    np.testing.assert_array_equal(np.array(plans[0]), np.array(plans[1]))


def test_resync_clears_the_doubt_only_when_the_T_is_given(tiny_weights_dir):
    m = MiniDreamZero(weights_dir=tiny_weights_dir)
    m.start(P0, seed=2)
    m.step(np.array([0.3, -0.2], np.float32))
    doubt = m._frame_record_info()["disagreement"]
    assert doubt > 0
    m.inject_state(agent_pos=np.array([100.0, 100.0]))  # the pusher only: the T is still a guess
    assert m._frame_record_info()["disagreement"] == doubt
    m.set_prompt(P0)
    assert m._frame_record_info()["disagreement"] == doubt
    m.inject_state(block_pose=np.array([250.0, 250.0, 0.3]))
    assert m._frame_record_info()["disagreement"] == 0.0
    m.close()


def test_disagreement_calibration_reads_rank_agreement():
    from experiments.evaluate_world_model import disagreement_calibration, spearman

    x = np.arange(20.0)
    assert spearman(x, x**2) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(20)) is None
    cal = disagreement_calibration(list(x), list(3 * x))
    assert cal["spearman_vs_block_err"] == pytest.approx(1.0)
    assert cal["block_err_px_least_doubted_fifth"] < cal["block_err_px_most_doubted_fifth"]
    assert disagreement_calibration([0.0] * 12, list(x[:12]))["spearman_vs_block_err"] is None


def test_the_state_may_follow_the_first_member():
    """``readout='first'``: the state is member 0's (the others only measure the doubt),
    and the disagreement is the same as with the mean readout."""
    net = _random_ensemble(3)
    x = _inputs()
    mean_next, mean_spread = net.predict(*x)
    net.cfg.readout = "first"
    first_next, first_spread = net.predict(*x)
    torch.testing.assert_close(first_next, features.apply_delta(x[0], net.member_deltas(*x)[0] * net.delta_scale))
    torch.testing.assert_close(first_spread, mean_spread)
    assert (first_next - mean_next).abs().max() > 1e-4
    with pytest.raises(ValueError, match="readout"):
        StateDynamicsConfig(readout="median")


def test_training_adds_members_beside_the_frozen_ones(tmp_path):
    """``stage=state state_members=3 init_from=<one member>``: member 0 comes back bit for
    bit (also through weight decay), the new members are trained (their last layers,
    which start at zero, moved), and the weights load in the backend as an ensemble."""
    from experiments.collect import CollectConfig, collect_episode
    from experiments.train_world_model import TrainConfig, train

    ccfg = CollectConfig(frames=10, frame_size=64, action_repeat=4, seed=0)
    eps = [collect_episode(ccfg, i) for i in range(4)]
    data = {k: np.stack([ep[k] for ep in eps]) for k in eps[0]}
    np.savez(tmp_path / "d.npz", **data)
    threads = torch.get_num_threads()
    common = dict(stage="state", tiny=True, minutes=None, max_steps=12, state_batch=8, threads=1,
                  train_data=str(tmp_path / "d.npz"), test_data=str(tmp_path / "d.npz"), state_horizon=2)
    try:
        one = tmp_path / "one"
        train(TrainConfig(**common, out_dir=str(one)), tmp_path / "run1")
        three = tmp_path / "three"
        train(TrainConfig(**common, out_dir=str(three), init_from=str(one), state_members=3,
                          state_readout="first"), tmp_path / "run3")
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file

    a = load_file(str(one / "state_dynamics.safetensors"))
    b = load_file(str(three / "state_dynamics.safetensors"))
    for k in a:
        if k.startswith(("weight.", "bias.")):
            assert b[k].shape[0] == 3
            assert torch.equal(b[k][:1], a[k]), k
        else:
            assert torch.equal(b[k], a[k]), k
    assert b["weight.2"][1:].abs().sum() > 0  # the new members' last layer left zero
    meta = json.loads((three / "config.json").read_text())
    assert meta["state_dynamics"] == {"hidden": 32, "layers": 2, "members": 3, "readout": "first"}
    assert meta["weights_id"] != json.loads((one / "config.json").read_text())["weights_id"]
