"""World-model backends: the contract, and a registry that builds backends by name.

    >>> from arcfab_gym.models import create_world_model, list_world_models
    >>> list_world_models()
    ['dreamzero', 'mini-dreamzero', 'pusht-sim']
    >>> model = create_world_model("pusht-sim", frame_size=64)

A backend registers with :func:`register_world_model` (a class or factory, or an import
path ``"package.module:Class"`` so that importing the registry stays cheap).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from arcfab_gym.errors import UnknownBackendError
from arcfab_gym.models.base import ModelState, StepOutput, WorldModel

__all__ = [
    "ModelState",
    "StepOutput",
    "WorldModel",
    "create_world_model",
    "list_world_models",
    "register_world_model",
]

_REGISTRY: dict[str, Callable[..., WorldModel] | str] = {}


def register_world_model(
    name: str, factory: Callable[..., WorldModel] | str, *, overwrite: bool = False
) -> None:
    """Register ``factory`` (a class, a callable, or ``"module:attr"``) under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a backend name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"world model {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = factory


def list_world_models() -> list[str]:
    """Names of the registered backends, sorted."""
    return sorted(_REGISTRY)


def create_world_model(name: str, **kwargs: Any) -> WorldModel:
    """Build the backend registered as ``name`` with ``kwargs``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownBackendError(name, list_world_models()) from None
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    model = factory(**kwargs)
    if not isinstance(model, WorldModel):
        raise TypeError(f"factory for {name!r} returned {type(model).__name__}, not a WorldModel")
    return model


register_world_model("pusht-sim", "arcfab_gym.models.pusht_sim:PushTSim")
register_world_model("mini-dreamzero", "arcfab_gym.models.mini_dreamzero.backend:MiniDreamZero")
# DreamZero's own policy head; needs the optional extra and DreamZero's source (see README).
register_world_model("dreamzero", "arcfab_gym.models.dreamzero.backend:DreamZero")
