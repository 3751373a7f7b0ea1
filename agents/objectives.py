"""Push-T planning objectives built from what any backend observes.

The planners' default objective is the backend's reward (gym-pusht's coverage, computed by
mini-dreamzero from its predicted task state). Coverage is flat until the T overlaps the
goal, which leaves a short search nothing to climb; ``shaped_objective`` adds the
distances a person would use: the T towards its goal pose, the pusher towards the T. It
reads only the observation a backend returns, so it works inside any world model.
"""

from __future__ import annotations

from arcfab_gym.models.base import ModelState, StepOutput, WorldModel
from arcfab_gym.tasks import pusht


def shaped_objective(model: WorldModel, out: StepOutput, state: ModelState) -> float:
    """The backend's reward plus :func:`arcfab_gym.tasks.pusht.shaped_reward`'s progress
    terms, read from the observation (the state) the backend predicted."""
    return pusht.shaped_reward(out.reward, out.observation)


OBJECTIVES = {"shaped": shaped_objective}
__all__ = ["OBJECTIVES", "shaped_objective"]
