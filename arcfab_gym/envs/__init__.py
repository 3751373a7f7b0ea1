"""Gymnasium environments over the world-model backends."""

from arcfab_gym.envs.arcfab_env import ArcFabricEnv
from arcfab_gym.envs.wrappers import (
    DiscreteRelativeMoves,
    PushTFeatures,
    PushTReward,
    RelativeTargets,
)

__all__ = [
    "ArcFabricEnv",
    "DiscreteRelativeMoves",
    "PushTFeatures",
    "PushTReward",
    "RelativeTargets",
]
