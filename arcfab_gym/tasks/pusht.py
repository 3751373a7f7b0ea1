"""Facts of the Push-T task shared by every backend: prompts and their goals, the action
mapping, initial-state sampling, coverage and success, and drawing a frame from poses.

The physics and the drawing are gym-pusht's own (pymunk + pygame); this module only fixes
the conventions that arcfab-gym adds on top (a prompt vocabulary, actions in [-1, 1]).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import numpy as np

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from gym_pusht.envs.pusht import PushTEnv

import cv2
import pygame
import shapely
import shapely.geometry as sg

from arcfab_gym.errors import UnknownPromptError

#: Side of the square world, in pixels (pymunk units).
WORLD_SIZE = 512.0
#: gym-pusht's success threshold: coverage of the goal region above 95 %.
SUCCESS_THRESHOLD = 0.95
#: gym-pusht's time limit.
MAX_EPISODE_STEPS = 300

#: The closed prompt vocabulary: each prompt names a goal pose ``(x, y, theta)`` for the T.
#: The first is gym-pusht's own goal; the others move or turn it (y grows downwards in the
#: picture, so "up" is a smaller y). Every goal keeps the whole T at least 60 px inside
#: the walls.
GOALS: dict[str, tuple[float, float, float]] = {
    "push the T onto the target": (256.0, 256.0, math.pi / 4),
    "push the T to the left": (160.0, 256.0, math.pi / 4),
    "push the T to the right": (352.0, 256.0, math.pi / 4),
    "push the T up": (256.0, 160.0, math.pi / 4),
    "push the T down": (256.0, 352.0, math.pi / 4),
    "stand the T upright": (256.0, 196.0, 0.0),
}
PROMPTS: tuple[str, ...] = tuple(GOALS)
DEFAULT_PROMPT = PROMPTS[0]


def goal_pose(prompt: str) -> np.ndarray:
    """The goal ``[x, y, theta]`` (float64) a prompt asks for."""
    try:
        return np.array(GOALS[prompt], dtype=np.float64)
    except KeyError:
        raise UnknownPromptError(prompt, PROMPTS) from None


def action_to_target(action: np.ndarray) -> np.ndarray:
    """Map an action in ``[-1, 1]^2`` to gym-pusht's absolute target in ``[0, 512]^2``."""
    return (np.asarray(action, dtype=np.float64) + 1.0) * (WORLD_SIZE / 2.0)


def target_to_action(target: np.ndarray) -> np.ndarray:
    """Inverse of :func:`action_to_target` (float32, clipped to the action space)."""
    a = np.asarray(target, dtype=np.float64) / (WORLD_SIZE / 2.0) - 1.0
    return np.clip(a, -1.0, 1.0).astype(np.float32)


def sample_initial_state(rng: np.random.Generator) -> np.ndarray:
    """gym-pusht's start distribution: ``[agent_x, agent_y, block_x, block_y, block_angle]``."""
    return np.array(
        [
            rng.integers(50, 450),
            rng.integers(50, 450),
            rng.integers(100, 400),
            rng.integers(100, 400),
            rng.uniform(-np.pi, np.pi),
        ],
        dtype=np.float64,
    )


#: The T's centre of gravity in body coordinates (gym-pusht's ``add_tee``).
T_CENTRE_OF_GRAVITY = np.array([0.0, 45.0])


def state_for_pose(agent_xy: np.ndarray, block_pose: np.ndarray) -> np.ndarray:
    """The ``initial_state`` vector that puts the T exactly at ``block_pose``.

    gym-pusht's ``reset_to_state`` sets the T's position at angle 0, then turns it about
    its centre of gravity, which moves the origin: this inverts that, so that starting
    from a recorded pose (for example a state of an expert trajectory) lands on it.
    """
    x, y, theta = (float(v) for v in block_pose[:3])
    c, s = math.cos(theta), math.sin(theta)
    cx, cy = T_CENTRE_OF_GRAVITY
    px = x - cx + (c * cx - s * cy)
    py = y - cy + (s * cx + c * cy)
    return np.array([agent_xy[0], agent_xy[1], px, py, theta], dtype=np.float64)


def pose_for_state(state: np.ndarray) -> np.ndarray:
    """Where ``reset_to_state`` really puts the T: the inverse of :func:`state_for_pose`,
    ``[x, y, theta]`` of the T's origin."""
    px, py, theta = (float(v) for v in state[2:5])
    c, s = math.cos(theta), math.sin(theta)
    cx, cy = T_CENTRE_OF_GRAVITY
    return np.array([px + cx - (c * cx - s * cy), py + cy - (s * cx + c * cy), theta])


# --- geometry --------------------------------------------------------------------------
_SCALE, _LENGTH = 30.0, 4.0
#: The T's two rectangles in body coordinates (gym-pusht's ``add_tee``), [2, 4, 2].
T_VERTICES = np.array(
    [
        [
            (-_LENGTH * _SCALE / 2, _SCALE),
            (_LENGTH * _SCALE / 2, _SCALE),
            (_LENGTH * _SCALE / 2, 0),
            (-_LENGTH * _SCALE / 2, 0),
        ],
        [
            (-_SCALE / 2, _SCALE),
            (-_SCALE / 2, _LENGTH * _SCALE),
            (_SCALE / 2, _LENGTH * _SCALE),
            (_SCALE / 2, _SCALE),
        ],
    ],
    dtype=np.float64,
)


def _area_centroid(rects: np.ndarray) -> np.ndarray:
    # Axis-aligned rectangles: each one's centre, weighted by its area.
    lo, hi = rects.min(axis=1), rects.max(axis=1)  # [parts, 2]
    area = np.prod(hi - lo, axis=1)
    return (area[:, None] * (lo + hi) / 2).sum(axis=0) / area.sum()


#: The T's area centroid in body coordinates (not its centre of gravity: gym-pusht's
#: body puts that at the mean of the vertices).
T_CENTROID = _area_centroid(T_VERTICES)
#: The farthest any point of the T lies from its area centroid (a corner of the stem).
T_RADIUS = float(np.max(np.linalg.norm(T_VERTICES.reshape(-1, 2) - T_CENTROID, axis=1)))
#: Success is impossible with the T's centroid farther than this from the goal's. With
#: ``e = 1 - SUCCESS_THRESHOLD``, success leaves less than ``e`` of the area in each of
#: ``A \ B`` and ``B \ A``; the centroids' gap ``d`` times the area is the difference of
#: the first moments of those two sets about the goal's centroid, at most
#: ``e (T_RADIUS + d) + e T_RADIUS`` times the area, so ``d < 2 e T_RADIUS / (1 - e)``
#: (8.5 px). One pixel of margin keeps rounding far from the bound.
SUCCESS_GAP_PX = 2 * (1 - SUCCESS_THRESHOLD) * T_RADIUS / SUCCESS_THRESHOLD + 1.0
#: Two Ts whose centroids are farther apart than this cannot overlap (one pixel of margin).
OVERLAP_GAP_PX = 2 * T_RADIUS + 1.0


def centroid_gap(block_pose: np.ndarray, goal: np.ndarray) -> float:
    """Distance (px) between the area centroids of the T at ``block_pose`` and at
    ``goal``: a cheap bound on coverage (see :data:`SUCCESS_GAP_PX`, :data:`OVERLAP_GAP_PX`)."""
    gx, gy = T_CENTROID
    dx = dy = 0.0
    for pose, sign in ((block_pose, 1.0), (goal, -1.0)):
        c, s = math.cos(float(pose[2])), math.sin(float(pose[2]))
        dx += sign * (float(pose[0]) + c * gx - s * gy)
        dy += sign * (float(pose[1]) + s * gx + c * gy)
    return math.hypot(dx, dy)


def t_polygon(pose: np.ndarray) -> sg.MultiPolygon:
    """The T at ``pose = [x, y, theta]`` as a shapely MultiPolygon (fixed part order)."""
    x, y, theta = (float(v) for v in pose[:3])
    c, s = math.cos(theta), math.sin(theta)
    parts = []
    for rect in T_VERTICES:
        pts = [(x + c * vx - s * vy, y + s * vx + c * vy) for vx, vy in rect]
        parts.append(sg.Polygon(pts + pts[:1]))
    return sg.MultiPolygon(parts)


@functools.lru_cache(maxsize=64)
def _goal_polygon(x: float, y: float, theta: float) -> sg.MultiPolygon:
    return t_polygon(np.array([x, y, theta]))


def coverage(block_polygon: sg.MultiPolygon, goal: np.ndarray) -> float:
    """Fraction of the goal region covered by the block (gym-pusht's reward basis)."""
    goal_geom = _goal_polygon(float(goal[0]), float(goal[1]), float(goal[2]))
    return float(goal_geom.intersection(block_polygon).area / goal_geom.area)


def t_polygons(poses: np.ndarray) -> np.ndarray:
    """:func:`t_polygon` of each pose in ``poses [N, 3]`` -> ``[N]`` MultiPolygons, built
    by shapely's array functions: the same coordinates to the bit (the same float
    operations in the same order), without a Python loop per vertex."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
    n = len(poses)
    c = np.array([math.cos(t) for t in poses[:, 2].tolist()])[:, None, None]
    s = np.array([math.sin(t) for t in poses[:, 2].tolist()])[:, None, None]
    vx, vy = T_VERTICES[None, ..., 0], T_VERTICES[None, ..., 1]  # [1, parts, 4]
    x, y = poses[:, 0, None, None], poses[:, 1, None, None]
    ring = np.stack([x + c * vx - s * vy, y + s * vx + c * vy], axis=-1)  # [N, parts, 4, 2]
    ring = np.concatenate([ring, ring[:, :, :1]], axis=2)  # closed, as t_polygon's
    parts = shapely.polygons(ring.reshape(-1, *ring.shape[2:])).reshape(n, len(T_VERTICES))
    return shapely.multipolygons(parts)


def coverages(block_poses: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """:func:`coverage` of the T at each of ``block_poses [N, 3]`` -> ``[N]`` float64,
    equal to it bit for bit, in a few array calls (the planners' batched rollouts and
    the training targets score hundreds of thousands of poses)."""
    block_poses = np.asarray(block_poses, dtype=np.float64).reshape(-1, 3)
    if len(block_poses) < 8:  # the array calls' fixed cost is more than a few loops
        return np.array([coverage(t_polygon(p), goal) for p in block_poses], dtype=np.float64)
    goal_geom = _goal_polygon(float(goal[0]), float(goal[1]), float(goal[2]))
    shapely.prepare(goal_geom)  # kept with the cached goal: fast intersects() tests
    blocks = t_polygons(block_poses)
    out = np.zeros(len(blocks))
    touch = shapely.intersects(goal_geom, blocks)  # the rest cover exactly nothing
    out[touch] = shapely.area(shapely.intersection(goal_geom, blocks[touch])) / goal_geom.area
    return out


def reward_from_coverage(cov: float) -> float:
    """gym-pusht's reward: coverage / 0.95, clipped to [0, 1]."""
    return float(np.clip(cov / SUCCESS_THRESHOLD, 0.0, 1.0))


def keypoints(block_pose: np.ndarray) -> np.ndarray:
    """The T's 8 corner keypoints in world coordinates, ``[8, 2]`` (gym-pusht's order)."""
    x, y, theta = block_pose[:3]
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    return T_VERTICES.reshape(8, 2) @ rot.T + np.array([x, y])


def block_centre(block_pose: np.ndarray) -> np.ndarray:
    """The T's centre (mean of its 8 corner keypoints), ``[2]``."""
    return keypoints(np.asarray(block_pose, dtype=np.float64)).mean(axis=0)


def wrap_angle(a: np.ndarray) -> np.ndarray:
    """Absolute angle difference wrapped to [0, pi]."""
    return np.abs((np.asarray(a, dtype=np.float64) + np.pi) % (2 * np.pi) - np.pi)


def shaped_reward(reward: float, obs: dict[str, np.ndarray]) -> float:
    """``reward`` plus progress terms a person would use, each scaled to about [0, 1]:
    minus the T's distance to its goal position (/ 256 px) and angle (/ pi), minus a
    quarter of the pusher's distance to the T's centre (/ 256 px).

    Coverage is flat until the T overlaps the goal, which leaves a short search or a young
    policy nothing to climb. This reads only what every backend observes (a learned
    model's heads included), so it means the same inside a model and in the real task.
    """
    return float(reward + progress_potential(obs))


def progress_potential(obs: dict[str, np.ndarray]) -> float:
    """Minus the distances :func:`shaped_reward` adds: the T's to its goal position
    (/ 256 px) and angle (/ pi), a quarter of the pusher's to the T's centre (/ 256 px).
    Its change over a step is a potential-based shaping term (Ng et al., 1999)."""
    block = np.asarray(obs["block_pose"], dtype=np.float64)
    goal = np.asarray(obs["goal_pose"], dtype=np.float64)
    dist = np.linalg.norm(block[:2] - goal[:2]) / 256.0
    dtheta = float(wrap_angle(block[2] - goal[2])) / np.pi
    reach = np.linalg.norm(np.asarray(obs["agent_pos"], dtype=np.float64) - block_centre(block))
    return float(-dist - 0.5 * dtheta - 0.25 * reach / 256.0)


# --- drawing ---------------------------------------------------------------------------
class FrameRenderer:
    """Draws a Push-T frame from poses with gym-pusht's own renderer.

    Keeps one scratch gym-pusht env whose bodies are moved to the requested poses; the
    picture is the same one gym-pusht returns as a pixel observation.
    """

    def __init__(self, size: int = 96):
        self.size = int(size)
        self._env = PushTEnv(
            obs_type="pixels",
            render_mode="rgb_array",
            observation_width=self.size,
            observation_height=self.size,
        )
        self._env._setup()

    def render(self, agent_pos: np.ndarray, block_pose: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """uint8 ``[size, size, 3]`` picture of the agent, the T and the goal region."""
        self.place(agent_pos, block_pose, goal)
        return self.picture()

    def place(self, agent_pos: np.ndarray, block_pose: np.ndarray, goal: np.ndarray) -> None:
        """Move the scratch env's bodies (and goal) to the given poses."""
        env = self._env
        env.agent.position = (float(agent_pos[0]), float(agent_pos[1]))
        env.block.angle = float(block_pose[2])
        env.block.position = (float(block_pose[0]), float(block_pose[1]))
        env.goal_pose = np.asarray(goal, dtype=np.float64)
        env._last_action = None
        # pymunk draws shapes where their cached geometry was last updated (a physics
        # step or a reindex); without this every frame shows the setup pose.
        env.space.reindex_shapes_for_body(env.agent)
        env.space.reindex_shapes_for_body(env.block)

    def picture(self) -> np.ndarray:
        """The scene as placed, as gym-pusht's pixel observation draws it. gym-pusht's own
        path (``env._render``) copies the screen through a strided view, half the frame's
        time; the screen's RGB bytes are the same pixels row by row, so the resized frame
        is the same bits (tested against ``env._render``)."""
        env = self._env
        screen = env._draw()
        w, h = screen.get_size()
        rgb = np.frombuffer(pygame.image.tobytes(screen, "RGB"), np.uint8).reshape(h, w, 3)
        return cv2.resize(rgb, (env.observation_width, env.observation_height))

    def close(self) -> None:
        self._env.close()

