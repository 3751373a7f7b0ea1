"""The contract every world-model backend implements.

A backend owns one *live* world (a simulator or a model plus its working state).
Everything above it -- snapshots, the store, sessions, the environment, planners --
talks to it only through :class:`WorldModel`, so a new backend that passes the shared
contract suite (``tests/test_backend_contract.py``) works everywhere unchanged.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from arcfab_gym.errors import InvalidActionError, UnknownPromptError


@dataclass
class ModelState:
    """Everything a backend needs to resume bit-exactly.

    ``tensors`` holds arrays (CPU, contiguous); ``meta`` holds JSON-serialisable scalars,
    strings and lists. Both are owned by the state: a backend must copy on extract and
    must not alias them after ``load_state``.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held by the tensors (the metadata is small and not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class StepOutput:
    """What one step of the world returns (gymnasium's step tuple, minus truncation)."""

    observation: dict[str, np.ndarray]
    reward: float
    terminated: bool
    info: dict[str, Any]


class WorldModel(abc.ABC):
    """A world that can be started, stepped, and whose full state can be taken and put back.

    Subclasses set ``name`` and ``prompts`` and implement the abstract methods. The action
    is a float32 vector in ``[-1, 1]^action_dim`` (the environment's action space);
    backends validate it with :meth:`check_action`.
    """

    name: ClassVar[str]
    #: The closed prompt vocabulary this backend understands.
    prompts: ClassVar[tuple[str, ...]]
    action_dim: ClassVar[int] = 2
    #: Float32 observation keys every step returns (the contract suite checks them).
    observation_keys: ClassVar[tuple[str, ...]] = ("agent_pos", "block_pose", "goal_pose")
    #: Side in pixels of the frames ``decode_frame`` returns.
    frame_size: int = 96

    # --- life cycle -------------------------------------------------------------------
    @abc.abstractmethod
    def start(
        self, prompt: str, seed: int, initial_state: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Begin a new history at frame 0 and return ``(observation, info)``.

        ``initial_state`` is a task state vector (for Push-T ``[agent_x, agent_y,
        block_x, block_y, block_angle]``); ``None`` draws one from ``seed``.
        """

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> StepOutput:
        """Advance the world by one frame under ``action`` (shape ``[action_dim]``)."""

    def step_batch(
        self, states: Sequence[ModelState], actions: np.ndarray, *, render: bool = True
    ) -> tuple[list[ModelState], list[StepOutput]]:
        """Step ``len(states)`` independent worlds once each; ``actions`` is ``[B, action_dim]``.

        The default loops over :meth:`load_state` / :meth:`step` / :meth:`extract_state`
        and leaves this model in the last world's state; batched backends override it with
        one model call. Results must equal the loop bit for bit.

        ``render=False`` is a hint from a caller that reads only the observation, reward
        and termination: a backend may leave the rest of the frame (its video) to be
        produced when it is read, provided the bits are then the same as with ``step()``.
        Backends without such a split ignore it.
        """
        actions = np.asarray(actions)
        if actions.ndim != 2 or len(actions) != len(states):
            raise InvalidActionError(
                f"step_batch needs actions of shape [{len(states)}, {self.action_dim}], "
                f"got {actions.shape}"
            )
        next_states, outputs = [], []
        for state, action in zip(states, actions):
            self.load_state(state)
            outputs.append(self.step(action))
            next_states.append(self.extract_state())
        return next_states, outputs

    # --- state ------------------------------------------------------------------------
    @abc.abstractmethod
    def extract_state(self) -> ModelState:
        """Return a deep copy of the whole working state (RNG included)."""

    @abc.abstractmethod
    def load_state(self, state: ModelState, *, include_rng: bool = True) -> None:
        """Make ``state`` the working state. With ``include_rng=False`` the sampling RNG
        keeps its current stream (ALE's ``cloneState`` semantics)."""

    @abc.abstractmethod
    def set_prompt(self, prompt: str) -> None:
        """Condition the *rest* of the history on ``prompt`` without restarting it."""

    @abc.abstractmethod
    def set_seed(self, seed: int) -> None:
        """Re-seed the sampling RNG from here on (history is kept)."""

    # --- hypotheses about its own dynamics -----------------------------------------------
    @property
    def hypotheses(self) -> int:
        """How many hypotheses about its dynamics the model holds (a learned model's
        ensemble members; 1 for one network or a simulator). See :meth:`assume`."""
        return 1

    def assume(self, state: ModelState, hypothesis: int | None) -> ModelState:
        """``state`` with everything it does from now on decided by hypothesis
        ``hypothesis`` alone (``0 .. hypotheses - 1``; None: the model's usual readout),
        its history unchanged: a rollout from each such state is one member's future,
        the "trajectory sampling" of PETS (Chua et al., 2018). A model with one
        hypothesis returns the state as it is."""
        if hypothesis is not None and not 0 <= int(hypothesis) < self.hypotheses:
            raise ValueError(f"hypothesis {hypothesis} is outside 0..{self.hypotheses - 1} "
                             f"({self.name} holds {self.hypotheses})")
        return state

    # --- introspection ------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def frame_count(self) -> int:
        """Frames in the current history (the start frame counts as frame 0)."""

    @property
    @abc.abstractmethod
    def prompt(self) -> str:
        """The prompt currently conditioning the world."""

    @property
    @abc.abstractmethod
    def seed(self) -> int:
        """The seed the sampling RNG was last set from."""

    @abc.abstractmethod
    def observe(self) -> dict[str, np.ndarray]:
        """The observation of the current frame (fresh arrays)."""

    @abc.abstractmethod
    def decode_frame(self, frame_index: int) -> np.ndarray:
        """RGB picture of frame ``frame_index`` of the history: uint8 ``[H, W, 3]``."""

    def observation_spec(self) -> dict[str, tuple[tuple[int, ...], str, float, float]] | None:
        """The backend's own observation layout, ``{key: (shape, dtype, low, high)}``, for
        a backend that is not a Push-T world; None (the default) means the Push-T task's
        observation (``agent_pos``, ``block_pose``, ``goal_pose``)."""
        return None

    def embed(self, state: ModelState) -> np.ndarray:
        """A vector describing the current frame of ``state`` in this model's own terms
        (a latent for a learned model, the physical state for a simulator): the space in
        which goal-distance objectives measure (DINO-WM style)."""
        raise NotImplementedError(f"backend {self.name!r} has no embedding for goal objectives")

    @abc.abstractmethod
    def spawn(self) -> WorldModel:
        """A new, independent instance sharing this one's weights and configuration."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; ``create_world_model(name, **config())``
        rebuilds an equivalent backend."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Safe to call twice."""

    # --- helpers shared by backends ------------------------------------------------------
    def check_prompt(self, prompt: str) -> str:
        if prompt not in self.prompts:
            raise UnknownPromptError(prompt, self.prompts)
        return prompt

    def check_action(self, action: Any) -> np.ndarray:
        """Validate an action: shape ``[action_dim]``, finite, inside ``[-1, 1]``."""
        try:
            arr = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidActionError(f"action must be numeric, got {action!r}") from exc
        if arr.shape != (self.action_dim,):
            raise InvalidActionError(
                f"action must have shape ({self.action_dim},), got {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise InvalidActionError(f"action must be finite, got {arr.tolist()}")
        if np.any(np.abs(arr) > 1.0):
            raise InvalidActionError(
                f"action must lie in [-1, 1] (the env's action space), got {arr.tolist()}"
            )
        return arr

    def check_frame_index(self, frame_index: int) -> int:
        n = self.frame_count
        if not isinstance(frame_index, (int, np.integer)):
            raise TypeError(f"frame_index must be an int, got {type(frame_index).__name__}")
        if not 0 <= frame_index < n:
            raise IndexError(
                f"frame_index {frame_index} is outside the history: valid frames are 0..{n - 1}"
            )
        return int(frame_index)


def as_observation(obs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A fresh dict of fresh arrays (gymnasium requires no aliasing between calls)."""
    return {k: np.array(v, copy=True) for k, v in obs.items()}
