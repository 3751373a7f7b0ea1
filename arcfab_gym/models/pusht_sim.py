"""``pusht-sim``: the real Push-T task (gym-pusht, pymunk physics) as a world backend.

It is the ground truth of the project: the data source for training learned backends, an
oracle for planners, and the world in which plans are executed and scored. Its state is
captured exactly (see :mod:`arcfab_gym.models.pymunk_state`), so restoring a snapshot and
replaying the same actions gives bit-identical observations, rewards and infos.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from arcfab_gym.errors import StateMismatchError
from arcfab_gym.models.base import ModelState, StepOutput, WorldModel
from arcfab_gym.models.pymunk_state import SpaceCodec, SpaceState
from arcfab_gym.tasks import pusht
from arcfab_gym.tasks.pusht import PushTEnv

#: Columns of the per-frame pose history, the simulator's "accumulated video":
#: agent x, y; block x, y, angle; goal x, y, theta.
POSE_COLUMNS = 8
#: Spatial-hash cell size (px) and cell count: cells about the agent's diameter.
SPATIAL_HASH_DIM, SPATIAL_HASH_COUNT = 32.0, 1024


class _CanonicalPushT(PushTEnv):
    """gym-pusht's env with a coverage that does not depend on Python set order.

    gym-pusht builds its shapely polygons from ``body.shapes``, a set whose iteration
    order follows memory addresses; the area it sums can then differ in the last bit
    between two processes or two instances. Here the parts are taken in a fixed order and
    the goal polygon is cached (same geometry, and 2x faster).
    """

    def _setup(self) -> None:
        super()._setup()
        # A spatial hash keeps no pair cache between steps (gym-pusht's default bounding
        # box tree caches pairs and GJK start points), so the broad phase is a function of
        # the current state only and a restored world steps exactly like the original.
        self.space.use_spatial_hash(SPATIAL_HASH_DIM, SPATIAL_HASH_COUNT)
        # Forget a contact as soon as it separates (Chipmunk keeps it 3 steps by default).
        # A lingering separated contact sits outside the space's list of active contacts,
        # which no API can rebuild; with persistence 1 every cached contact is active, and
        # the state can be put back exactly.
        self.space.collision_persistence = 1

    def _get_coverage(self) -> float:
        pose = (*self.block.position, self.block.angle)
        if pusht.centroid_gap(pose, self.goal_pose) > pusht.OVERLAP_GAP_PX:
            return 0.0  # what shapely gives for two Ts that do not touch, without the polygons
        return pusht.coverage(pusht.t_polygon(np.array(pose)), self.goal_pose)

    def advance(self, target: np.ndarray, repeats: int) -> tuple[float, bool, int]:
        """``repeats`` of gym-pusht's ``step(target)``, stopping after a step that succeeds,
        as a loop over ``step`` would: returns the last step's coverage and success, and
        the contacts of every step taken (each step's count as gym-pusht's info gives it).

        The physics is gym-pusht's, its float operations in the same order (pymunk's
        ``Vec2d`` arithmetic written out on floats, which saves its objects' overhead).
        A step before the last needs its coverage only to know whether the episode ended
        there, so it is computed only where the T is near enough its goal to succeed
        (:data:`pusht.SUCCESS_GAP_PX`). Tested equal, bit for bit, to gym-pusht's ``step``.
        """
        substeps = int(1 / (self.dt * self.control_hz))
        per_step = int(1 / self.dt * self.control_hz)  # gym-pusht's info divides by this
        tx, ty = float(target[0]), float(target[1])
        agent, space, kp, kv, dt = self.agent, self.space, self.k_p, self.k_v, self.dt
        self._last_action = target
        contacts = 0
        for k in range(repeats):
            self.n_contact_points = 0
            for _ in range(substeps):
                px, py = agent.position
                vx, vy = agent.velocity
                agent.velocity = (vx + (kp * (tx - px) + kv * (0 - vx)) * dt,
                                  vy + (kp * (ty - py) + kv * (0 - vy)) * dt)  # fmt: skip
                space.step(dt)
            contacts += int(np.ceil(self.n_contact_points / per_step))
            last = k == repeats - 1
            pose = (*self.block.position, self.block.angle)
            if last or pusht.centroid_gap(pose, self.goal_pose) <= pusht.SUCCESS_GAP_PX:
                coverage = self._get_coverage()
                if last or coverage > self.success_threshold:
                    return coverage, bool(coverage > self.success_threshold), contacts
        raise AssertionError("unreachable: the last step returns")


class PushTSim(WorldModel):
    """The Push-T simulator behind the backend contract.

    Args:
        frame_size: side of decoded frames in pixels (gym-pusht's pixel observation).
        action_repeat: gym-pusht control steps (0.1 s each) per frame.
    """

    name = "pusht-sim"
    prompts = pusht.PROMPTS

    def __init__(self, *, frame_size: int = 96, action_repeat: int = 1):
        if int(action_repeat) < 1:
            raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
        self.frame_size = int(frame_size)
        self.action_repeat = int(action_repeat)
        self._env = _CanonicalPushT(obs_type="state", render_mode="rgb_array")
        self._codec: SpaceCodec | None = None
        # A restored state waits here until the next step needs the physics (so a burst
        # of restores costs nothing and never touches the space).
        self._pending: SpaceState | None = None
        # One [POSE_COLUMNS] row per frame; rows [:_n_frames] are valid, the rest is room
        # to grow (amortised O(1) appends, O(1)-call copies on extract).
        self._poses = np.zeros((0, POSE_COLUMNS), dtype=np.float64)  # [capacity, 8]
        self._n_frames = 0
        self._prompt = pusht.DEFAULT_PROMPT
        self._seed = 0
        self._last: dict[str, Any] = {}  # coverage / success / contacts of the last frame
        self._renderer: pusht.FrameRenderer | None = None

    # --- life cycle -----------------------------------------------------------------------
    def start(self, prompt, seed, initial_state=None):
        self.check_prompt(prompt)
        if initial_state is None:
            initial_state = pusht.sample_initial_state(np.random.default_rng(seed))
        initial_state = np.asarray(initial_state, dtype=np.float64)
        if initial_state.shape != (5,) or not np.all(np.isfinite(initial_state)):
            raise ValueError(
                "initial_state must be 5 finite numbers [agent_x, agent_y, block_x, block_y, "
                f"block_angle], got {initial_state!r}"
            )
        env = self._env
        env.reset(options={"reset_to_state": initial_state})  # new space + one physics step
        env.goal_pose = pusht.goal_pose(prompt)
        self._codec = SpaceCodec(
            env.space,
            bodies=[env.agent, env.block],
            shapes=self._shapes_in_hash_order(),
            n_static=4,
        )
        self._pending = None
        self._prompt, self._seed = prompt, int(seed)
        self._n_frames = 0
        self._append_pose()
        cov = env._get_coverage()
        self._last = {
            "coverage": cov,
            "is_success": bool(cov > pusht.SUCCESS_THRESHOLD),
            "n_contacts": 0,
        }
        return self.observe(), self._info()

    def _shapes_in_hash_order(self) -> list:
        # gym-pusht adds the 4 walls, then the agent's circle, then the T's two parts, so
        # shape k got Chipmunk hash id k; keep that order.
        env = self._env
        walls = [s for s in env.space.shapes if s.body is env.space.static_body]
        (circle,) = env.agent.shapes
        if len(walls) != 4:
            raise RuntimeError(f"expected gym-pusht's 4 walls, found {len(walls)}")
        return [*walls, circle, *env._block_shapes]

    def step(self, action):
        self._require_started()
        target = pusht.action_to_target(self.check_action(action))
        env = self._env
        if self._pending is not None:
            self._codec.load(self._pending)
            self._pending = None
        cov, success, contacts = env.advance(target, self.action_repeat)
        self._last = {"coverage": cov, "is_success": success, "n_contacts": contacts}
        self._append_pose()
        return StepOutput(
            observation=self.observe(),
            reward=pusht.reward_from_coverage(cov),
            terminated=success,
            info=self._info(),
        )

    # --- state ------------------------------------------------------------------------------
    def extract_state(self) -> ModelState:
        self._require_started()
        s = self._pending.copy() if self._pending is not None else self._codec.capture()
        return ModelState(
            tensors={
                "physics/bodies": torch.from_numpy(s.bodies.copy()),  # [2, 18] float64
                "physics/arbiters_f": torch.from_numpy(s.arbiters_f.copy()),  # [n, 28]
                "physics/arbiters_i": torch.from_numpy(s.arbiters_i.copy()),  # [n, 8]
                "physics/curr_dt": torch.tensor([s.curr_dt], dtype=torch.float64),  # [1]
                "video/poses": torch.from_numpy(self._poses[: self._n_frames].copy()),  # [T, 8]
            },
            meta={
                "prompt": self._prompt,
                "seed": self._seed,
                "coverage": self._last["coverage"],
                "is_success": self._last["is_success"],
                "n_contacts": self._last["n_contacts"],
                "action_repeat": self.action_repeat,
            },
        )

    def load_state(self, state: ModelState, *, include_rng: bool = True) -> None:
        # include_rng has nothing to act on: the simulator draws no random numbers after start.
        t, meta = state.tensors, state.meta
        missing = {"physics/bodies", "physics/arbiters_f", "physics/arbiters_i",
                   "physics/curr_dt", "video/poses"} - set(t)  # fmt: skip
        if missing:
            raise StateMismatchError(
                f"not a {self.name} state: missing tensors {sorted(missing)}"
            )
        if int(meta.get("action_repeat", 1)) != self.action_repeat:
            raise StateMismatchError(
                f"state was taken with action_repeat={meta.get('action_repeat')}, this "
                f"backend has action_repeat={self.action_repeat}"
            )
        poses = t["video/poses"].numpy()
        if poses.ndim != 2 or poses.shape[1] != POSE_COLUMNS or len(poses) == 0:
            raise StateMismatchError(f"video/poses has shape {tuple(poses.shape)}")
        self.check_prompt(meta["prompt"])
        if self._codec is None:
            # A fresh instance: build gym-pusht's world once, then overwrite its state.
            self.start(meta["prompt"], int(meta["seed"]), initial_state=poses[0, :5])
        self._pending = SpaceState(
            bodies=t["physics/bodies"].numpy().copy(),
            arbiters_f=t["physics/arbiters_f"].numpy().copy(),
            arbiters_i=t["physics/arbiters_i"].numpy().copy(),
            curr_dt=float(t["physics/curr_dt"][0]),
        )
        self._poses = poses.copy()
        self._n_frames = len(poses)
        self._prompt, self._seed = meta["prompt"], int(meta["seed"])
        self._env.goal_pose = pusht.goal_pose(self._prompt)
        self._last = {
            "coverage": float(meta["coverage"]),
            "is_success": bool(meta["is_success"]),
            "n_contacts": int(meta["n_contacts"]),
        }

    def set_prompt(self, prompt: str) -> None:
        self._require_started()
        self.check_prompt(prompt)
        self._prompt = prompt
        self._env.goal_pose = pusht.goal_pose(prompt)
        # The goal changed, so the current frame's coverage did too; the history stays.
        row = self._poses[self._n_frames - 1]
        row[5:8] = self._env.goal_pose
        cov = pusht.coverage(pusht.t_polygon(row[2:5]), row[5:8])
        self._last = {**self._last, "coverage": cov, "is_success": bool(cov > pusht.SUCCESS_THRESHOLD)}

    def set_seed(self, seed: int) -> None:
        self._seed = int(seed)

    # --- introspection ----------------------------------------------------------------------
    @property
    def frame_count(self) -> int:
        return self._n_frames

    @property
    def prompt(self) -> str:
        return self._prompt

    @property
    def seed(self) -> int:
        return self._seed

    def observe(self) -> dict[str, np.ndarray]:
        self._require_started()
        row = self._poses[self._n_frames - 1]
        return {
            "agent_pos": row[0:2].astype(np.float32),
            "block_pose": np.array(
                [row[2], row[3], row[4] % (2 * np.pi)], dtype=np.float32
            ),
            "goal_pose": row[5:8].astype(np.float32),
        }

    def decode_frame(self, frame_index: int) -> np.ndarray:
        self._require_started()
        row = self._poses[self.check_frame_index(frame_index)]
        if self._renderer is None:
            self._renderer = pusht.FrameRenderer(self.frame_size)
        return self._renderer.render(row[0:2], row[2:5], row[5:8])

    def embed(self, state: ModelState) -> np.ndarray:
        """The current frame's physical state: agent x, y and block x, y (px / 512), and
        the block angle as (sin, cos)."""
        row = state.tensors["video/poses"][-1].numpy()
        return np.array([row[0] / 512, row[1] / 512, row[2] / 512, row[3] / 512,
                         np.sin(row[4]), np.cos(row[4])])  # fmt: skip

    def spawn(self) -> PushTSim:
        return PushTSim(frame_size=self.frame_size, action_repeat=self.action_repeat)

    def config(self) -> dict[str, Any]:
        return {"frame_size": self.frame_size, "action_repeat": self.action_repeat}

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # --- helpers --------------------------------------------------------------------------
    def _require_started(self) -> None:
        if self._codec is None:
            raise RuntimeError(f"{self.name}: call start() (or load_state()) first")

    def _append_pose(self) -> None:
        if self._n_frames == len(self._poses):
            grown = np.zeros((max(64, 2 * len(self._poses)), POSE_COLUMNS), dtype=np.float64)
            grown[: self._n_frames] = self._poses[: self._n_frames]
            self._poses = grown
        self._poses[self._n_frames] = self._pose_row()
        self._n_frames += 1

    def _pose_row(self) -> np.ndarray:
        env = self._env
        return np.array(
            [*env.agent.position, *env.block.position, env.block.angle, *env.goal_pose],
            dtype=np.float64,
        )

    def _info(self) -> dict[str, Any]:
        row = self._poses[self._n_frames - 1]
        return {
            "coverage": float(self._last["coverage"]),
            "is_success": bool(self._last["is_success"]),
            "n_contacts": int(self._last["n_contacts"]),
            "agent_pos": row[0:2].copy(),
            "block_pose": row[2:5].copy(),
            "goal_pose": row[5:8].copy(),
        }
