"""``Session``: one line of history in a world -- step, checkpoint, restore, fork, rewind.

A session drives one backend instance. Its checkpoints go to a shared
:class:`~arcfab_gym.fabric.store.StateManager` and become nodes of a shared
:class:`~arcfab_gym.fabric.tree.TrajectoryTree`; a fork is a new session (a new branch) on
a new backend instance that starts from a checkpoint, so forks never disturb each other.

Every step keeps the backend state it produced (up to ``max_rewind`` frames back), so
``rewind(n)`` is a constant-time restore rather than a replay.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from arcfab_gym.errors import HistoryError, StateMismatchError
from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.fabric.store import StateManager
from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.models.base import ModelState, WorldModel


@dataclass
class _Frame:
    """One frame of a session's rewindable history."""

    frame_index: int
    state: ModelState
    action: list[float] | None = None  # the action that produced this frame
    reward: float | None = None
    checkpoint_id: str | None = None  # a checkpoint taken at exactly this frame
    anchor_id: str | None = None  # the latest checkpoint at or before this frame


@dataclass
class _Family:
    """What a session and all its forks share: ids are unique within a family."""

    counter: itertools.count = field(default_factory=lambda: itertools.count(0))
    sessions: list[Session] = field(default_factory=list)

    def new_id(self) -> str:
        return f"session-{next(self.counter)}"


class Session:
    """A line of history in a world model.

    Args:
        model: the backend instance this session drives (the session owns it).
        state_manager: the checkpoint store; a new one bound to ``model`` by default.
        tree: the trajectory tree; a new one over ``state_manager`` by default.
        session_id: defaults to ``"session-<n>"``.
        max_rewind: how many past frames are kept for :meth:`rewind` (``None``: all).
    """

    def __init__(
        self,
        model: WorldModel,
        *,
        state_manager: StateManager | None = None,
        tree: TrajectoryTree | None = None,
        session_id: str | None = None,
        max_rewind: int | None = 1000,
        _family: _Family | None = None,
    ):
        if max_rewind is not None and max_rewind < 0:
            raise ValueError(f"max_rewind must be >= 0 or None, got {max_rewind}")
        self.model = model
        self.state_manager = state_manager if state_manager is not None else StateManager(model)
        self.tree = tree if tree is not None else TrajectoryTree(store=self.state_manager)
        self._family = _family if _family is not None else _Family()
        self.session_id = session_id or self._family.new_id()
        self._family.sessions.append(self)
        self.max_rewind = max_rewind
        self._history: list[_Frame] = []
        self._owned: list[str] = []  # checkpoint ids this session holds a reference to
        self._closed = False

    # --- life cycle -----------------------------------------------------------------------
    def reset(
        self,
        *,
        prompt: str,
        seed: int,
        initial_state: np.ndarray | None = None,
        checkpoint: bool = True,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start a new history at frame 0; by default record it as a new root of the tree."""
        self._check_open()
        obs, info = self.model.start(prompt, seed, initial_state)
        self._history = [_Frame(0, self.model.extract_state())]
        if checkpoint:
            self.checkpoint(kind="root")
        info["frame_index"] = 0
        return obs, info

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Advance one frame; returns gymnasium's ``(obs, reward, terminated, truncated, info)``."""
        self._check_started()
        out = self.model.step(action)
        last = self._history[-1]
        self._history.append(
            _Frame(
                frame_index=last.frame_index + 1,
                state=self.model.extract_state(),
                action=np.asarray(action, dtype=np.float64).tolist(),
                reward=out.reward,
                anchor_id=last.anchor_id,
            )
        )
        if self.max_rewind is not None and len(self._history) > self.max_rewind + 1:
            del self._history[0]
        info = dict(out.info)
        info["frame_index"] = self.frame_index
        return out.observation, float(out.reward), bool(out.terminated), False, info

    def close(self) -> None:
        """Release this session's checkpoints (tree nodes keep theirs) and its backend."""
        if self._closed:
            return
        self._closed = True
        for cid in self._owned:
            if cid in self.state_manager:
                self.state_manager.release(cid)
        self._owned.clear()
        self._history.clear()
        self.model.close()

    # --- checkpoints ------------------------------------------------------------------------
    def checkpoint(self, **meta: Any) -> str:
        """Store the current state and record it in the tree; returns the checkpoint id.

        Extra keyword arguments become the tree node's metadata (labels, values, ...).
        """
        self._check_started()
        frame = self._history[-1]
        snap = self._snapshot(frame.state, parent_id=frame.anchor_id, extra=meta)
        cid = self.state_manager.put(snap)
        self._owned.append(cid)
        meta.setdefault("kind", "checkpoint")
        self.tree.add_node(
            cid,
            self.session_id,
            frame.frame_index,
            parent_id=frame.anchor_id if frame.anchor_id in self.tree else None,
            prompt=self.model.prompt,
            seed=self.model.seed,
            action=frame.action,
            reward=frame.reward,
            **meta,
        )
        frame.checkpoint_id = frame.anchor_id = cid
        return cid

    def restore(self, checkpoint_id: str, *, include_rng: bool = True) -> WorldStateSnapshot:
        """Make checkpoint ``checkpoint_id`` this session's current state."""
        self._check_open()
        snap = self.state_manager.get_snapshot(checkpoint_id)
        self._load(snap, include_rng=include_rng)
        self._history = self._history_to(checkpoint_id, snap)
        return snap

    def fork(
        self,
        checkpoint_id: str | None = None,
        new_prompt: str | None = None,
        new_seed: int | None = None,
        *,
        actions: Any = None,
        session_id: str | None = None,
    ) -> Session:
        """A new session continuing from ``checkpoint_id`` (default: a checkpoint of now).

        ``new_prompt`` re-conditions the rest of the history without restarting it;
        ``new_seed`` re-seeds the sampling RNG; ``actions`` (``[T, action_dim]``) are
        stepped in the new session right away. The fork point is recorded in the tree as a
        node of the new session whose parent is ``checkpoint_id``.
        """
        self._check_open()
        if checkpoint_id is None:
            checkpoint_id = self.checkpoint(kind="fork-origin")
        snap = self.state_manager.get_snapshot(checkpoint_id)
        child = Session(
            self.model.spawn(),
            state_manager=self.state_manager,
            tree=self.tree,
            session_id=session_id,
            max_rewind=self.max_rewind,
            _family=self._family,
        )
        child._load(snap, include_rng=True)
        child._history = self._history_to(checkpoint_id, snap)
        child._history[-1] = dataclasses.replace(
            child._history[-1], checkpoint_id=None, anchor_id=checkpoint_id
        )
        if new_prompt is not None:
            child.model.set_prompt(new_prompt)
        if new_seed is not None:
            child.model.set_seed(int(new_seed))
        if new_prompt is not None or new_seed is not None:
            child._history[-1].state = child.model.extract_state()
        child.checkpoint(kind="fork", forked_from=checkpoint_id)
        if actions is not None:
            for action in np.asarray(actions, dtype=np.float64).reshape(-1, self.model.action_dim):
                child.step(action)
        return child

    def rewind(self, n_steps: int = 1) -> str | None:
        """Go back ``n_steps`` frames; returns the id of a checkpoint taken at that frame,
        or ``None`` if there is none (the next checkpoint then hangs under the latest
        earlier one)."""
        self._check_started()
        if not isinstance(n_steps, (int, np.integer)) or n_steps < 0:
            raise HistoryError(f"n_steps must be a non-negative int, got {n_steps!r}")
        available = len(self._history) - 1
        if n_steps > available:
            first = self._history[0].frame_index
            raise HistoryError(
                f"cannot rewind {n_steps} steps: session {self.session_id!r} holds "
                f"{available} steps of history (frames {first}..{self.frame_index}); "
                "restore() an older checkpoint instead"
            )
        if n_steps:
            del self._history[len(self._history) - n_steps :]
            self.model.load_state(self._history[-1].state)
        return self._history[-1].checkpoint_id

    # --- keeping a model in step with the real world --------------------------------------
    def resync(self, frame: np.ndarray, agent_pos: Any = None,
               block_pose: Any = None) -> dict[str, np.ndarray]:
        """Replace the current frame with a real observation: an RGB frame the backend
        encodes into its caches, with the real task state (pusher position px, the T's
        pose ``x, y, angle``; a part left None keeps the model's prediction). Returns the
        new observation. Backends that can do it have a ``resync`` method (mini-dreamzero
        does)."""
        return self._replace_current(frame=frame, agent_pos=agent_pos, block_pose=block_pose)

    def inject_latent(self, latent: Any, agent_pos: Any = None,
                      block_pose: Any = None) -> dict[str, np.ndarray]:
        """Replace the current frame with a supplied latent (bypassing the encoder), and
        optionally its task state."""
        return self._replace_current(latent=latent, agent_pos=agent_pos, block_pose=block_pose)

    def inject_state(self, agent_pos: Any = None, block_pose: Any = None) -> dict[str, np.ndarray]:
        """Replace the current frame's task state (pusher and/or T pose) and keep its
        latent: state injection, the hybrid-control verb beside :meth:`inject_latent`."""
        return self._replace_current(verb="inject_state", agent_pos=agent_pos, block_pose=block_pose)

    def _replace_current(self, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run the backend's ``verb`` (resync by default) on the current frame and make
        the result the current history entry (a new, not yet checkpointed state)."""
        self._check_started()
        verb = kwargs.pop("verb", "resync")
        if not hasattr(self.model, verb):
            raise NotImplementedError(
                f"backend {self.model.name!r} cannot take a real frame, latent or state "
                f"(it has no {verb} method); restore a snapshot instead"
            )
        getattr(self.model, verb)(**kwargs)
        frame = self._history[-1]
        self._history[-1] = dataclasses.replace(
            frame, state=self.model.extract_state(), checkpoint_id=None
        )
        return self.model.observe()

    # --- reading ----------------------------------------------------------------------------
    @property
    def frame_index(self) -> int:
        """Index of the current frame, counted from the start of the history (forks and
        restores keep the count of the frame they start from)."""
        self._check_started()
        return self._history[-1].frame_index

    @property
    def prompt(self) -> str:
        return self.model.prompt

    @property
    def seed(self) -> int:
        return self.model.seed

    @property
    def history_length(self) -> int:
        """Steps that :meth:`rewind` can undo."""
        return max(0, len(self._history) - 1)

    @property
    def checkpoints(self) -> list[str]:
        """Checkpoints this session took or forked from, oldest first."""
        return list(self._owned)

    @property
    def actions(self) -> np.ndarray:
        """Actions of the rewindable history, ``[history_length, action_dim]``."""
        acts = [f.action for f in self._history[1:]]
        return np.asarray(acts, dtype=np.float64).reshape(-1, self.model.action_dim)

    def observe(self) -> dict[str, np.ndarray]:
        return self.model.observe()

    def get_decoded_frame(self, frame_index: int | None = None) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` of frame ``frame_index`` (default: the current one)."""
        self._check_started()
        idx = self.frame_index if frame_index is None else frame_index
        return self.model.decode_frame(idx)

    def extract_state(self, *, rng_state: dict | None = None) -> WorldStateSnapshot:
        """A snapshot of now, not stored (ALE's ``cloneState``)."""
        self._check_started()
        frame = self._history[-1]
        return self._snapshot(frame.state, parent_id=frame.anchor_id, rng_state=rng_state).copy()

    def load_snapshot(self, snapshot: WorldStateSnapshot, *, include_rng: bool = True) -> None:
        """Make ``snapshot`` the current state without touching the tree (ALE's
        ``restoreState``); the rewindable history restarts at its frame."""
        self._check_open()
        self._load(snapshot, include_rng=include_rng)
        # Snapshots are immutable by contract, so the history can share its tensors.
        state = snapshot.model_state
        self._history = [_Frame(snapshot.frame_index, state, anchor_id=snapshot.parent_id)]
        if snapshot.checkpoint_id is not None and snapshot.checkpoint_id in self.tree:
            self._history[-1].anchor_id = snapshot.checkpoint_id

    # --- internals --------------------------------------------------------------------------
    def _snapshot(self, state: ModelState, **kwargs: Any) -> WorldStateSnapshot:
        return WorldStateSnapshot(
            tensors=state.tensors,
            meta=state.meta,
            backend=self.model.name,
            backend_config=self.model.config(),
            frame_index=self._history[-1].frame_index,
            prompt=self.model.prompt,
            seed=self.model.seed,
            session_id=self.session_id,
            **kwargs,
        )

    def _load(self, snap: WorldStateSnapshot, *, include_rng: bool) -> None:
        if snap.backend != self.model.name:
            raise StateMismatchError(
                f"snapshot was taken from backend {snap.backend!r}; this session runs "
                f"{self.model.name!r}"
            )
        self.model.load_state(snap.model_state, include_rng=include_rng)

    def _history_to(self, checkpoint_id: str, snap: WorldStateSnapshot) -> list[_Frame]:
        """The rewindable history after moving to ``checkpoint_id``: this session's frames
        up to it if it lies on them, otherwise just the checkpoint's frame."""
        for k, frame in enumerate(self._history):
            if frame.checkpoint_id == checkpoint_id:
                # Copies of the frames (sharing their immutable states): a fork must not see
                # checkpoints its parent takes later on the shared prefix.
                return [dataclasses.replace(f) for f in self._history[: k + 1]]
        return [
            _Frame(
                snap.frame_index,
                snap.model_state,
                checkpoint_id=checkpoint_id,
                anchor_id=checkpoint_id,
            )
        ]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"session {self.session_id!r} is closed")

    def _check_started(self) -> None:
        self._check_open()
        if not self._history:
            raise RuntimeError(f"session {self.session_id!r} has not started: call reset()")

    def __repr__(self) -> str:
        where = f"frame {self.frame_index}" if self._history else "not started"
        return f"Session({self.session_id!r}, {self.model.name}, {where})"
