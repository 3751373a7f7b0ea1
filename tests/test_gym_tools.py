"""The episode clock in the env's own state, and gymnasium's own tools on both envs.

ALE keeps the frame counter inside the state it clones; so do ``ArcFabric-v0`` and
``ArcFabric-PushTSim-v0``: ``restore_state`` gives back the time left in the episode.
Then gymnasium's vector envs, ``RecordEpisodeStatistics`` and ``RecordVideo``, and SB3's
``TimeLimit.truncated`` convention, each checked on what it returns.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import arcfab_gym  # noqa: F401 - registers the envs
from arcfab_gym.tasks import pusht

ENV_IDS = ["ArcFabric-v0", "ArcFabric-PushTSim-v0"]
LIMITS = {"ArcFabric-v0": pusht.MAX_EPISODE_STEPS // 4,
          "ArcFabric-PushTSim-v0": pusht.MAX_EPISODE_STEPS}  # fmt: skip
ZERO = np.zeros(2, np.float32)


def wrappers_of(env) -> list[type]:
    out = []
    while isinstance(env, gym.Wrapper):
        out.append(type(env))
        env = env.env
    return out


def steps_until_truncated(env, cap: int = 1000) -> int:
    for n in range(1, cap + 1):
        _, _, terminated, truncated, _ = env.step(ZERO)
        assert not terminated  # holding still from these seeds never reaches the goal
        if truncated:
            return n
    raise AssertionError("never truncated")


# --- the episode clock ------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_restore_state_restores_the_time_left(env_id):
    """The issue's scenario: step, clone, run to the end, restore: the same steps are left."""
    env = gym.make(env_id)
    limit = LIMITS[env_id]
    assert gym.wrappers.TimeLimit not in wrappers_of(env)  # no counter outside the state
    assert env.spec.max_episode_steps == limit  # still readable where users look
    env.reset(seed=0)
    taken = limit - 55
    for _ in range(taken):
        assert not env.step(ZERO)[3]
    state = env.unwrapped.clone_state()
    assert env.unwrapped.elapsed_steps == taken
    assert steps_until_truncated(env) == 55
    env.unwrapped.restore_state(state)
    assert env.unwrapped.elapsed_steps == taken
    assert steps_until_truncated(env) == 55
    # Stepping on past the limit keeps reporting truncation, as TimeLimit does.
    assert env.step(ZERO)[3]
    # A new episode starts the clock again.
    env.reset(seed=1)
    assert env.unwrapped.elapsed_steps == 0
    env.close()


def test_rewind_and_fabric_restore_move_the_clock_too():
    env = gym.make("ArcFabric-PushTSim-v0", max_episode_frames=10)
    env.reset(seed=0)
    fabric = env.unwrapped.fabric
    for _ in range(4):
        env.step(ZERO)
    cid = fabric.checkpoint()
    for _ in range(5):
        assert not env.step(ZERO)[3]
    fabric.rewind(3)  # back to frame 6: four steps left
    assert [env.step(ZERO)[3] for _ in range(4)] == [False] * 3 + [True]
    fabric.restore(cid)  # frame 4: six steps left
    assert steps_until_truncated(env) == 6
    env.close()


def test_the_limit_is_an_env_argument_and_is_validated():
    env = gym.make("ArcFabric-PushTSim-v0", max_episode_frames=3)
    assert env.spec.max_episode_steps == 3
    env.reset(seed=0)
    assert [env.step(ZERO)[3] for _ in range(3)] == [False, False, True]
    env.close()
    free = arcfab_gym.ArcFabricEnv(backend="pusht-sim")  # built directly: no limit
    assert free.max_episode_frames is None and free.spec is None
    free.reset(seed=0)
    assert not any(free.step(ZERO)[3] for _ in range(400))
    free.close()
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_episode_frames"):
            arcfab_gym.ArcFabricEnv(backend="pusht-sim", max_episode_frames=bad)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_checkers_pass_on_the_made_env_with_its_clock(env_id):
    env = gym.make(env_id, max_episode_frames=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
    env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_time_limit_truncated_convention(env_id):
    """SB3's VecEnv marks a truncation ``TimeLimit.truncated`` and keeps the last
    observation in ``terminal_observation`` before resetting."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([lambda: Monitor(gym.make(env_id, max_episode_frames=3))])
    venv.seed(0)
    first = venv.reset()
    for t in range(3):
        obs, rewards, dones, infos = venv.step(np.zeros((1, 2), np.float32))
    assert dones.tolist() == [True]
    info = infos[0]
    assert info["TimeLimit.truncated"] is True
    assert info["episode"]["l"] == 3
    assert set(info["terminal_observation"]) == set(first)
    # The returned observation is the next episode's first one (the clock restarted).
    assert venv.envs[0].unwrapped.elapsed_steps == 0
    venv.close()


# --- gymnasium's vector envs -------------------------------------------------------------
def _rollout_vec(envs, n_steps: int):
    obs, infos = envs.reset(seed=[10, 11])
    out = [obs]
    flags = []
    for _ in range(n_steps):
        obs, rewards, terminated, truncated, infos = envs.step(np.zeros((2, 2), np.float32))
        out.append(obs)
        flags.append((rewards.copy(), terminated.copy(), truncated.copy()))
    return out, flags


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_make_vec_sync_and_async_agree_with_single_envs(env_id):
    kwargs = {"max_episode_frames": 3}
    results = {}
    for mode in ("sync", "async"):
        envs = gym.make_vec(env_id, num_envs=2, vectorization_mode=mode, **kwargs)
        assert envs.num_envs == 2
        assert envs.single_observation_space == gym.make(env_id).observation_space
        assert envs.observation_space["block_pose"].shape == (2, 3)
        results[mode] = _rollout_vec(envs, 4)
        envs.close()
    sync_obs, sync_flags = results["sync"]
    async_obs, async_flags = results["async"]
    for a, b in zip(sync_obs, async_obs, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for (r1, te1, tr1), (r2, te2, tr2) in zip(sync_flags, async_flags, strict=True):
        np.testing.assert_array_equal(r1, r2)
        assert te1.tolist() == te2.tolist() and tr1.tolist() == tr2.tolist()
    # Truncated together on the third step, by the envs' own clocks.
    assert [tr.tolist() for _, _, tr in sync_flags[:3]] == [[False] * 2] * 2 + [[True] * 2]
    # Each sub-env equals a single env with the same seed.
    for i, seed in enumerate((10, 11)):
        env = gym.make(env_id, **kwargs)
        obs, _ = env.reset(seed=seed)
        np.testing.assert_array_equal(obs["block_pose"], sync_obs[0]["block_pose"][i])
        for t in range(3):
            obs, r, *_ = env.step(ZERO)
            np.testing.assert_array_equal(obs["block_pose"], sync_obs[t + 1]["block_pose"][i])
            assert r == sync_flags[t][0][i]
        env.close()


# --- gymnasium's recording wrappers -------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_record_episode_statistics(env_id):
    env = gym.wrappers.RecordEpisodeStatistics(gym.make(env_id, max_episode_frames=5))
    env.reset(seed=0)
    rewards, info = [], {}
    for _ in range(5):
        _, r, terminated, truncated, info = env.step(env.action_space.sample())
        rewards.append(r)
    assert truncated and not terminated
    assert info["episode"]["l"] == 5
    assert info["episode"]["r"] == pytest.approx(sum(rewards))
    assert info["episode"]["t"] >= 0.0
    assert list(env.length_queue) == [5]
    env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_record_video_writes_the_rendered_episode(env_id, tmp_path):
    pytest.importorskip("moviepy", reason="RecordVideo needs moviepy (the dev extra)")
    from moviepy import VideoFileClip

    env = gym.make(env_id, render_mode="rgb_array", max_episode_frames=6)
    folder = tmp_path / "videos"  # a new folder (RecordVideo warns on an existing one)
    env = gym.wrappers.RecordVideo(env, str(folder), episode_trigger=lambda k: True,
                                   name_prefix="clip")  # fmt: skip
    env.reset(seed=0)
    first = env.render()
    for _ in range(6):
        env.step(ZERO)
    env.close()
    videos = sorted(folder.glob("clip-episode-0.mp4"))
    assert videos, sorted(p.name for p in folder.iterdir())
    clip = VideoFileClip(str(videos[0]))
    try:
        side = first.shape[0]
        assert tuple(clip.size) == (side, side)
        assert clip.fps == env.metadata["render_fps"]
        assert round(clip.duration * clip.fps) == 7  # the reset frame and six steps
        # The first frame is the env's own picture (up to the codec's loss).
        decoded = clip.get_frame(0).astype(np.float64)
        assert np.abs(decoded - first.astype(np.float64)).mean() < 12.0
    finally:
        clip.close()
