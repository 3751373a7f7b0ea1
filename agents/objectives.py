"""Push-T planning objectives built from what any backend observes.

The planners' default objective is the backend's reward (gym-pusht's coverage, computed by
mini-dreamzero from its predicted task state). Coverage is flat until the T overlaps the
goal, which leaves a short search nothing to climb:

* ``shaped_objective`` adds the distances a person would use: the T towards its goal
  pose, the pusher towards the T;
* ``pose_objective`` scores the T's pose by the mean distance of its eight corner
  keypoints to the goal's (one number for position and angle, in pixels), steep enough
  near the goal to tell the last two pixels apart -- which is what success (coverage
  above 95 %) takes: one pixel of offset costs about 1.5 % of coverage.

They read only the observation a backend returns, so they work inside any world model.
"""

from __future__ import annotations

import numpy as np

from arcfab_gym.models.base import ModelState, StepOutput, WorldModel
from arcfab_gym.tasks import pusht


def shaped_objective(model: WorldModel, out: StepOutput, state: ModelState) -> float:
    """The backend's reward plus :func:`arcfab_gym.tasks.pusht.shaped_reward`'s progress
    terms, read from the observation (the state) the backend predicted."""
    return pusht.shaped_reward(out.reward, out.observation)


#: Keypoint distance (px) at which the pose term has fallen by half of its range.
POSE_SCALE_PX = 20.0
#: Weight of the pusher-to-T distance (per 256 px): brings the pusher to a far T.
REACH_WEIGHT = 0.1


def keypoint_distance(block_pose: np.ndarray, goal_pose: np.ndarray) -> float:
    """Mean distance (px) between the T's eight corner keypoints at two poses."""
    kp = pusht.keypoints(np.asarray(block_pose, dtype=np.float64))
    return float(np.linalg.norm(kp - pusht.keypoints(np.asarray(goal_pose, np.float64)), axis=1).mean())


def _pose_score(d: float) -> float:
    return 1.0 - d / (d + POSE_SCALE_PX) - d / 256.0


def pose_objective(model: WorldModel, out: StepOutput, state: ModelState) -> float:
    """From the mean keypoint distance ``d`` (px) between the T and its goal: a steep term
    near the goal, ``1 - d / (d + POSE_SCALE_PX)``, and a linear one, ``-d / 256``, that
    still pulls when the T is far or turned round; minus a small pusher-to-T distance
    term. Coverage is left out: far from the goal it is a poor guide (a T turned half
    round covers 65 % of its goal, and turning it back loses coverage first)."""
    obs = out.observation
    block = np.asarray(obs["block_pose"], dtype=np.float64)
    d = keypoint_distance(block, obs["goal_pose"])
    reach = np.linalg.norm(np.asarray(obs["agent_pos"], dtype=np.float64) - pusht.block_centre(block))
    return float(_pose_score(d) - REACH_WEIGHT * reach / 256.0)


class GoalPoseObjective:
    """Reaching a goal *state* (stable-worldmodel's goal-reaching task): the pose score of
    the T against the goal's T, plus the same score of the pusher's distance to the
    goal's pusher (success needs both within 20 px)."""

    def __init__(self, goal_agent_pos: np.ndarray, goal_block_pose: np.ndarray):
        self.agent = np.asarray(goal_agent_pos, dtype=np.float64)
        self.block = np.asarray(goal_block_pose, dtype=np.float64)

    def __call__(self, model: WorldModel, out: StepOutput, state: ModelState) -> float:
        obs = out.observation
        d = keypoint_distance(obs["block_pose"], self.block)
        a = float(np.linalg.norm(np.asarray(obs["agent_pos"], dtype=np.float64) - self.agent))
        return _pose_score(d) + _pose_score(a)


OBJECTIVES = {"shaped": shaped_objective, "pose": pose_objective}
__all__ = ["OBJECTIVES", "GoalPoseObjective", "keypoint_distance", "pose_objective",
           "shaped_objective"]
