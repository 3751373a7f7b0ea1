"""A scripted Push-T pusher: get behind the T relative to the goal, then push.

Not a good policy (it ignores the T's angle) but a cheap, reactive one that makes contact
most of the time -- what data collection and demos need. Noise and random waypoints make
its data diverse.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from arcfab_gym.tasks import pusht

#: Distance (px) behind the T's centre where the pusher lines up before pushing.
_STANDOFF = 75.0


class ScriptedPusher:
    """Reactive pusher over ``ArcFabric-v0`` observations.

    Args:
        rng: numpy Generator for noise and waypoints.
        noise_px: std of Gaussian noise added to the target, in px.
        waypoint_prob: chance per call of starting a random waypoint excursion.
    """

    def __init__(
        self, rng: np.random.Generator, *, noise_px: float = 8.0, waypoint_prob: float = 0.02
    ):
        self.rng = rng
        self.noise_px = float(noise_px)
        self.waypoint_prob = float(waypoint_prob)
        self._waypoint: np.ndarray | None = None
        self._waypoint_steps = 0

    def __call__(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Action in ``[-1, 1]^2`` for observation ``obs`` (float32 ``[2]``)."""
        agent = np.asarray(obs["agent_pos"], dtype=np.float64)
        centre = pusht.block_centre(obs["block_pose"])
        goal = np.asarray(obs["goal_pose"], dtype=np.float64)
        if self._waypoint is None and self.rng.random() < self.waypoint_prob:
            self._waypoint = self.rng.uniform(40, 472, size=2)
            self._waypoint_steps = int(self.rng.integers(3, 10))
        if self._waypoint is not None:
            target = self._waypoint
            self._waypoint_steps -= 1
            if self._waypoint_steps <= 0:
                self._waypoint = None
        else:
            target = self._push_target(agent, centre, goal[:2])
        target = target + self.rng.normal(0.0, self.noise_px, size=2)
        return pusht.target_to_action(np.clip(target, 0.0, pusht.WORLD_SIZE))

    @staticmethod
    def _push_target(agent: np.ndarray, centre: np.ndarray, goal: np.ndarray) -> np.ndarray:
        to_goal = goal - centre
        dist = np.linalg.norm(to_goal)
        heading = to_goal / dist if dist > 1e-6 else np.array([1.0, 0.0])
        behind = centre - heading * _STANDOFF
        # Lined up behind the T (and not beside it): push through the centre to the goal.
        rel = agent - centre
        along = float(rel @ heading)
        across = float(abs(rel[0] * heading[1] - rel[1] * heading[0]))
        if along < -0.5 * _STANDOFF and across < 25.0:
            return centre + heading * min(dist, 40.0)
        # Otherwise go to the stand-off point, swinging wide around the T when on its far
        # side, so the approach does not shove it away from the goal.
        if along > -0.5 * _STANDOFF:
            side = np.array([-heading[1], heading[0]])
            if float(rel @ side) < 0:
                side = -side
            return centre + side * _STANDOFF * 1.2 - heading * _STANDOFF * 0.5
        return behind
