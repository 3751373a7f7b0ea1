"""The state token's layout and normalisation, the state map the video is conditioned on,
and the flow's target: the one home that both the backend and training import.

The task state of a frame is six numbers, in this order (``STATE_NAMES``): the pusher's
``x, y`` and the T's ``x, y`` (its body origin, gym-pusht's ``block.position``), all in
``[-1, 1]`` (px / 256 - 1), then ``sin`` and ``cos`` of the T's angle. The state dynamics
reads the last two states, the action that led to the current one and the next action
(:func:`dynamics_input`): gym-pusht's pusher follows its target through a PD controller,
so its velocity -- not in the state -- is fixed by the last two positions and the last
target. The video flow reads a rasterised picture of the state (:func:`state_map`), so
the latent it generates is the scene the state describes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from arcfab_gym.tasks import pusht

STATE_NAMES = ("agent_x", "agent_y", "block_x", "block_y", "block_sin", "block_cos")
STATE_DIM = len(STATE_NAMES)
#: What the state dynamics predicts per frame: the change of the pusher's x, y (world
#: frame), of the T's x, y (in the T's own frame, so a push reads the same at any angle)
#: and of the T's angle. Divided by per-column scales measured on the training data.
DELTA_NAMES = ("d_agent_x", "d_agent_y", "d_block_u", "d_block_v", "d_angle")
DELTA_DIM = len(DELTA_NAMES)
#: Velocity features are the last frame's change times this (a few px -> about 0.1-1).
_VELOCITY_GAIN = 8.0
DYNAMICS_INPUT_DIM = STATE_DIM + 5 + 2 + 2 + 2 + 2 + 2

#: State-map resolution (cells per side) and channels (the T's mask, the pusher's disc).
MAP_SIZE = 32
MAP_CHANNELS = 2
_MAP_SUPERSAMPLE = 2
_PUSHER_RADIUS = 15.0


def normalise_pos(xy):
    """px in [0, 512] -> [-1, 1] (numpy or torch)."""
    return xy / (pusht.WORLD_SIZE / 2) - 1.0


def denormalise_pos(xy):
    return (xy + 1.0) * (pusht.WORLD_SIZE / 2)


def state_from_poses(agent_px: np.ndarray, block_pose: np.ndarray) -> np.ndarray:
    """Pusher ``[..., 2]`` px and T pose ``[..., 3]`` (x, y px, angle) -> ``[..., 6]``."""
    agent_px, block_pose = np.asarray(agent_px), np.asarray(block_pose)
    return np.concatenate(
        [normalise_pos(agent_px), normalise_pos(block_pose[..., :2]),
         np.sin(block_pose[..., 2:3]), np.cos(block_pose[..., 2:3])], axis=-1,
    ).astype(np.float32)  # fmt: skip


def poses_from_state(state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[..., 6]`` -> pusher ``[..., 2]`` px, T pose ``[..., 3]`` (angle in [0, 2 pi))."""
    s = np.asarray(state, dtype=np.float64)
    angle = np.arctan2(s[..., 4], s[..., 5]) % (2 * np.pi)
    block = np.concatenate([denormalise_pos(s[..., 2:4]), angle[..., None]], axis=-1)
    return denormalise_pos(s[..., 0:2]), block


def _rotate(v: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate ``[..., 2]`` vectors by the angle with ``sin``, ``cos`` ``[...]``."""
    return torch.stack([cos * v[..., 0] - sin * v[..., 1], sin * v[..., 0] + cos * v[..., 1]], -1)


def dynamics_input(now: torch.Tensor, prev: torch.Tensor, action: torch.Tensor,
                   last_action: torch.Tensor) -> torch.Tensor:
    """The state dynamics' input from the state now and one frame before ``[..., 6]``, the
    action ``[..., 2]`` (the pusher's target, in [-1, 1] like the positions) and the action
    that led from ``prev`` to ``now``: the state, the last change (velocity), the action,
    the target relative to the pusher, the last target relative to the last position, and
    the pusher and the target in the T's frame (where contact is decided)."""
    sin, cos = now[..., 4], now[..., 5]
    d_angle = torch.atan2(sin * prev[..., 5] - cos * prev[..., 4], cos * prev[..., 5] + sin * prev[..., 4])
    vel = torch.cat([now[..., :4] - prev[..., :4], d_angle[..., None]], -1) * _VELOCITY_GAIN
    block = now[..., 2:4]
    agent_in_t = _rotate(now[..., 0:2] - block, -sin, cos)
    target_in_t = _rotate(action - block, -sin, cos)
    return torch.cat([now, vel, action, action - now[..., 0:2], last_action - prev[..., 0:2],
                      agent_in_t, target_in_t], -1)


def delta_target(now: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """The unscaled change from state ``now`` to ``nxt`` ``[..., 6]`` -> ``[..., 5]``
    (the T's displacement in its frame at ``now``, the angle change wrapped)."""
    sin, cos = now[..., 4], now[..., 5]
    d_block = _rotate(nxt[..., 2:4] - now[..., 2:4], -sin, cos)
    d_angle = torch.atan2(nxt[..., 4] * cos - nxt[..., 5] * sin, nxt[..., 5] * cos + nxt[..., 4] * sin)
    return torch.cat([nxt[..., 0:2] - now[..., 0:2], d_block, d_angle[..., None]], -1)


def apply_delta(now: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`delta_target`: state ``now`` ``[..., 6]`` plus an unscaled change
    ``[..., 5]`` -> the next state, positions clamped to the workspace."""
    sin, cos = now[..., 4], now[..., 5]
    agent = (now[..., 0:2] + delta[..., 0:2]).clamp(-1.0, 1.0)
    block = (now[..., 2:4] + _rotate(delta[..., 2:4], sin, cos)).clamp(-1.0, 1.0)
    angle = torch.atan2(sin, cos) + delta[..., 4]
    return torch.cat([agent, block, torch.sin(angle)[..., None], torch.cos(angle)[..., None]], -1)


@functools.lru_cache(maxsize=2)
def _map_grid(size: int, supersample: int) -> torch.Tensor:
    """World coordinates (px) of the sample points of a ``size`` x ``size`` map, row
    ``i`` = image row (y), column ``j`` = x; ``[size * ss, size * ss, 2]``."""
    n = size * supersample
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * (pusht.WORLD_SIZE / n)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx, yy], -1)


#: States rasterised per pass: every pass makes several ``[B, (size * ss)**2, 2]``
#: temporaries, which stay in cache at this size (3.5x faster per state than 1,024 at a
#: time; the maps are the same bits, each state's map being its own).
_MAP_CHUNK = 256


def state_map(state: torch.Tensor, size: int = MAP_SIZE) -> torch.Tensor:
    """Rasterise states ``[B, 6]`` into ``[B, 2, size, size]`` maps in image layout (row =
    y, as gym-pusht draws): the T's area share of each cell and the pusher's disc."""
    if len(state) > _MAP_CHUNK:
        return torch.cat([_state_map(c, size) for c in state.split(_MAP_CHUNK)])
    return _state_map(state, size)


def _state_map(state: torch.Tensor, size: int) -> torch.Tensor:
    ss = _MAP_SUPERSAMPLE
    grid = _map_grid(size, ss)  # [n, n, 2] px
    agent = denormalise_pos(state[:, 0:2])[:, None, None]  # [B, 1, 1, 2]
    block = denormalise_pos(state[:, 2:4])[:, None, None]
    sin, cos = state[:, 4, None, None], state[:, 5, None, None]
    local = _rotate(grid[None] - block, -sin, cos)  # [B, n, n, 2] in the T's frame
    u, v = local[..., 0], local[..., 1]
    (bx0, by0), (bx1, by1) = pusht.T_VERTICES[0].min(0), pusht.T_VERTICES[0].max(0)
    (sx0, sy0), (sx1, sy1) = pusht.T_VERTICES[1].min(0), pusht.T_VERTICES[1].max(0)
    bar = (u >= bx0) & (u <= bx1) & (v >= by0) & (v <= by1)
    stem = (u >= sx0) & (u <= sx1) & (v >= sy0) & (v <= sy1)
    tee = (bar | stem).float()
    disc = (((grid[None] - agent) ** 2).sum(-1) <= _PUSHER_RADIUS**2).float()
    maps = torch.stack([tee, disc], 1)  # [B, 2, n, n]
    return torch.nn.functional.avg_pool2d(maps, ss) if ss > 1 else maps


@functools.lru_cache(maxsize=16)
def _goal_map(goal: tuple[float, float, float], size: int) -> torch.Tensor:
    x, y, theta = goal
    state = torch.tensor([[0.0, 0.0, x / (pusht.WORLD_SIZE / 2) - 1.0, y / (pusht.WORLD_SIZE / 2) - 1.0,
                           np.sin(theta), np.cos(theta)]], dtype=torch.float32)
    return state_map(state, size)[:, :1]


def goal_map(prompts, size: int = MAP_SIZE) -> torch.Tensor:
    """The goal region each prompt asks for, rasterised like the T's channel of
    :func:`state_map`: ``[B, 1, size, size]``."""
    return torch.cat([_goal_map(tuple(float(v) for v in pusht.goal_pose(p)), size) for p in prompts])


def resting_action(state: torch.Tensor | np.ndarray):
    """The action that holds a pusher still where it is (its target = its position): the
    "last action" of a history's first frame, where the pusher is at rest."""
    return state[..., 0:2]


def flow_target(cfg, z_next: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """What the flow generates for ``z_next``: the latent itself, or (``cfg.residual``) the
    scaled change from ``anchor`` -- the previous latent, or the latent rendered from the
    frame's state (``cfg.anchor``). ``latent_from_flow`` inverts it."""
    return (z_next - anchor) / cfg.delta_scale if cfg.residual else z_next


def latent_from_flow(cfg, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    return anchor + cfg.delta_scale * x if cfg.residual else x


def pusher_features(agent: torch.Tensor, agent_prev: torch.Tensor) -> torch.Tensor:
    """The control token's pusher input: the pusher now and one frame before, [..., 4]."""
    return torch.cat([agent, agent_prev], dim=-1)
