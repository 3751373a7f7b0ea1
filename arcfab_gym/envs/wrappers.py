"""Wrappers over ``ArcFabric-v0``: a small discrete action set for tree search."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from arcfab_gym.tasks import pusht


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
        agent = self.env.unwrapped.fabric.observe()["agent_pos"].astype(np.float64)
        target = np.clip(agent + self.offsets[int(action)], 0.0, pusht.WORLD_SIZE)
        return pusht.target_to_action(target)
