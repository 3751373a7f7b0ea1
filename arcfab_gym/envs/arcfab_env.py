"""``ArcFabric-v0``: a gymnasium environment over any registered world-model backend.

The only module where gymnasium conventions live: spaces, seeding through
``self.np_random``, ``(obs, reward, terminated, truncated, info)``, rendering, and the
ALE-style ``clone_state`` / ``restore_state``. Everything else (fork, rewind, the tree) is
the :class:`~arcfab_gym.fabric.session.Session` at ``env.unwrapped.fabric``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec

from arcfab_gym.fabric.session import Session
from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.fabric.store import StateManager
from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.models import create_world_model
from arcfab_gym.tasks import pusht

DEFAULT_BACKEND = "mini-dreamzero"
#: Bounds of positions in the observation (px): the 512 px workspace plus a quarter of slack
#: on each side, since the pusher can aim at a wall and the T can be squeezed into one
#: (40 random-policy episodes reached -24 px).
POSITION_BOUNDS = (-128.0, 640.0)


class ArcFabricEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """
    ## Description

    Push-T (push a T-shaped block onto a goal region with a round pusher) played inside a
    world model. The backend is chosen by name: ``"pusht-sim"`` is gym-pusht's pymunk
    simulation itself; learned backends imitate it. Whatever the backend, its whole
    internal state can be cloned, restored, forked and rewound, and every checkpoint is
    recorded in a trajectory tree (``env.unwrapped.fabric``).

    ## Action Space

    ``Box(-1, 1, (2,), float32)``: the pusher's target position, mapped linearly onto the
    512 x 512 px workspace (``target = (action + 1) * 256``); a PD controller moves the
    pusher towards it (gym-pusht's convention, rescaled). Actions outside the box, of the
    wrong shape, or not finite raise ``InvalidActionError``.

    ## Observation Space

    A flat ``Dict`` (works with stable-baselines3's ``MultiInputPolicy``):

    | key          | shape       | dtype   | meaning                                       |
    |--------------|-------------|---------|-----------------------------------------------|
    | `agent_pos`  | (2,)        | float32 | pusher x, y in px                             |
    | `block_pose` | (3,)        | float32 | T x, y in px, angle in [0, 2 pi) rad          |
    | `goal_pose`  | (3,)        | float32 | goal x, y, angle of the current prompt        |
    | `pixels`     | (S, S, 3)   | uint8   | the current frame (only with `pixels=True`)   |

    Positions are bounded by [-128, 640] px: the workspace is [0, 512], with slack for a T
    squeezed into a wall.

    ## Rewards

    gym-pusht's: the fraction of the goal region covered by the T, divided by 0.95 and
    clipped to [0, 1].

    ## Starting State

    gym-pusht's distribution, drawn from ``self.np_random``: pusher uniform in
    [50, 450)^2, T in [100, 400)^2 at a uniform angle. ``options={"initial_state": ...}``
    sets ``[agent_x, agent_y, block_x, block_y, block_angle]``; ``options={"prompt": ...}``
    changes the goal for that episode.

    ## Episode End

    Terminated when the coverage exceeds 95 %; truncated once the frame index held in the
    env's own state reaches ``max_episode_frames`` (ALE's way: 300 for
    ``ArcFabric-PushTSim-v0``, 75 for ``ArcFabric-v0``, whose frames are 4 control steps).
    One env step is one frame, and the clock is part of what ``clone_state`` takes, so
    ``restore_state`` (or ``fabric.restore`` / ``rewind``) gives back the time that was
    left. The registered specs add no ``TimeLimit``; ``env.spec.max_episode_steps`` still
    reads the limit. (``gym.make(..., max_episode_steps=N)`` is gymnasium's own argument
    and wraps a ``TimeLimit`` whose counter lives outside the state; pass
    ``max_episode_frames=N`` instead.)

    ## Arguments

    ```python
    import gymnasium as gym
    import arcfab_gym

    env = gym.make("ArcFabric-v0", backend="pusht-sim", prompt="push the T to the left",
                   pixels=False, render_mode="rgb_array", max_snapshot_bytes=2**30)
    ```

    * `backend`: registered world-model name (`arcfab_gym.list_world_models()`).
    * `prompt`: one of `env.unwrapped.prompts` (default: the backend's first); an unknown
      prompt lists the valid ones.
    * `pixels`: add the decoded frame to the observation.
    * `render_mode`: `None` or `"rgb_array"`.
    * `max_snapshot_bytes`, `spill_dir`: the checkpoint store's memory budget and where it
      spills beyond it (default: a temporary directory).
    * `max_rewind`: how many past frames `fabric.rewind` can reach.
    * `max_episode_frames`: the episode clock's limit (`None`: never truncate).
    * `backend_kwargs`: passed to the backend (e.g. `{"frame_size": 64}`).

    ## Version History

    * v0: Initial version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        backend: str = DEFAULT_BACKEND,
        prompt: str | None = None,
        *,
        pixels: bool = False,
        render_mode: str | None = None,
        max_snapshot_bytes: int | None = None,
        spill_dir: str | Path | None = None,
        max_rewind: int | None = 1000,
        backend_kwargs: dict[str, Any] | None = None,
        max_episode_frames: int | None = None,
    ):
        if max_episode_frames is not None and (
            isinstance(max_episode_frames, bool) or int(max_episode_frames) != max_episode_frames
            or max_episode_frames < 1
        ):
            raise ValueError(
                f"max_episode_frames must be an int >= 1 or None, got {max_episode_frames!r}")
        self.max_episode_frames = None if max_episode_frames is None else int(max_episode_frames)
        self._spec: EnvSpec | None = None  # gymnasium's EnvSpec (see the spec property)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, "
                f"got {render_mode!r}"
            )
        self.render_mode = render_mode
        self.backend = backend
        self.pixels = bool(pixels)
        model = create_world_model(backend, **(backend_kwargs or {}))
        self.prompt = model.check_prompt(model.prompts[0] if prompt is None else prompt)
        #: A backend's own observation layout, or None for the Push-T task's.
        self._obs_spec = model.observation_spec()
        store = StateManager(model, max_bytes=max_snapshot_bytes, spill_dir=spill_dir)
        self.fabric = Session(
            model, state_manager=store, tree=TrajectoryTree(store=store), max_rewind=max_rewind
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(model.action_dim,), dtype=np.float32)
        lo, hi = POSITION_BOUNDS
        obs_spaces: dict[str, spaces.Space] = self._backend_spaces() if self._obs_spec else {
            "agent_pos": spaces.Box(lo, hi, shape=(2,), dtype=np.float32),
            "block_pose": spaces.Box(
                np.array([lo, lo, 0.0], dtype=np.float32),
                np.array([hi, hi, 2 * np.pi], dtype=np.float32),
                dtype=np.float32,
            ),
            "goal_pose": spaces.Box(
                np.array([lo, lo, 0.0], dtype=np.float32),
                np.array([hi, hi, 2 * np.pi], dtype=np.float32),
                dtype=np.float32,
            ),
        }
        if self.pixels:
            side = self._frame_size()
            obs_spaces["pixels"] = spaces.Box(0, 255, shape=(side, side, 3), dtype=np.uint8)
        self.observation_space = spaces.Dict(obs_spaces)
        self._closed = False

    # --- gymnasium API ----------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        prompt = self.fabric.model.check_prompt(options.pop("prompt", self.prompt))
        initial_state = options.pop("initial_state", None)
        if options:
            raise ValueError(
                f"unknown reset options {sorted(options)}; valid: 'prompt', 'initial_state'"
            )
        if initial_state is None and self._obs_spec is None:
            initial_state = pusht.sample_initial_state(self.np_random)
        # The backend's own sampling RNG is seeded from the env's, so one reset seed fixes
        # the whole episode.
        model_seed = int(self.np_random.integers(0, 2**31 - 1))
        obs, info = self.fabric.reset(prompt=prompt, seed=model_seed, initial_state=initial_state)
        return self._observation(obs), info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, _, info = self.fabric.step(action)
        # The clock is the frame index of the state itself (restored with it), not a
        # counter beside it; like TimeLimit, truncation is reported even on a terminal step.
        limit = self.max_episode_frames
        truncated = limit is not None and self.fabric.frame_index >= limit
        return self._observation(obs), float(reward), bool(terminated), truncated, info

    # gym.make sets ``env.unwrapped.spec`` with ``max_episode_steps=None`` (the registered
    # specs add no TimeLimit); report the env's own clock there, where users read it.
    @property
    def spec(self) -> EnvSpec | None:  # type: ignore[override]
        spec = self._spec
        if spec is not None and spec.max_episode_steps is None and self.max_episode_frames:
            spec = dataclasses.replace(spec, max_episode_steps=self.max_episode_frames)
        return spec

    @spec.setter
    def spec(self, value: EnvSpec | None) -> None:
        self._spec = value

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in this episode: the frame index of the current state."""
        return self.fabric.frame_index

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array'")
            return None
        return self.fabric.get_decoded_frame()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.fabric.close()
        self.fabric.state_manager.close()

    # --- ALE-style state cloning ------------------------------------------------------------
    def clone_state(self, include_rng: bool = True) -> WorldStateSnapshot:
        """The whole state as a picklable :class:`WorldStateSnapshot` (not stored in the
        tree). With ``include_rng`` it also carries the env's RNG (used by ``reset``), and
        restoring it restores the backend's sampling RNG too."""
        rng_state = _copy_rng_state(self.np_random.bit_generator.state) if include_rng else None
        snap = self.fabric.extract_state(rng_state=rng_state)
        snap.extra["include_rng"] = bool(include_rng)
        return snap

    def restore_state(self, state: WorldStateSnapshot) -> None:
        """Put back a state from :meth:`clone_state` (or any snapshot of this backend)."""
        if not isinstance(state, WorldStateSnapshot):
            raise TypeError(
                f"restore_state needs a WorldStateSnapshot from clone_state(), got "
                f"{type(state).__name__}"
            )
        include_rng = bool(state.extra.get("include_rng", True))
        self.fabric.load_snapshot(state, include_rng=include_rng)
        if include_rng and state.rng_state is not None:
            self.np_random.bit_generator.state = _copy_rng_state(state.rng_state)

    # --- extras ----------------------------------------------------------------------------
    @property
    def prompts(self) -> tuple[str, ...]:
        """The prompts this env's backend understands."""
        return tuple(self.fabric.model.prompts)

    def _frame_size(self) -> int:
        return int(self.fabric.model.frame_size)

    def _backend_spaces(self) -> dict[str, spaces.Space]:
        return {k: spaces.Box(low, high, shape=tuple(shape), dtype=np.dtype(dtype))
                for k, (shape, dtype, low, high) in self._obs_spec.items()}  # fmt: skip

    def _observation(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._obs_spec is not None:
            out = {k: np.array(obs[k], dtype=np.dtype(self._obs_spec[k][1]), copy=True) for k in self._obs_spec}
            if self.pixels:
                out["pixels"] = self.fabric.get_decoded_frame()
            return out
        out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in obs.items()}
        if self.pixels:
            out["pixels"] = self.fabric.get_decoded_frame()
        return out


def _copy_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """Copy of a numpy bit-generator state (nested dicts of ints and strings)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}
