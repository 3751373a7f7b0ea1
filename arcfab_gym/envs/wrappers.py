"""Wrappers over ``ArcFabric-v0``: a small discrete action set for tree search."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from arcfab_gym.tasks import pusht


def _aim_from_pusher(env: gym.Env, offset_px: np.ndarray) -> np.ndarray:
    """The env action aiming the pusher ``offset_px`` from where it is, kept on the table."""
    agent = env.unwrapped.fabric.observe()["agent_pos"].astype(np.float64)
    return pusht.target_to_action(np.clip(agent + offset_px, 0.0, pusht.WORLD_SIZE))


class DiscreteRelativeMoves(gym.ActionWrapper):
    """Discrete actions that move the pusher's target relative to where the pusher is.

    Action 0 holds the pusher in place; actions ``1..n_directions`` aim ``step_px`` pixels
    away at evenly spaced headings (1 = +x, counter-clockwise in the picture's axes). The
    target is kept inside the workspace, so every discrete action is a valid continuous
    one.
    """

    def __init__(self, env: gym.Env, *, step_px: float = 24.0, n_directions: int = 8):
        super().__init__(env)
        if n_directions < 1:
            raise ValueError(f"n_directions must be >= 1, got {n_directions}")
        if not step_px > 0:
            raise ValueError(f"step_px must be > 0, got {step_px}")
        self.step_px = float(step_px)
        angles = np.arange(n_directions) * (2 * np.pi / n_directions)
        # [n_actions, 2]: row 0 is "stay".
        self.offsets = np.concatenate(
            [np.zeros((1, 2)), self.step_px * np.stack([np.cos(angles), -np.sin(angles)], 1)]
        )
        self.action_space = spaces.Discrete(len(self.offsets))

    def action(self, action: int) -> np.ndarray:
        if not self.action_space.contains(action):
            raise ValueError(
                f"action must be an int in [0, {self.action_space.n}), got {action!r}"
            )
        return _aim_from_pusher(self.env, self.offsets[int(action)])


class RelativeTargets(gym.ActionWrapper):
    """Continuous actions relative to the pusher: ``a`` in ``[-1, 1]^2`` aims the pusher
    ``a * max_step_px`` pixels away from where it is (clipped to the workspace).

    Absolute targets make a young policy's exploration jump the pusher across the table
    every step; relative ones explore locally and make "stay" the zero action, which
    suits on-policy learners (the continuous sibling of :class:`DiscreteRelativeMoves`).
    """

    def __init__(self, env: gym.Env, *, max_step_px: float = 48.0):
        super().__init__(env)
        if not max_step_px > 0:
            raise ValueError(f"max_step_px must be > 0, got {max_step_px}")
        self.max_step_px = float(max_step_px)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

    def step(self, action):
        """The wrapped env's step; ``info["applied_action"]`` is the absolute action the
        env received (replaying those elsewhere reproduces the targets exactly)."""
        applied = self.action(action)
        obs, reward, terminated, truncated, info = self.env.step(applied)
        return obs, reward, terminated, truncated, {**info, "applied_action": applied}

    def action(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 2 finite numbers, got {action!r}")
        return _aim_from_pusher(self.env, self.max_step_px * np.clip(action, -1.0, 1.0))


class PushTFeatures(gym.ObservationWrapper):
    """A flat, scaled feature vector for MLP policies (stable-baselines3's ``MlpPolicy``).

    ``[agent x, y, T x, y, cos, sin of the T's angle, T - goal x, y, cos, sin of the angle
    to the goal]``: positions divided by the 512 px workspace, angles as unit vectors so
    that 0 and 2 pi look alike. Read from the observation any backend returns, so a policy
    trained inside a learned model runs unchanged in the real Push-T.
    """

    N_FEATURES = 10

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = spaces.Box(
            -2.0, 2.0, shape=(self.N_FEATURES,), dtype=np.float32
        )

    def observation(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        agent = np.asarray(observation["agent_pos"], dtype=np.float64) / pusht.WORLD_SIZE
        block = np.asarray(observation["block_pose"], dtype=np.float64)
        goal = np.asarray(observation["goal_pose"], dtype=np.float64)
        to_goal = (block[:2] - goal[:2]) / pusht.WORLD_SIZE
        d_angle = block[2] - goal[2]
        features = np.concatenate([
            agent, block[:2] / pusht.WORLD_SIZE, [np.cos(block[2]), np.sin(block[2])],
            to_goal, [np.cos(d_angle), np.sin(d_angle)],
        ])  # fmt: skip
        return np.clip(features, -2.0, 2.0).astype(np.float32)


class PushTReward(gym.Wrapper):
    """Choose the reward an agent trains on:

    * ``"coverage"``: the task's own;
    * ``"shaped"``: :func:`arcfab_gym.tasks.pusht.shaped_reward`, coverage minus the
      distances still to go (a cost every step);
    * ``"progress"``: coverage plus ``progress_scale`` x the step's change of
      :func:`~arcfab_gym.tasks.pusht.progress_potential` (potential-based shaping: it
      rewards each step's progress and leaves the optimal policy unchanged).

    Either way the task's reward stays in ``info["coverage_reward"]``, and
    ``info["is_success"]`` (stable-baselines3's success key) says whether the episode ended
    on the goal. Wrap before :class:`PushTFeatures`: it reads the dict observation.
    """

    KINDS = ("coverage", "shaped", "progress")

    def __init__(self, env: gym.Env, kind: str = "shaped", *, progress_scale: float = 10.0):
        super().__init__(env)
        if kind not in self.KINDS:
            raise ValueError(f"reward kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.progress_scale = float(progress_scale)
        self._potential = 0.0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._potential = pusht.progress_potential(obs)
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)
        info["coverage_reward"] = float(reward)
        info.setdefault("is_success", bool(terminated))
        if self.kind == "shaped":
            reward = pusht.shaped_reward(reward, obs)
        elif self.kind == "progress":
            potential = pusht.progress_potential(obs)
            reward = reward + self.progress_scale * (potential - self._potential)
            self._potential = potential
        return obs, float(reward), terminated, truncated, info
