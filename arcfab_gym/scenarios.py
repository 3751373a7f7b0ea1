"""Push-T failure scenarios and a failure detector on predicted futures.

The failure-recovery benchmark (``experiments/failure_recovery.py``) needs failures that
happen to real manipulation, made reproducible: each :class:`Scenario` is a seeded start
state, a prompt, rules that end an episode as a failure, and exogenous events applied to
the *real* world (a :class:`ScenarioWorld`, pusht-sim with 4 control steps per action).

* ``shove``: the T is knocked away from its goal mid-episode (an external push).
* ``edge``: the T starts near a wall, with the goal on that side; a corner of the T
  leaving the safe workspace (pressed against the wall, "off the table") is a failure.
* ``forbidden_zone``: a rectangle between the T and its goal that the T's centre must
  not enter.
* ``stuck``: the T starts jammed in a corner; a run of steps without coverage progress
  (a stuck contact) is a failure -- a timeout on progress, not on the episode.

The suite is versioned (:data:`SUITE_NAME`, :data:`SUITE_VERSION`): bump the version
whenever a scenario's start distribution, events or rules change, so that result files
of different definitions are never compared by accident.

:class:`FailureDetector` reads a *predicted* future (what a world model imagined for the
next steps) and flags a coverage drop, the T leaving the safe workspace, or the T's centre
entering the forbidden zone. It sees only observations, so it works on any backend.

This module knows Push-T; planners must not (they see only ``WorldModel``).

(No postponed annotations: :class:`DetectorConfig` is part of a Hydra structured config
that joblib workers rebuild from the dataclasses' real annotations.)
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import shapely.geometry as sg
import torch

from arcfab_gym.models.base import ModelState
from arcfab_gym.models.pusht_sim import PushTSim
from arcfab_gym.tasks import pusht
from arcfab_gym.tasks.pusht import block_centre, wrap_angle  # block_centre: what the zone rule watches

#: Name and version written into every result file of the benchmark.
SUITE_NAME = "pusht-failure-recovery"
SUITE_VERSION = "1.0"

#: Control steps per real action (the models' frame): 75 actions = gym-pusht's 30 s.
ACTION_REPEAT = 4
#: Radius of gym-pusht's pusher (px).
AGENT_RADIUS = 15.0
#: The inner face of gym-pusht's walls (segments at 5 and 506 px, radius 2).
WALL_LO, WALL_HI = 7.0, 505.0


# --- geometry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rect:
    """An axis-aligned rectangle in workspace pixels, ``x0 <= x <= x1``, ``y0 <= y <= y1``."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        vals = (self.x0, self.y0, self.x1, self.y1)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"Rect corners must be finite, got {vals}")
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"Rect needs x0 < x1 and y0 < y1, got {vals}")

    def contains(self, xy: Sequence[float], margin: float = 0.0) -> bool:
        """Whether point ``xy`` lies inside the rectangle grown by ``margin`` px."""
        x, y = float(xy[0]), float(xy[1])
        return (self.x0 - margin <= x <= self.x1 + margin
                and self.y0 - margin <= y <= self.y1 + margin)  # fmt: skip

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


def edge_distance(block_pose: Sequence[float]) -> float:
    """Distance (px) from the T's outermost corner to the workspace border ``[0, 512]^2``:
    how far the T is from going over the edge. Negative would mean outside."""
    kp = pusht.keypoints(np.asarray(block_pose, dtype=np.float64))
    return float(min(kp.min(), pusht.WORLD_SIZE - kp.max()))


def goal_centre(prompt: str) -> np.ndarray:
    """Centre of the goal region a prompt asks for."""
    return block_centre(pusht.goal_pose(prompt))


# --- scenarios -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Shove:
    """An external push of the T, applied right after real step ``after_step`` (1-based).

    The T moves ``distance`` px in the direction from the goal's centre to the T's centre
    turned by ``bearing`` rad (so, by default, away from its goal), and turns by
    ``dtheta`` rad. If that would put the T into a wall or onto the pusher, the push is
    turned a little, then halved, until it fits (a deterministic function of the state,
    hence reproducible).
    """

    after_step: int
    distance: float
    bearing: float = 0.0
    dtheta: float = 0.0

    def __post_init__(self) -> None:
        if int(self.after_step) < 1:
            raise ValueError(f"Shove.after_step must be >= 1, got {self.after_step}")
        if not (math.isfinite(self.distance) and self.distance >= 0):
            raise ValueError(f"Shove.distance must be finite and >= 0, got {self.distance}")


@dataclass(frozen=True)
class Scenario:
    """One seeded, reproducible episode definition of the suite.

    ``initial_state`` is pusht-sim's ``[agent_x, agent_y, block_x, block_y, block_angle]``.
    Failure rules (``None`` disables one): the T's centre inside ``forbidden_zone``; a
    corner of the T closer than ``edge_margin`` px to the border; no coverage gain of at
    least ``min_progress`` for ``stall_steps`` consecutive steps.
    """

    name: str
    seed: int
    prompt: str
    initial_state: tuple[float, ...]
    description: str = ""
    shoves: tuple[Shove, ...] = ()
    forbidden_zone: Rect | None = None
    edge_margin: float | None = None
    stall_steps: int | None = None
    min_progress: float = 0.02
    max_steps: int = 50

    def __post_init__(self) -> None:
        pusht.goal_pose(self.prompt)  # raises UnknownPromptError
        if len(self.initial_state) != 5:
            raise ValueError(f"initial_state needs 5 numbers, got {self.initial_state!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.stall_steps is not None and self.stall_steps < 1:
            raise ValueError(f"stall_steps must be >= 1 or None, got {self.stall_steps}")
        if self.edge_margin is not None and not 0 <= self.edge_margin < 128:
            raise ValueError(f"edge_margin must be in [0, 128) px or None, got {self.edge_margin}")

    @property
    def suite(self) -> dict[str, str]:
        return {"name": SUITE_NAME, "version": SUITE_VERSION}

    def with_max_steps(self, max_steps: int | None) -> "Scenario":
        """The same scenario with another episode length (``None``: unchanged)."""
        if max_steps is None:
            return self
        return dataclasses.replace(self, max_steps=int(max_steps))

    def _fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable definition (what a result file records)."""
        d = self._fields()
        d["initial_state"] = [float(v) for v in self.initial_state]
        d["shoves"] = [asdict(s) for s in self.shoves]
        d["forbidden_zone"] = self.forbidden_zone.as_list() if self.forbidden_zone else None
        d["suite"] = self.suite
        return d


def _clear_of(block_pose: np.ndarray, agent_xy: np.ndarray, clearance: float) -> bool:
    return pusht.t_polygon(block_pose).distance(sg.Point(*agent_xy)) > clearance


def _place(rng: np.random.Generator, block_pose_fn: Callable[[], np.ndarray],
           agent_fn: Callable[[], np.ndarray], *, min_edge: float = 25.0,
           zone: Rect | None = None) -> tuple[float, ...]:
    """Rejection-sample a start: the T at least ``min_edge`` px from the border and the
    pusher clear of it (and of the zone). Deterministic given the generator."""
    for _ in range(1000):
        pose = block_pose_fn()
        if edge_distance(pose) < min_edge:
            continue
        for _ in range(100):
            agent = agent_fn()
            if _clear_of(pose, agent, AGENT_RADIUS + 15.0) and not (
                zone is not None and zone.contains(agent, margin=AGENT_RADIUS)
            ):
                return tuple(float(v) for v in pusht.state_for_pose(agent, pose))
    raise RuntimeError("could not place the T and the pusher; the scenario is too tight")


def _pose_with_centre(centre: np.ndarray, theta: float) -> np.ndarray:
    """The T's origin pose ``[x, y, theta]`` whose keypoint centre is ``centre``."""
    offset = block_centre(np.array([0.0, 0.0, theta]))
    return np.array([centre[0] - offset[0], centre[1] - offset[1], theta])


def _anywhere(rng: np.random.Generator) -> Callable[[], np.ndarray]:
    return lambda: rng.uniform(50.0, 462.0, size=2)


def _rng(name: str, seed: int) -> np.random.Generator:
    # One stream per (scenario, seed): scenarios never share random numbers.
    key = sum(ord(c) * 31**k for k, c in enumerate(name)) % (2**31)
    return np.random.default_rng([int(seed), key])


def _shove(seed: int) -> Scenario:
    rng = _rng("shove", seed)
    goal = goal_centre(pusht.DEFAULT_PROMPT)

    def block() -> np.ndarray:
        # Start close to the goal, so that the pusher is making progress when it is hit.
        r, phi = rng.uniform(60.0, 110.0), rng.uniform(-np.pi, np.pi)
        centre = goal + r * np.array([np.cos(phi), np.sin(phi)])
        return _pose_with_centre(centre, pusht.goal_pose(pusht.DEFAULT_PROMPT)[2]
                                 + rng.uniform(-0.6, 0.6))

    init = _place(rng, block, _anywhere(rng))
    shoves = (Shove(after_step=int(rng.integers(8, 13)), distance=float(rng.uniform(80, 120)),
                    bearing=float(rng.uniform(-0.8, 0.8)), dtheta=float(rng.uniform(-1.0, 1.0))),)
    return Scenario(
        name="shove", seed=seed, prompt=pusht.DEFAULT_PROMPT, initial_state=init,
        description="the T is knocked 80-120 px away from its goal after step 8-12",
        shoves=shoves, max_steps=50,
    )  # fmt: skip


#: The prompt whose goal lies towards each wall (y grows downwards).
_WALL_PROMPTS = {
    "left": "push the T to the left",
    "right": "push the T to the right",
    "top": "push the T up",
    "bottom": "push the T down",
}


def _edge(seed: int) -> Scenario:
    rng = _rng("edge", seed)
    wall = ("left", "right", "top", "bottom")[int(rng.integers(4))]

    def block() -> np.ndarray:
        # The T's centre 80-95 px from the wall, at about the goal's distance from it:
        # getting behind the T means squeezing the pusher past the wall, and the pushes
        # along the wall press the T into it (the scripted pusher fails ~40 % of seeds).
        d, along = rng.uniform(80.0, 95.0), rng.uniform(150.0, 362.0)
        across = d if wall in ("left", "top") else pusht.WORLD_SIZE - d
        vertical = wall in ("left", "right")
        centre = np.array([across, along] if vertical else [along, across])
        return _pose_with_centre(centre, rng.uniform(-np.pi, np.pi))

    init = _place(rng, block, _anywhere(rng), min_edge=30.0)
    return Scenario(
        name="edge", seed=seed, prompt=_WALL_PROMPTS[wall], initial_state=init,
        description=f"the T starts near the {wall} wall, its goal on that side; a corner "
                    "of the T within 20 px of the border is a failure",
        edge_margin=20.0, max_steps=50,
    )  # fmt: skip


#: The forbidden zone of ``forbidden_zone``: across the straight path from the bottom to
#: the goal of "push the T up" (the goal's centre, (224, 192), lies above it).
FORBIDDEN_ZONE = Rect(186.0, 262.0, 326.0, 322.0)


def _zone(seed: int) -> Scenario:
    rng = _rng("forbidden_zone", seed)

    def block() -> np.ndarray:
        centre = np.array([256.0 + rng.uniform(-30, 30), 405.0 + rng.uniform(-10, 10)])
        return _pose_with_centre(centre, rng.uniform(-np.pi, np.pi))

    def agent() -> np.ndarray:
        return np.array([rng.uniform(60.0, 452.0), rng.uniform(330.0, 480.0)])

    init = _place(rng, block, agent, zone=FORBIDDEN_ZONE)
    return Scenario(
        name="forbidden_zone", seed=seed, prompt="push the T up", initial_state=init,
        description="the T's centre must not enter a 140 x 60 px zone that lies across "
                    "the straight path to its goal",
        forbidden_zone=FORBIDDEN_ZONE, max_steps=50,
    )  # fmt: skip


def _stuck(seed: int) -> Scenario:
    rng = _rng("stuck", seed)
    sx, sy = (bool(b) for b in rng.integers(0, 2, size=2))

    def block() -> np.ndarray:
        c = rng.uniform(88.0, 100.0, size=2)
        centre = np.array([pusht.WORLD_SIZE - c[0] if sx else c[0],
                           pusht.WORLD_SIZE - c[1] if sy else c[1]])  # fmt: skip
        return _pose_with_centre(centre, rng.uniform(-np.pi, np.pi))

    init = _place(rng, block, _anywhere(rng), min_edge=12.0)
    return Scenario(
        name="stuck", seed=seed, prompt=pusht.DEFAULT_PROMPT, initial_state=init,
        description="the T starts jammed in a corner; 14 steps without a coverage gain "
                    "of 0.02 (a stuck contact) is a failure",
        stall_steps=14, min_progress=0.02, max_steps=50,
    )  # fmt: skip


#: The suite: scenario name -> builder(seed).
SCENARIOS: dict[str, Callable[[int], Scenario]] = {
    "shove": _shove,
    "edge": _edge,
    "forbidden_zone": _zone,
    "stuck": _stuck,
}


def scenario_names() -> list[str]:
    return list(SCENARIOS)


def make_scenario(name: str, seed: int) -> Scenario:
    """Scenario ``name`` of the suite, drawn from ``seed`` (same seed, same scenario)."""
    try:
        build = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; the suite {SUITE_NAME} v{SUITE_VERSION} "
                         f"has {', '.join(SCENARIOS)}") from None  # fmt: skip
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"scenario seed must be a non-negative int, got {seed!r}")
    return build(int(seed))


# --- editing the real world ----------------------------------------------------------------
# Rows of pusht-sim's "physics/bodies" tensor ([agent, block], see
# arcfab_gym.models.pymunk_state): p(2) v(2) f(2) a w t transform(6) v_bias(2) w_bias.
_P, _V, _F, _A, _W, _T, _TRANSFORM, _BIAS = 0, 2, 4, 6, 7, 8, 9, 15
_BLOCK_ROW = 1


def place_block(state: ModelState, block_pose: Sequence[float]) -> ModelState:
    """A copy of pusht-sim ``state`` with the T moved to ``block_pose`` (at rest).

    Why not pymunk's setters: the simulator's state is the raw ``cpBody`` fields, which
    ``load_state`` writes back exactly; this writes a consistent set of them (the centre
    of gravity, the body transform, zero velocities and bias velocities) and drops the
    cached contacts, whose impulses belong to the old pose. Gym-pusht runs with damping
    0 (bodies stop at once when nothing pushes them), so a shove is a displacement, not a
    velocity.
    """
    x, y, theta = (float(v) for v in block_pose[:3])
    c, s = math.cos(theta), math.sin(theta)
    cog = pusht.T_CENTRE_OF_GRAVITY
    tensors = {k: v.clone() for k, v in state.tensors.items()}
    row = tensors["physics/bodies"][_BLOCK_ROW]
    row.zero_()
    row[_P] = x + c * cog[0] - s * cog[1]
    row[_P + 1] = y + s * cog[0] + c * cog[1]
    row[_A] = theta
    row[_TRANSFORM : _TRANSFORM + 6] = torch.tensor([c, s, -s, c, x, y], dtype=row.dtype)
    tensors["physics/arbiters_f"] = tensors["physics/arbiters_f"][:0].clone()
    tensors["physics/arbiters_i"] = tensors["physics/arbiters_i"][:0].clone()
    poses = tensors["video/poses"]
    poses[-1, 2:5] = torch.tensor([x, y, theta], dtype=poses.dtype)
    cov = pusht.coverage(pusht.t_polygon(np.array([x, y, theta])), poses[-1, 5:8].numpy())
    meta = {**state.meta, "coverage": cov, "is_success": bool(cov > pusht.SUCCESS_THRESHOLD),
            "n_contacts": 0}  # fmt: skip
    return ModelState(tensors, meta)


def shoved_pose(shove: Shove, block_pose: np.ndarray, agent_xy: np.ndarray,
                prompt: str) -> np.ndarray | None:
    """Where ``shove`` puts the T: the first pose that clears the walls and the pusher,
    trying the full push turned by 0, +-0.5, +-1 rad off its bearing, then half of it,
    and so on; ``None`` if even a 1/32 push does not fit."""
    centre = block_centre(block_pose)
    away = centre - goal_centre(prompt)
    heading = math.atan2(away[1], away[0]) if np.linalg.norm(away) > 1e-6 else 0.0
    heading += shove.bearing
    for k in range(6):
        f = 0.5**k
        theta = float(block_pose[2]) + f * shove.dtheta
        for turn in (0.0, 0.5, -0.5, 1.0, -1.0):
            direction = np.array([math.cos(heading + turn), math.sin(heading + turn)])
            pose = _pose_with_centre(centre + f * shove.distance * direction, theta)
            if (edge_distance(pose) >= WALL_LO + 3.0
                    and _clear_of(pose, agent_xy, AGENT_RADIUS + 2.0)):
                return pose
    return None


# --- the real world ------------------------------------------------------------------------
@dataclass
class WorldStep:
    """One real step of a scenario."""

    observation: dict[str, np.ndarray]
    reward: float
    coverage: float
    success: bool
    failure: str | None
    """forbidden_zone, edge or stalled; None while the episode is not failed."""
    events: list[str]
    """Exogenous events applied after this step (e.g. "shove 96 px")."""
    done: bool
    """Success, failure, or the scenario's step limit."""


class ScenarioWorld:
    """The real Push-T of a scenario: pusht-sim plus the scenario's events and rules.

    Args:
        scenario: what to run.
        frame_size: side of decoded frames (64 = mini-dreamzero's frames, for resync).
    """

    def __init__(self, scenario: Scenario, *, frame_size: int = 64):
        self.scenario = scenario
        self.sim = PushTSim(action_repeat=ACTION_REPEAT, frame_size=frame_size)
        self.steps = 0
        self.actions: list[np.ndarray] = []
        self.events: list[tuple[int, str]] = []
        self.failure: str | None = None
        self._best = 0.0
        self._best_step = 0
        self._coverage = 0.0

    def reset(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        sc = self.scenario
        obs, info = self.sim.start(sc.prompt, sc.seed, np.asarray(sc.initial_state))
        self.steps, self.actions, self.events, self.failure = 0, [], [], None
        self._coverage = self._best = float(info["coverage"])
        self._best_step = 0
        return obs, info

    @property
    def coverage(self) -> float:
        return self._coverage

    @property
    def poses(self) -> np.ndarray:
        """``[steps + 1, 8]`` pose history (agent x, y; block x, y, angle; goal x, y, theta)."""
        return self.sim.extract_state().tensors["video/poses"].numpy()

    def step(self, action: np.ndarray) -> WorldStep:
        if self.failure is not None or self.steps >= self.scenario.max_steps:
            raise RuntimeError(f"scenario {self.scenario.name!r} episode is over; call reset()")
        out = self.sim.step(action)
        self.steps += 1
        self.actions.append(np.asarray(action, dtype=np.float64).copy())
        events = self._apply_events()
        obs = self.sim.observe()
        # A shove changed the T after the physics step: read the coverage it left.
        cov = float(self.sim.extract_state().meta["coverage"] if events else out.info["coverage"])
        self._coverage = cov
        success = cov > pusht.SUCCESS_THRESHOLD
        self.failure = None if success else self._check_failure(obs, cov)
        done = success or self.failure is not None or self.steps >= self.scenario.max_steps
        return WorldStep(obs, pusht.reward_from_coverage(cov), cov, success, self.failure,
                         events, done)  # fmt: skip

    def _apply_events(self) -> list[str]:
        done = []
        for shove in self.scenario.shoves:
            if shove.after_step != self.steps:
                continue
            obs = self.sim.observe()
            pose = shoved_pose(shove, obs["block_pose"].astype(np.float64),
                               obs["agent_pos"].astype(np.float64), self.scenario.prompt)
            if pose is None:
                done.append("shove skipped (no room)")
                continue
            moved = float(np.linalg.norm(block_centre(pose) - block_centre(obs["block_pose"])))
            self.sim.load_state(place_block(self.sim.extract_state(), pose))
            done.append(f"shove {moved:.0f} px")
        self.events.extend((self.steps, e) for e in done)
        return done

    def _check_failure(self, obs: Mapping[str, np.ndarray], cov: float) -> str | None:
        sc = self.scenario
        pose = obs["block_pose"].astype(np.float64)
        if sc.forbidden_zone is not None and sc.forbidden_zone.contains(block_centre(pose)):
            return "forbidden_zone"
        if sc.edge_margin is not None and edge_distance(pose) < sc.edge_margin:
            return "edge"
        if sc.stall_steps is not None:
            if cov >= self._best + sc.min_progress:
                self._best, self._best_step = cov, self.steps
            elif self.steps - self._best_step >= sc.stall_steps:
                return "stalled"
        return None

    def close(self) -> None:
        self.sim.close()


# --- the detector ------------------------------------------------------------------------
@dataclass
class DetectorConfig:
    """What counts as a predicted failure."""

    lookahead: int = 6
    """Imagined steps checked before each real action."""
    coverage_drop: float = 0.15
    """Flag a predicted coverage this far below the current one (0..1)."""
    edge_margin: float = 25.0
    """Flag a predicted T corner closer than this (px) to the border."""
    edge_tolerance: float = 2.0
    """Inside the edge band already, flag only a corner predicted this much (px) closer."""
    zone_margin: float = 5.0
    """Grow the forbidden zone by this (px) when checking predictions."""
    stall_px: float = 4.0
    """Stalled: over the whole lookahead the T's centre stays within this (px) of now..."""
    stall_angle: float = 0.05
    """... and its angle within this (rad) ..."""
    stall_progress: float = 0.01
    """... the coverage never rises this much above now ..."""
    contact_px: float = 80.0
    """... while the pusher ends within this (px) of the T's centre: pushing, not moving."""
    check_coverage: bool = True
    check_edge: bool = True
    check_zone: bool = True
    check_stall: bool = True

    def validate(self) -> None:
        n = self.lookahead
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"detector.lookahead must be an int >= 1, got {n!r}")
        if not 0.0 < self.coverage_drop <= 1.0:
            raise ValueError(
                f"detector.coverage_drop must be in (0, 1], got {self.coverage_drop!r}")
        for name in ("edge_margin", "edge_tolerance", "zone_margin", "stall_px", "contact_px"):
            value = getattr(self, name)
            if not 0.0 <= value < pusht.WORLD_SIZE / 4:
                raise ValueError(f"detector.{name} must be in [0, 128) px, got {value!r}")
        if not 0.0 <= self.stall_angle < np.pi:
            raise ValueError(f"detector.stall_angle must be in [0, pi) rad, got {self.stall_angle!r}")
        if not 0.0 <= self.stall_progress <= 1.0:
            raise ValueError(
                f"detector.stall_progress must be in [0, 1], got {self.stall_progress!r}")


@dataclass(frozen=True)
class PredictedFrame:
    """What the detector reads of one imagined frame."""

    block_pose: np.ndarray
    coverage: float
    agent_pos: np.ndarray | None = None
    """The pusher (the stall check needs it; frames without one are never stalled)."""

    @classmethod
    def from_step(cls, observation: Mapping[str, np.ndarray],
                  info: Mapping[str, Any]) -> "PredictedFrame":
        """From a backend's step: its observation and the coverage in its info (pusht-sim's
        physics, or a learned model's reward head)."""
        return cls(np.asarray(observation["block_pose"], dtype=np.float64), float(info["coverage"]),
                   np.asarray(observation["agent_pos"], dtype=np.float64))


@dataclass(frozen=True)
class Detection:
    """The earliest predicted failure of a future, or none."""

    kind: str | None = None
    """coverage_drop, edge, forbidden_zone or stalled."""
    step: int | None = None
    """1-based index of the imagined step where it happens."""
    detail: str = ""

    @property
    def flagged(self) -> bool:
        return self.kind is not None


class FailureDetector:
    """Flags the first predicted failure in an imagined future.

    The checks are the scenario rules a planner cannot see in its reward: the T's centre
    entering the forbidden zone (grown by ``zone_margin``), a T corner coming within
    ``edge_margin`` of the border, and the coverage falling ``coverage_drop`` below its
    current value (progress being undone, e.g. by pushing the T the wrong way), and a
    stall: over the whole lookahead the pusher stays at the T but neither the T nor the
    coverage moves (a stuck contact, e.g. the T jammed in a corner).

    The checks compare the future with *now*: a T that already lies within the edge band
    (it starts in a corner, say) is flagged only if the future takes it closer to the
    border, and a T inside the zone's safety margin only if it is predicted inside the
    zone itself -- otherwise every prediction would be flagged and every alternative
    rejected, which tells a recovering agent nothing.
    """

    def __init__(self, cfg: DetectorConfig, *, forbidden_zone: Rect | None = None):
        cfg.validate()
        self.cfg = cfg
        self.zone = forbidden_zone

    def check(self, now: PredictedFrame, future: Sequence[PredictedFrame]) -> Detection:
        """The earliest failure of ``future`` (imagined frames 1, 2, ...) seen from ``now``
        (the current, real frame)."""
        if not math.isfinite(now.coverage):
            raise ValueError(f"the current coverage must be finite, got {now.coverage!r}")
        cfg = self.cfg
        edge_now = edge_distance(now.block_pose)
        near_zone_now = self.zone is not None and self.zone.contains(
            block_centre(now.block_pose), margin=cfg.zone_margin)
        for k, frame in enumerate(future, start=1):
            pose = frame.block_pose
            if cfg.check_zone and self.zone is not None:
                centre = block_centre(pose)
                margin = 0.0 if near_zone_now else cfg.zone_margin
                if self.zone.contains(centre, margin=margin):
                    where = f"centre at ({centre[0]:.0f}, {centre[1]:.0f})"
                    return Detection("forbidden_zone", k, where)
            if cfg.check_edge:
                d = edge_distance(pose)
                if d < cfg.edge_margin and d < edge_now - cfg.edge_tolerance:
                    where = f"corner {d:.0f} px from the border (now {edge_now:.0f})"
                    return Detection("edge", k, where)
            if cfg.check_coverage and frame.coverage < now.coverage - cfg.coverage_drop:
                return Detection("coverage_drop", k,
                                 f"coverage {now.coverage:.2f} -> {frame.coverage:.2f}")
        if cfg.check_stall and self._stalled(now, future):
            return Detection("stalled", len(future),
                             f"the T moves < {cfg.stall_px:.0f} px in {len(future)} steps")
        return Detection()

    def _stalled(self, now: PredictedFrame, future: Sequence[PredictedFrame]) -> bool:
        cfg = self.cfg
        if len(future) < cfg.lookahead or future[-1].agent_pos is None:
            return False  # a partial future cannot show a stall
        centre_now = block_centre(now.block_pose)
        for frame in future:
            moved = np.linalg.norm(block_centre(frame.block_pose) - centre_now)
            turned = wrap_angle(frame.block_pose[2] - now.block_pose[2])
            if (moved >= cfg.stall_px or turned >= cfg.stall_angle
                    or frame.coverage >= now.coverage + cfg.stall_progress):
                return False
        last = future[-1]
        return bool(np.linalg.norm(last.agent_pos - block_centre(last.block_pose)) < cfg.contact_px)


__all__ = [
    "ACTION_REPEAT", "FORBIDDEN_ZONE", "SCENARIOS", "SUITE_NAME", "SUITE_VERSION",
    "Detection", "DetectorConfig", "FailureDetector", "PredictedFrame", "Rect", "Scenario",
    "ScenarioWorld", "Shove", "WorldStep", "block_centre", "edge_distance", "goal_centre",
    "make_scenario", "place_block", "scenario_names", "shoved_pose",
]  # fmt: skip
