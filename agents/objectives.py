"""Push-T planning objectives built from what any backend observes.

The planners' default objective is the backend's reward (gym-pusht's coverage, or a learned
model's reward head). Coverage is flat until the T overlaps the goal, which leaves a short
search nothing to climb; ``shaped_objective`` adds the distances a person would use: the T
towards its goal pose, the pusher towards the T. It reads only the observation a backend
returns (a learned model's heads), so it works inside any world model.
"""

from __future__ import annotations

import numpy as np

from arcfab_gym.models.base import ModelState, StepOutput, WorldModel
from arcfab_gym.tasks import pusht


def shaped_objective(model: WorldModel, out: StepOutput, state: ModelState) -> float:
    """Reward + progress terms, each scaled to about [0, 1]: minus the T's distance to its
    goal position (/ 256 px) and angle (/ pi), minus a quarter of the pusher's distance to
    the T's centre (/ 256 px)."""
    obs = out.observation
    block, goal = obs["block_pose"].astype(np.float64), obs["goal_pose"].astype(np.float64)
    dist = np.linalg.norm(block[:2] - goal[:2]) / 256.0
    dtheta = pusht.wrap_angle(block[2] - goal[2]) / np.pi
    reach = np.linalg.norm(obs["agent_pos"] - pusht.block_centre(block)) / 256.0
    return float(out.reward - dist - 0.5 * dtheta - 0.25 * reach)


OBJECTIVES = {"shaped": shaped_objective}
__all__ = ["OBJECTIVES", "shaped_objective"]
