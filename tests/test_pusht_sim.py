"""pusht-sim specifics: prompts and goals, exactness through contacts, fidelity to gym-pusht."""

from __future__ import annotations

import numpy as np
import pytest

from agents.scripted import ScriptedPusher
from arcfab_gym import UnknownPromptError
from arcfab_gym.models.base import ModelState
from arcfab_gym.models.pusht_sim import PushTSim
from arcfab_gym.tasks import pusht
from arcfab_gym.tasks.pusht import PushTEnv


def scripted_run(model: PushTSim, steps: int, seed: int = 0):
    """Drive ``model`` with the scripted pusher; returns (actions, outputs, states before)."""
    policy = ScriptedPusher(np.random.default_rng(seed), noise_px=5.0)
    obs = model.observe()
    actions, outs, states = [], [], []
    for _ in range(steps):
        states.append(model.extract_state())
        a = policy(obs)
        out = model.step(a)
        actions.append(a)
        outs.append(out)
        obs = out.observation
    return np.array(actions), outs, states


@pytest.fixture(scope="module")
def contact_run():
    model = PushTSim()
    model.start(pusht.DEFAULT_PROMPT, seed=11)
    actions, outs, states = scripted_run(model, 150, seed=11)
    return actions, outs, states


def test_prompts_name_at_least_four_distinct_goals():
    goals = {tuple(np.round(pusht.goal_pose(p), 6)) for p in pusht.PROMPTS}
    assert len(pusht.PROMPTS) >= 4 and len(goals) == len(pusht.PROMPTS)
    model = PushTSim()
    obs, _ = model.start("push the T to the left", seed=0)
    np.testing.assert_allclose(obs["goal_pose"], pusht.GOALS["push the T to the left"], rtol=1e-6)
    with pytest.raises(UnknownPromptError, match="valid prompts are"):
        model.start("push the T to the moon", seed=0)


def test_the_scripted_run_exercises_contacts(contact_run):
    _, outs, states = contact_run
    in_contact = [len(s.tensors["physics/arbiters_f"]) for s in states]
    assert sum(n > 0 for n in in_contact) > 30, "the test run must touch the T often"
    assert max(in_contact) >= 2, "and sometimes with two contacts at once"


def test_restore_inside_contacts_is_bit_exact(contact_run):
    actions, outs, states = contact_run
    starts = [k for k, s in enumerate(states) if len(s.tensors["physics/arbiters_f"])][::5]
    assert starts
    for k in starts:
        model = PushTSim()
        model.load_state(states[k])
        for j in range(k, min(k + 30, len(actions))):
            out = model.step(actions[j])
            np.testing.assert_array_equal(out.info["block_pose"], outs[j].info["block_pose"])
            np.testing.assert_array_equal(out.info["agent_pos"], outs[j].info["agent_pos"])
            assert out.reward == outs[j].reward


def test_the_contact_cache_matters(contact_run):
    """Dropping the saved contacts (what a naive copy does) changes the future: the
    warm-start impulses are real state, which is why they are captured."""
    actions, outs, states = contact_run
    diverged = 0
    for k, s in enumerate(states):
        if not len(s.tensors["physics/arbiters_f"]):
            continue
        tensors = dict(s.tensors)
        tensors["physics/arbiters_f"] = tensors["physics/arbiters_f"][:0]
        tensors["physics/arbiters_i"] = tensors["physics/arbiters_i"][:0]
        model = PushTSim()
        model.load_state(ModelState(tensors, dict(s.meta)))
        out = model.step(actions[k])
        diverged += not np.array_equal(out.info["block_pose"], outs[k].info["block_pose"])
    assert diverged > 0


def test_matches_gym_pusht_exactly_until_the_first_contact():
    """Away from contacts pusht-sim is gym-pusht to the last bit (same env class, same
    controller); at contacts it solves with a history-free broad phase (documented)."""
    init = pusht.sample_initial_state(np.random.default_rng(4))
    raw = PushTEnv(obs_type="state")
    raw.reset(options={"reset_to_state": init})
    model = PushTSim()
    model.start(pusht.DEFAULT_PROMPT, seed=4, initial_state=init)
    policy = ScriptedPusher(np.random.default_rng(4), noise_px=0.0, waypoint_prob=0.0)
    obs = model.observe()
    compared = 0
    for _ in range(100):
        a = policy(obs)
        out = model.step(a)
        _, reward, _, _, info = raw.step(pusht.action_to_target(a))
        if info["n_contacts"] or out.info["n_contacts"]:
            break
        np.testing.assert_array_equal(out.info["agent_pos"], info["pos_agent"])
        np.testing.assert_array_equal(out.info["block_pose"], info["block_pose"])
        assert out.reward == pytest.approx(reward, abs=1e-12)
        compared += 1
        obs = out.observation
    assert compared >= 3


def test_set_prompt_changes_goal_and_reward_but_not_history():
    model = PushTSim()
    model.start(pusht.DEFAULT_PROMPT, seed=2, initial_state=np.array([100, 100, 256, 256, 0.0]))
    out = model.step(np.zeros(2))
    assert out.info["coverage"] > 0.2
    frames_before = model.frame_count
    model.set_prompt("push the T to the right")
    state = model.extract_state()
    assert state.meta["coverage"] < out.info["coverage"] / 2
    assert model.frame_count == frames_before
    np.testing.assert_allclose(model.observe()["goal_pose"], pusht.GOALS["push the T to the right"], rtol=1e-6)


def test_action_repeat_and_frame_size():
    model = PushTSim(action_repeat=3, frame_size=64)
    model.start(pusht.DEFAULT_PROMPT, seed=0)
    model.step(np.array([0.5, 0.5]))
    assert model.decode_frame(1).shape == (64, 64, 3)
    other = PushTSim(action_repeat=1)
    with pytest.raises(Exception, match="action_repeat"):
        other.load_state(model.extract_state())
    with pytest.raises(ValueError, match="action_repeat"):
        PushTSim(action_repeat=0)


def test_frames_show_the_current_poses_as_gym_pusht_draws_them():
    """Regression: pymunk draws cached geometry, so a renderer that only sets poses
    drew every frame at the setup pose."""
    model = PushTSim()
    model.start(pusht.DEFAULT_PROMPT, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        model.step(rng.uniform(-1, 1, 2))
    first, last = model.decode_frame(0), model.decode_frame(model.frame_count - 1)
    assert np.abs(first.astype(int) - last.astype(int)).max() > 100
    env = model._env  # gym-pusht's own renderer on the live physics state
    env.observation_width = env.observation_height = model.frame_size
    ref = env._render(visualize=False)
    differing = (np.abs(last.astype(int) - ref.astype(int)).max(-1) > 0).sum()
    assert differing <= 5, f"{differing} pixels differ from gym-pusht's own frame"


@pytest.mark.parametrize("size", [64, 96])
def test_frame_renderer_gives_gym_pusht_own_picture_bit_for_bit(size):
    """The renderer reads the screen's RGB bytes instead of gym-pusht's strided copy (the
    faster path of every collected frame): the same pixels for many poses and goals."""
    renderer = pusht.FrameRenderer(size)
    rng = np.random.default_rng(3)
    for k in range(12):
        agent = rng.uniform(20, 492, 2)
        block = np.r_[rng.uniform(80, 430, 2), rng.uniform(-np.pi, np.pi)]
        goal = pusht.goal_pose(pusht.PROMPTS[k % len(pusht.PROMPTS)])
        frame = renderer.render(agent, block, goal)
        ref = renderer._env._render(visualize=False)  # the same poses, gym-pusht's path
        assert frame.dtype == np.uint8 and frame.shape == (size, size, 3)
        assert np.array_equal(frame, ref), f"pose {k}"
    renderer.close()


def test_batched_coverage_equals_the_scalar_one_bit_for_bit():
    """``pusht.coverages`` (shapely's array calls, for batched rollouts and training
    targets) gives exactly what ``coverage(t_polygon(pose))`` gives, for every goal, at
    and far from it, for small batches (the scalar loop) and large ones."""
    from arcfab_gym.tasks import pusht

    rng = np.random.default_rng(0)
    poses = np.c_[rng.uniform(60, 450, (400, 2)), rng.uniform(-7, 7, 400)]
    for prompt in pusht.PROMPTS:
        goal = pusht.goal_pose(prompt)
        poses[:5] = goal  # exactly on it
        want = np.array([pusht.coverage(pusht.t_polygon(p), goal) for p in poses])
        got = pusht.coverages(poses, goal)
        assert got.dtype == np.float64 and got.shape == (400,)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(pusht.coverages(poses[:3], goal), want[:3])
        assert (want == 0).any() and (want > 0.9).any()
    assert pusht.coverages(np.zeros((0, 3)), goal).shape == (0,)


def test_coverage_bounds_hold_at_and_far_from_every_goal():
    """The centroid-gap bounds that let a step skip shapely: a T that succeeds has its
    centroid within the success gap of the goal's (without the 1 px margin), and a T past
    the overlap gap covers exactly nothing."""
    rng = np.random.default_rng(3)
    for prompt in pusht.PROMPTS:
        goal = pusht.goal_pose(prompt)
        near = goal + np.c_[rng.normal(0, 4, (600, 2)), rng.normal(0, 0.05, 600)]
        far = np.c_[rng.uniform(0, 512, (600, 2)), rng.uniform(-7, 7, 600)]
        poses = np.r_[near, far]
        cov = pusht.coverages(poses, goal)
        gap = np.array([pusht.centroid_gap(p, goal) for p in poses])
        success = cov > pusht.SUCCESS_THRESHOLD
        assert success.sum() > 20 and (~success).sum() > 20
        assert gap[success].max() < pusht.SUCCESS_GAP_PX - 1.0
        apart = gap > pusht.OVERLAP_GAP_PX
        assert apart.sum() > 20 and (cov[apart] == 0.0).all()
        assert (cov[gap < pusht.OVERLAP_GAP_PX - 40] > 0).any()
    # A turned T about the same centroid: the gap is 0, whatever the angle.
    pose = np.array([200.0, 300.0, 0.0])
    centre = pusht.T_CENTROID + pose[:2]
    c, s = np.cos(1.0), np.sin(1.0)
    turned = [*(centre - np.array([c * pusht.T_CENTROID[0] - s * pusht.T_CENTROID[1],
                                   s * pusht.T_CENTROID[0] + c * pusht.T_CENTROID[1]])), 1.0]
    assert pusht.centroid_gap(turned, pose) == pytest.approx(0.0, abs=1e-9)


def test_advance_is_a_loop_of_gym_pusht_steps_bit_for_bit():
    """``advance`` (floats for pymunk's Vec2d, coverage only where success is possible)
    leaves the world and returns what a loop of gym-pusht's own ``step`` does, stopping at
    the same step when the T reaches its goal mid-frame."""
    from arcfab_gym.models.pusht_sim import _CanonicalPushT

    early_stops = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        prompt = pusht.PROMPTS[seed % len(pusht.PROMPTS)]
        goal = pusht.goal_pose(prompt)
        # Even seeds start on the goal (success at the first control step), odd ones near it.
        block = goal + (seed % 2) * np.r_[rng.normal(0, 12, 2), rng.normal(0, 0.15)]
        init = pusht.state_for_pose(block[:2] + rng.uniform(-90, 90, 2), block)
        envs = [_CanonicalPushT(obs_type="state") for _ in range(2)]
        for env in envs:
            env.reset(options={"reset_to_state": init})
            env.goal_pose = goal
        policy = ScriptedPusher(rng, noise_px=3.0)
        fast, slow = envs
        for _ in range(40):
            obs = {"agent_pos": np.array(slow.agent.position),
                   "block_pose": np.array([*slow.block.position, slow.block.angle]),
                   "goal_pose": goal}  # fmt: skip
            target = pusht.action_to_target(policy(obs))
            got = fast.advance(target, 4)
            contacts, taken = 0, 0
            for _ in range(4):
                _, _, terminated, _, info = PushTEnv.step(slow, target)
                contacts, taken = contacts + int(info["n_contacts"]), taken + 1
                if terminated:
                    break
            early_stops += taken < 4
            assert got == (info["coverage"], bool(info["is_success"]), contacts)
            for a, b in ((fast.agent, slow.agent), (fast.block, slow.block)):
                assert (*a.position, *a.velocity, a.angle, a.angular_velocity) == (
                    *b.position, *b.velocity, b.angle, b.angular_velocity)
    assert early_stops >= 1, "some frame must end in success before its last step"
