"""mini-dreamzero's task-state token: its layout, the state map the video reads, the
state in the snapshot, observation and reward read from it, and state injection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arcfab_gym import Session, StateMismatchError, WorldStateSnapshot
from arcfab_gym.models.base import ModelState
from arcfab_gym.models.mini_dreamzero import features
from arcfab_gym.models.mini_dreamzero.backend import STATE_VERSION, MiniDreamZero, Weights
from arcfab_gym.tasks import pusht

P0 = pusht.DEFAULT_PROMPT


pytestmark = pytest.mark.usefixtures("one_thread")


def test_state_layout_round_trips():
    rng = np.random.default_rng(0)
    agent = rng.uniform(0, 512, size=(50, 2))
    block = np.concatenate([rng.uniform(0, 512, size=(50, 2)), rng.uniform(0, 2 * np.pi, (50, 1))], 1)
    s = features.state_from_poses(agent, block)
    assert s.shape == (50, features.STATE_DIM) and s.dtype == np.float32
    a2, b2 = features.poses_from_state(s)
    np.testing.assert_allclose(a2, agent, atol=1e-3)
    np.testing.assert_allclose(b2[:, :2], block[:, :2], atol=1e-3)
    np.testing.assert_allclose(pusht.wrap_angle(b2[:, 2] - block[:, 2]), 0.0, atol=1e-5)


def test_delta_target_and_apply_delta_are_inverse():
    rng = np.random.default_rng(1)
    now = torch.from_numpy(features.state_from_poses(
        rng.uniform(50, 450, (64, 2)), np.c_[rng.uniform(100, 400, (64, 2)), rng.uniform(0, 6.28, 64)]))
    nxt = torch.from_numpy(features.state_from_poses(
        rng.uniform(50, 450, (64, 2)), np.c_[rng.uniform(100, 400, (64, 2)), rng.uniform(0, 6.28, 64)]))
    back = features.apply_delta(now, features.delta_target(now, nxt))
    torch.testing.assert_close(back, nxt, atol=1e-5, rtol=0)
    # The T's displacement is expressed in its own frame: turning the scene turns nothing.
    zero = features.delta_target(now, now)
    assert torch.count_nonzero(zero.abs() > 1e-6) == 0


def test_state_map_draws_the_t_where_the_renderer_does():
    """The map the video is conditioned on lies on the frame's pixel grid: the T drawn
    from the pose overlaps the T that gym-pusht's renderer draws."""
    from experiments.evaluate_world_model import mask_iou, t_mask_at_pose, t_mask_from_frame

    renderer = pusht.FrameRenderer(64)
    rng = np.random.default_rng(2)
    try:
        for _ in range(5):
            agent = rng.uniform(50, 460, 2)
            block = np.r_[rng.uniform(120, 390, 2), rng.uniform(0, 2 * np.pi)]
            frame = renderer.render(agent, block, pusht.goal_pose(P0))
            assert mask_iou(t_mask_from_frame(frame), t_mask_at_pose(block, 64)) > 0.75
            # ... and not where it is not: a pose 60 px off overlaps little.
            off = block + np.array([60.0, 0.0, 0.0])
            assert mask_iou(t_mask_from_frame(frame), t_mask_at_pose(off, 64)) < 0.3
            smap = features.state_map(torch.from_numpy(features.state_from_poses(agent, block))[None])
            assert smap.shape == (1, features.MAP_CHANNELS, features.MAP_SIZE, features.MAP_SIZE)
            disc_area = smap[0, 1].sum().item() * (512 / features.MAP_SIZE) ** 2
            assert disc_area == pytest.approx(np.pi * 15.0**2, rel=0.25)
    finally:
        renderer.close()


def test_state_maps_are_each_states_own_in_any_batch():
    """Large batches are rasterised in chunks (``features._MAP_CHUNK``): a batch's maps are
    the bits each state gets alone, so the chunking changes no training target."""
    rng = np.random.default_rng(5)
    n = 2 * features._MAP_CHUNK + 37
    state = torch.from_numpy(features.state_from_poses(
        rng.uniform(20, 492, (n, 2)), np.c_[rng.uniform(80, 430, (n, 2)), rng.uniform(-3.2, 3.2, n)]))
    maps = features.state_map(state)
    assert maps.shape == (n, features.MAP_CHANNELS, features.MAP_SIZE, features.MAP_SIZE)
    for i in (0, features._MAP_CHUNK - 1, features._MAP_CHUNK, n - 1):
        assert torch.equal(maps[i], features.state_map(state[i : i + 1])[0]), i
    assert torch.equal(maps[: features._MAP_CHUNK], features._state_map(state[: features._MAP_CHUNK], features.MAP_SIZE))


def test_observation_and_reward_read_the_predicted_state(tiny_model):
    m = tiny_model
    for a in np.random.default_rng(3).uniform(-1, 1, (4, 2)).astype(np.float32):
        out = m.step(a)
        task = m.extract_state().tensors["task_state"]
        agent, block = features.poses_from_state(task[-1].numpy())
        np.testing.assert_allclose(out.observation["agent_pos"], agent, rtol=0, atol=1e-3)
        np.testing.assert_allclose(out.observation["block_pose"], block, rtol=0, atol=1e-3)
        # Coverage: the task's own geometry on the predicted pose, as pusht-sim computes it.
        cov = pusht.coverage(pusht.t_polygon(block), pusht.goal_pose(P0))
        assert out.info["coverage"] == pytest.approx(cov, abs=1e-6)
        assert out.reward == pytest.approx(pusht.reward_from_coverage(cov), abs=1e-6)
        assert out.terminated == (cov > pusht.SUCCESS_THRESHOLD)
        assert 0.0 <= out.info["coverage_head"] <= 1.0  # kept as a diagnostic


def test_the_state_is_fed_back_and_conditions_the_video(tiny_weights_dir):
    """Injecting another T pose changes the next predicted state and the next latent."""
    def next_after(inject):
        m = MiniDreamZero(weights_dir=tiny_weights_dir)
        m.start(P0, seed=0)
        m.step(np.array([0.1, 0.2], np.float32))
        if inject is not None:
            m.inject_state(block_pose=inject)
        out = m.step(np.array([0.1, 0.2], np.float32))
        return out, m.latent(m.frame_count - 1).clone()

    base, z_base = next_after(None)
    moved, z_moved = next_after(np.array([150.0, 350.0, 1.0]))
    assert not np.allclose(base.observation["block_pose"], moved.observation["block_pose"])
    assert not torch.equal(z_base, z_moved)


def test_inject_state_and_resync_set_the_state(tiny_model):
    m = tiny_model
    m.step(np.array([0.0, 0.0], np.float32))
    z = m.latent(m.frame_count - 1).clone()
    m.inject_state(agent_pos=[100.0, 120.0], block_pose=[300.0, 310.0, 0.5])
    obs = m.observe()
    np.testing.assert_allclose(obs["agent_pos"], [100.0, 120.0], atol=1e-3)
    np.testing.assert_allclose(obs["block_pose"], [300.0, 310.0, 0.5], atol=1e-3)
    assert torch.equal(m.latent(m.frame_count - 1), z)  # the latent is kept
    # A part left out keeps what was there.
    m.inject_state(agent_pos=[200.0, 220.0])
    np.testing.assert_allclose(m.observe()["block_pose"], [300.0, 310.0, 0.5], atol=1e-3)
    # resync takes the real state with the real frame.
    frame = m.decode_frame(0)
    m.resync(frame=frame, agent_pos=[50.0, 60.0], block_pose=[256.0, 256.0, 3.0])
    obs = m.observe()
    np.testing.assert_allclose(obs["block_pose"], [256.0, 256.0, 3.0], atol=1e-3)
    with pytest.raises(ValueError, match="block_pose"):
        m.inject_state(block_pose=[1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="block_pose"):
        m.resync(frame=frame, block_pose=[1.0, 2.0])
    np.testing.assert_allclose(m.observe()["block_pose"], [256.0, 256.0, 3.0], atol=1e-3)


def test_session_inject_state_is_a_new_history_entry(tiny_model):
    s = Session(tiny_model)
    s.reset(prompt=P0, seed=0)
    s.step(np.array([0.3, -0.2], np.float32))
    cid = s.checkpoint()
    before = s.model.observe()["block_pose"].copy()
    s.inject_state(block_pose=[200.0, 200.0, 1.0])
    np.testing.assert_allclose(s.model.observe()["block_pose"], [200.0, 200.0, 1.0], atol=1e-3)
    s.restore(cid)
    np.testing.assert_array_equal(s.model.observe()["block_pose"], before)


def test_state_token_is_in_the_snapshot_and_restores_bit_exactly(tiny_model, tmp_path):
    m = tiny_model
    for a in np.random.default_rng(4).uniform(-1, 1, (3, 2)).astype(np.float32):
        m.step(a)
    state = m.extract_state()
    task = state.tensors["task_state"]
    assert task.dtype == torch.float32 and tuple(task.shape) == (m.frame_count, features.STATE_DIM)
    # With the action that led to each frame (the pusher's velocity follows from it); the
    # first frame's is the resting action, the pusher's own position.
    led = state.tensors["task_action"]
    assert tuple(led.shape) == (m.frame_count, 2)
    torch.testing.assert_close(led[0], task[0, 0:2])
    assert state.meta["state_version"] == STATE_VERSION
    path = WorldStateSnapshot.from_model(m).save(tmp_path / "s.safetensors")
    actions = np.random.default_rng(5).uniform(-1, 1, (4, 2)).astype(np.float32)
    first = [m.step(a).observation["block_pose"].copy() for a in actions]
    m.load_state(WorldStateSnapshot.load(path).model_state)
    again = [m.step(a).observation["block_pose"].copy() for a in actions]
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y, strict=True)


def test_a_state_from_before_the_state_token_is_refused_by_version(tiny_model):
    state = tiny_model.extract_state()
    old = ModelState(
        {k: v for k, v in state.tensors.items() if k != "task_state"},
        {**state.meta, "state_version": 2},
    )
    with pytest.raises(StateMismatchError, match="state version 2.*before the task-state token"):
        tiny_model.load_state(old)
    with pytest.raises(StateMismatchError, match="lacks.*task_state"):
        tiny_model.load_state(ModelState(old.tensors, dict(state.meta)))


def test_weights_without_state_dynamics_get_a_clear_error(tiny_weights_dir, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_weights_dir, old)
    meta = json.loads((old / "config.json").read_text())
    del meta["state_dynamics"]
    (old / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="predate the task-state token"):
        Weights.load(old)


@pytest.mark.parametrize("policy, share_k8", [("poke", 0.5), ("jump", 0.75)])
def test_shipped_state_dynamics_predicts_pushes_better_than_holding_still(policy, share_k8):
    """The shipped weights on pokes at the T and on a sampling planner's fast jumps, from
    seeds far from the training range: open loop the T lands within half of copy-last's
    error 4 frames ahead (8 frames: half for pokes; the jumps' shoves, 0.6x today, within
    0.75x), and the pusher is exact (kinematic in gym-pusht, linear in the inputs). Fails
    for weights that do not model contact (the linear path alone: 0.8x)."""
    from experiments.collect import CollectConfig, collect_episode
    from experiments.train_world_model import _open_loop_errors, _state_arrays

    cfg = CollectConfig(frames=12, random_policy_fraction=0.0, seed=5_000_000,
                        poke_policy_fraction=float(policy == "poke"),
                        jump_policy_fraction=float(policy == "jump"))
    eps = [collect_episode(cfg, i) for i in range(12)]
    data = _state_arrays({k: np.stack([e[k] for e in eps]) for k in ("agent_pos", "block_pose", "actions")})
    errs = _open_loop_errors(Weights.load().state_net, data, horizons=(4, 8))
    for k, share in ((4, 0.5), (8, share_k8)):
        assert errs[f"block_px/k{k}"] < share * errs[f"copy_last_block_px/k{k}"], errs
        assert errs[f"pusher_px/k{k}"] < 0.01, errs
