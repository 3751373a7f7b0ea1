"""The Arc Fabric state layer: snapshots, the checkpoint store, sessions and the tree."""

from arcfab_gym.fabric.session import Session
from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.fabric.store import StateManager
from arcfab_gym.fabric.tree import TrajectoryTree, TreeNode

__all__ = ["Session", "StateManager", "TrajectoryTree", "TreeNode", "WorldStateSnapshot"]
