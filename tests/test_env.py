"""ArcFabric-v0 as a gymnasium environment: checkers, spaces, ALE-style cloning, SB3."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import arcfab_gym
from arcfab_gym import InvalidActionError, Session, UnknownPromptError
from arcfab_gym.envs import DiscreteRelativeMoves
from arcfab_gym.tasks import pusht

ENV_IDS = ["ArcFabric-v0", "ArcFabric-PushTSim-v0"]


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("pixels", [False, True])
def test_gymnasium_and_sb3_checkers_pass(env_id, pixels):
    env = gym.make(env_id, pixels=pixels, render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning is a failure
        gym_check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
    env.close()


def test_registration_forms_and_spec():
    env = gym.make("arcfab_gym:ArcFabric-v0")
    # mini-dreamzero's frame is 4 control steps: the same 30 s as gym-pusht's 300 steps.
    assert env.spec.max_episode_steps == pusht.MAX_EPISODE_STEPS // 4
    assert env.spec.kwargs["backend"] == "mini-dreamzero"
    # The clock lives in the env (no TimeLimit): the registered limit is an env argument.
    assert gym.spec("ArcFabric-PushTSim-v0").kwargs["max_episode_frames"] == pusht.MAX_EPISODE_STEPS
    assert isinstance(env.unwrapped.fabric, Session)
    assert env.unwrapped.prompts == pusht.PROMPTS
    assert env.action_space == gym.spaces.Box(-1, 1, (2,), np.float32)
    env.close()
    assert gym.spec("ArcFabric-PushTSim-v0").kwargs["backend"] == "pusht-sim"


def test_step_types_and_fresh_objects():
    env = gym.make("ArcFabric-v0")
    obs, info = env.reset(seed=0)
    obs2, reward, terminated, truncated, info2 = env.step(np.zeros(2, np.float32))
    assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
    assert info2 is not info
    obs2["agent_pos"][:] = -1.0  # a caller scribbling on the arrays ...
    info2["block_pose"][:] = -1.0
    obs3, *_ , info3 = env.step(np.zeros(2, np.float32))
    assert np.all(obs3["agent_pos"] > 0) and np.all(info3["block_pose"][:2] > 0)  # ... harms nothing
    env.close()


def test_episode_truncates_at_the_time_limit():
    env = gym.make("ArcFabric-v0", max_episode_steps=5)
    env.reset(seed=0)
    flags = [env.step(np.zeros(2, np.float32))[3] for _ in range(5)]
    assert flags == [False] * 4 + [True]


def test_seeded_resets_are_reproducible_and_prompts_apply():
    env = gym.make("ArcFabric-v0")
    a, _ = env.reset(seed=42)
    b, _ = env.reset(seed=42)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c, _ = env.reset(seed=42, options={"prompt": "push the T up"})
    np.testing.assert_allclose(c["goal_pose"], pusht.GOALS["push the T up"], rtol=1e-6)
    init = [100.0, 100.0, 300.0, 300.0, 0.5]
    d, _ = env.reset(options={"initial_state": init})
    np.testing.assert_allclose(d["agent_pos"], init[:2], atol=1.0)
    with pytest.raises(UnknownPromptError, match="valid prompts"):
        env.reset(options={"prompt": "fly"})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"promt": "typo"})
    with pytest.raises(UnknownPromptError):
        gym.make("ArcFabric-v0", prompt="fly")
    env.close()


@pytest.mark.parametrize(
    "bad", [np.zeros(3), np.array([np.nan, 0.0]), np.array([2.0, 0.0])], ids=["shape", "nan", "range"]
)
def test_bad_actions_raise_clear_errors(bad):
    env = gym.make("ArcFabric-v0")
    env.reset(seed=0)
    with pytest.raises(InvalidActionError):
        env.step(bad)
    env.close()


def rollout(env, actions):
    out = []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append((obs, r, term, info["block_pose"]))
    return out


def assert_same(a, b):
    for (o1, r1, t1, b1), (o2, r2, t2, b2) in zip(a, b, strict=True):
        assert r1 == r2 and t1 == t2
        np.testing.assert_array_equal(b1, b2)
        for k in o1:
            np.testing.assert_array_equal(o1[k], o2[k])


def test_clone_restore_state_is_bit_exact_and_pickles():
    env = gym.make("ArcFabric-v0", pixels=True)
    env.reset(seed=1)
    actions = np.random.default_rng(0).uniform(-1, 1, (40, 2)).astype(np.float32)
    rollout(env, actions[:10])
    state = env.unwrapped.clone_state()
    expected = rollout(env, actions[10:])
    env.unwrapped.restore_state(pickle.loads(pickle.dumps(state)))
    assert_same(rollout(env, actions[10:]), expected)
    assert env.unwrapped.fabric.frame_index == 40
    env.close()


def _restore_in_child(payload: bytes, actions: np.ndarray) -> list:
    import arcfab_gym  # noqa: F401 - registers the envs in the fresh process

    env = gym.make("ArcFabric-v0", pixels=True)
    env.reset(seed=123)  # a different episode, overwritten by the restore
    env.unwrapped.restore_state(pickle.loads(payload))
    return [(o, r, t, b) for o, r, t, b in rollout(env, actions)]


def test_clone_state_crosses_a_process_boundary():
    env = gym.make("ArcFabric-v0", pixels=True)
    env.reset(seed=2)
    actions = np.random.default_rng(1).uniform(-1, 1, (15, 2)).astype(np.float32)
    rollout(env, actions[:5])
    payload = pickle.dumps(env.unwrapped.clone_state())
    expected = rollout(env, actions[5:])
    with mp.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_restore_in_child, (payload, actions[5:]))
    assert_same(got, expected)
    env.close()


def test_clone_state_rng_controls_the_next_reset():
    env = gym.make("ArcFabric-v0")
    env.reset(seed=5)
    with_rng = env.unwrapped.clone_state(include_rng=True)
    without_rng = env.unwrapped.clone_state(include_rng=False)
    first, _ = env.reset()
    env.unwrapped.restore_state(with_rng)
    again, _ = env.reset()
    np.testing.assert_array_equal(first["block_pose"], again["block_pose"])
    env.unwrapped.restore_state(without_rng)
    third, _ = env.reset()
    assert not np.array_equal(third["block_pose"], first["block_pose"])
    with pytest.raises(TypeError, match="WorldStateSnapshot"):
        env.unwrapped.restore_state({"not": "a state"})
    env.close()


def test_fabric_is_reachable_and_records_the_tree(tmp_path):
    env = gym.make("ArcFabric-v0", max_snapshot_bytes=10_000, spill_dir=str(tmp_path))
    env.reset(seed=0)
    fabric = env.unwrapped.fabric
    assert fabric.state_manager.max_bytes == 10_000
    for _ in range(5):
        env.step(env.action_space.sample())
    cid = fabric.checkpoint()
    branch = fabric.fork(cid, new_prompt="push the T to the left")
    branch.step(np.zeros(2))
    assert len(fabric.tree.nodes) == 3  # root, checkpoint, fork
    env.close()
    env.close()  # closing twice is safe


def test_render_returns_the_frame():
    env = gym.make("ArcFabric-PushTSim-v0", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.shape == (96, 96, 3)
    assert (frame == 255).mean() > 0.3  # a mostly white workspace with the T on it
    env.close()
    env = gym.make("ArcFabric-v0", render_mode="rgb_array")  # the model's decoded frame
    env.reset(seed=0)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="render_mode"):
        arcfab_gym.ArcFabricEnv(render_mode="ansi")
    env.close()


def test_discrete_relative_moves_wrapper():
    env = DiscreteRelativeMoves(gym.make("ArcFabric-PushTSim-v0"), step_px=30.0)
    assert env.action_space == gym.spaces.Discrete(9)
    obs, _ = env.reset(seed=3)
    start = obs["agent_pos"].copy()
    for _ in range(6):
        obs, *_ = env.step(1)  # +x
    assert obs["agent_pos"][0] > start[0] + 60 and abs(obs["agent_pos"][1] - start[1]) < 10
    with pytest.raises(ValueError, match="Discrete|int in"):
        env.step(9)
    env.close()


def test_ppo_multi_input_policy_trains_for_2048_steps():
    from stable_baselines3 import PPO

    env = gym.make("ArcFabric-PushTSim-v0")
    model = PPO("MultiInputPolicy", env, n_steps=512, batch_size=128, n_epochs=2, seed=0, device="cpu")
    model.learn(total_timesteps=2048)
    assert model.num_timesteps >= 2048
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(action.astype(np.float32))
    env.close()


def test_public_names():
    for name in ["WorldStateSnapshot", "StateManager", "Session", "TrajectoryTree",
                 "create_world_model", "list_world_models"]:  # fmt: skip
        assert hasattr(arcfab_gym, name)
