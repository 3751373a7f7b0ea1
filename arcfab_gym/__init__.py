"""arcfab-gym: plan, fork and rewind inside world models, as a Gymnasium environment.

    import gymnasium as gym
    import arcfab_gym

    env = gym.make("ArcFabric-v0")
    obs, info = env.reset(seed=0)
    state = env.unwrapped.clone_state()        # ALE-style
    branch = env.unwrapped.fabric.fork(        # Arc Fabric: a new branch of history
        env.unwrapped.fabric.checkpoint(), new_prompt="push the T to the left")
"""

from gymnasium.envs.registration import register, registry

from arcfab_gym.envs import ArcFabricEnv, DiscreteRelativeMoves
from arcfab_gym.errors import (
    ArcFabricError,
    BudgetError,
    HistoryError,
    InvalidActionError,
    SnapshotFormatError,
    StateMismatchError,
    UnknownBackendError,
    UnknownCheckpointError,
    UnknownPromptError,
)
from arcfab_gym.fabric import Session, StateManager, TrajectoryTree, TreeNode, WorldStateSnapshot
from arcfab_gym.models import (
    ModelState,
    WorldModel,
    create_world_model,
    list_world_models,
    register_world_model,
)
from arcfab_gym.tasks.pusht import MAX_EPISODE_STEPS, PROMPTS

__version__ = "0.1.0"

__all__ = [
    "ArcFabricEnv",
    "ArcFabricError",
    "BudgetError",
    "DiscreteRelativeMoves",
    "HistoryError",
    "InvalidActionError",
    "ModelState",
    "PROMPTS",
    "Session",
    "SnapshotFormatError",
    "StateManager",
    "StateMismatchError",
    "TrajectoryTree",
    "TreeNode",
    "UnknownBackendError",
    "UnknownCheckpointError",
    "UnknownPromptError",
    "WorldModel",
    "WorldStateSnapshot",
    "create_world_model",
    "list_world_models",
    "register_world_model",
]

_ENTRY = "arcfab_gym.envs.arcfab_env:ArcFabricEnv"
#: mini-dreamzero's frame holds the action for 4 control steps, so its episodes have a
#: quarter of gym-pusht's 300 steps (the same 30 s of Push-T).
MODEL_ACTION_REPEAT = 4
for _env_id, _backend, _steps in (
    ("ArcFabric-v0", "mini-dreamzero", MAX_EPISODE_STEPS // MODEL_ACTION_REPEAT),
    ("ArcFabric-PushTSim-v0", "pusht-sim", MAX_EPISODE_STEPS),
):
    if _env_id not in registry:
        # The episode clock lives in the env's state (ALE's way), so no TimeLimit:
        # env.spec.max_episode_steps still reads the limit once the env is made.
        register(
            id=_env_id,
            entry_point=_ENTRY,
            kwargs={"backend": _backend, "max_episode_frames": _steps},
        )
