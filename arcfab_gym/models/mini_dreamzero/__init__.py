"""mini-dreamzero: a DreamZero-shaped world-action model of Push-T at CPU scale."""

from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero, Weights

__all__ = ["MiniDreamZero", "Weights"]
