"""The service's world: live sessions grouped into trees, and every operation on them.

Framework-free (the FastAPI layer in :mod:`arcfab_gym.service.app` only translates HTTP to
these calls), thread-safe, and built on the real fabric: each tree is one
:class:`~arcfab_gym.fabric.store.StateManager` plus one
:class:`~arcfab_gym.fabric.tree.TrajectoryTree` shared by a root session and its forks.

Locking. Backends (torch models, pymunk spaces) are not thread-safe, so every operation
on a tree -- its sessions, store, tree and scratch model -- holds that tree's lock. The
registry lock only guards the id maps and counters and is never held while waiting for
a tree lock (a tree lock may be held while taking the registry lock), so the two cannot
deadlock.

Memory. Checkpoint stores never spill: ``store_budget_bytes`` is a hard budget over the
in-memory bytes of all stores together, checked before each operation that adds
checkpoints (creating, importing or forking a session, a checkpointed step, an explicit
checkpoint), which is refused with HTTP 507 once the stores hold the budget. The check
happens before the operation, so the stores can end above the budget by at most one
operation's checkpoints per concurrent request.
"""

from __future__ import annotations

import base64
import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from arcfab_gym.errors import (
    HistoryError,
    InvalidActionError,
    StateMismatchError,
    UnknownCheckpointError,
    UnknownPromptError,
)
from arcfab_gym.fabric.session import Session
from arcfab_gym.fabric.store import StateManager
from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.models import create_world_model, list_world_models
from arcfab_gym.models.base import WorldModel
from arcfab_gym.service.errors import (
    BudgetExceeded,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManySessions,
)
from arcfab_gym.service.events import EventHub
from arcfab_gym.service.png import encode_png
from arcfab_gym.service.settings import ServiceSettings
from arcfab_gym.service.snapshot_check import StateSignature, parse_snapshot, validate_snapshot

__all__ = ["Registry"]

log = logging.getLogger(__name__)

#: Tree-node meta key holding the sum of rewards along the node's lineage.
RETURN_KEY = "return"


@dataclass
class FrameFacts:
    """What the API reports about one frame of a session's rewindable history."""

    reward: float | None = None
    terminated: bool = False
    node_id: str | None = None  # the checkpoint taken at exactly this frame, if any


@dataclass
class TreeRecord:
    """One tree: a store, its trajectory tree, the sessions recording into it."""

    tree_id: str
    backend: str
    store: StateManager
    tree: TrajectoryTree
    lock: threading.RLock = field(default_factory=threading.RLock)
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    pngs: OrderedDict[str, bytes] = field(default_factory=OrderedDict)
    scratch: WorldModel | None = None  # decodes node frames
    closed: bool = False


@dataclass
class SessionRecord:
    """A live session, its tree, and a mirror of its history with the facts we report.

    ``frames`` has one entry per frame the session can rewind to, oldest first, exactly
    like the session's own history (trimmed the same way).
    """

    session_id: str
    tree: TreeRecord
    session: Session
    frames: list[FrameFacts]
    closed: bool = False

    @property
    def current(self) -> FrameFacts:
        return self.frames[-1]

    def sync_length(self) -> None:
        """Trim the mirror to the session's history length (oldest frames go first)."""
        keep = self.session.history_length + 1
        if len(self.frames) > keep:
            del self.frames[: len(self.frames) - keep]


class Registry:
    """All trees and sessions of one service instance.

    Args:
        settings: limits and defaults.
        hub: where events go (websocket clients).
    """

    def __init__(self, settings: ServiceSettings, hub: EventHub):
        self.settings = settings
        self.hub = hub
        self.started_at = time.monotonic()
        self._lock = threading.Lock()
        self._trees: dict[str, TreeRecord] = {}
        self._sessions: dict[str, SessionRecord] = {}
        self._reserved = 0  # session slots promised to operations still running
        self._tree_ids = itertools.count(1)
        self._session_ids = itertools.count(1)
        self._proto_lock = threading.Lock()
        self._prototypes: dict[str, WorldModel] = {}
        self._signatures: dict[str, StateSignature] = {}

    # --- backends ---------------------------------------------------------------------------
    def backend_names(self) -> list[str]:
        return list_world_models()

    def prototype(self, backend: str) -> WorldModel:
        """The shared, never-started instance of ``backend`` that sessions spawn from (one
        copy of the weights per backend)."""
        with self._proto_lock:
            model = self._prototypes.get(backend)
            if model is not None:
                return model
            if backend not in list_world_models():
                raise InvalidRequest(
                    f"unknown backend {backend!r}; registered backends: "
                    + ", ".join(list_world_models())
                )
            try:
                model = create_world_model(backend)
            except Exception as exc:  # a broken install, not the client's fault
                log.exception("backend %r cannot be built", backend)
                raise ServiceUnavailable(
                    f"backend {backend!r} cannot be built on this server: {exc}"
                ) from None
            self._prototypes[backend] = model
            return model

    def signature(self, backend: str) -> StateSignature:
        prototype = self.prototype(backend)
        with self._proto_lock:
            sig = self._signatures.get(backend)
            if sig is None:
                sig = self._signatures[backend] = StateSignature.of_fresh_state(prototype)
            return sig

    def backends(self) -> list[dict[str, Any]]:
        """Name, action size, prompts and frame size of every backend this server can build."""
        out = []
        for name in self.backend_names():
            try:
                model = self.prototype(name)
            except ServiceUnavailable:
                continue
            out.append(
                {
                    "name": name,
                    "action_dim": int(model.action_dim),
                    "prompts": list(model.prompts),
                    "frame_size": int(model.frame_size),
                }
            )
        return out

    # --- status -----------------------------------------------------------------------------
    def store_bytes(self) -> int:
        """In-memory bytes of every tree's checkpoint store (what the budget limits)."""
        with self._lock:
            trees = list(self._trees.values())
        total = 0
        for t in trees:
            if not t.closed:
                try:
                    total += t.store.memory_bytes
                except Exception:  # closed in the meantime  # noqa: BLE001
                    pass
        return total

    def status(self) -> dict[str, Any]:
        with self._lock:
            sessions, trees = len(self._sessions), len(self._trees)
        return {
            "sessions": sessions,
            "max_sessions": self.settings.max_sessions,
            "trees": trees,
            "store_bytes": self.store_bytes(),
            "store_budget_bytes": self.settings.store_budget_bytes,
            "backends": self.backend_names(),
            "uptime_s": time.monotonic() - self.started_at,
        }

    # --- limits -----------------------------------------------------------------------------
    def _check_budget(self, what: str) -> None:
        budget = self.settings.store_budget_bytes
        if budget is None:
            return
        used = self.store_bytes()
        if used >= budget:
            raise BudgetExceeded(
                f"store budget reached: checkpoint stores hold {used} bytes of the "
                f"{budget}-byte budget, so {what} is refused; close sessions "
                "(DELETE /api/sessions/{id}) to free their trees"
            )

    def _reserve_session_slot(self) -> None:
        with self._lock:
            n = len(self._sessions) + self._reserved
            if n >= self.settings.max_sessions:
                raise TooManySessions(
                    f"max sessions reached: {len(self._sessions)} of "
                    f"{self.settings.max_sessions} are open; close one "
                    "(DELETE /api/sessions/{id}) first"
                )
            self._reserved += 1

    def _release_session_slot(self) -> None:
        with self._lock:
            self._reserved -= 1

    # --- lookups ----------------------------------------------------------------------------
    def _session(self, session_id: str) -> SessionRecord:
        with self._lock:
            rec = self._sessions.get(session_id)
        if rec is None:
            raise NotFound(f"unknown session {session_id!r} (never created, or closed)")
        return rec

    def _tree(self, tree_id: str) -> TreeRecord:
        with self._lock:
            rec = self._trees.get(tree_id)
        if rec is None:
            raise NotFound(
                f"unknown tree {tree_id!r} (never created, or all its sessions were closed)"
            )
        return rec

    @contextmanager
    def _locked_session(self, session_id: str) -> Iterator[SessionRecord]:
        """The session, with its tree's lock held and the session checked still open."""
        rec = self._session(session_id)
        with rec.tree.lock:
            self._check_open_session(rec)
            yield rec

    @staticmethod
    def _check_open_session(rec: SessionRecord) -> None:
        """Call with the tree lock held: the session may have closed while we waited."""
        if rec.closed:
            raise NotFound(f"unknown session {rec.session_id!r} (closed)")

    @staticmethod
    def _check_node(tree: TreeRecord, node_id: str) -> None:
        if tree.closed:
            raise NotFound(f"unknown tree {tree.tree_id!r} (closed)")
        if node_id not in tree.tree:
            raise NotFound(f"unknown node {node_id!r} in tree {tree.tree_id!r}")

    # --- views ------------------------------------------------------------------------------
    def info(self, rec: SessionRecord) -> dict[str, Any]:
        """SessionInfo of ``rec`` (call with its tree lock held)."""
        s = rec.session
        facts = rec.current
        return {
            "session_id": rec.session_id,
            "tree_id": rec.tree.tree_id,
            "backend": rec.tree.backend,
            "prompt": s.prompt,
            "seed": int(s.seed),
            "frame_index": int(s.frame_index),
            "action_dim": int(s.model.action_dim),
            "history_length": int(s.history_length),
            "node_id": facts.node_id,
            "reward": facts.reward,
            "terminated": bool(facts.terminated),
        }

    def get_session(self, session_id: str) -> dict[str, Any]:
        with self._locked_session(session_id) as rec:
            return self.info(rec)

    def list_sessions(self) -> list[dict[str, Any]]:
        with self._lock:
            recs = list(self._sessions.values())
        out = []
        for rec in recs:
            with rec.tree.lock:
                if not rec.closed:
                    out.append(self.info(rec))
        return out

    def list_trees(self) -> list[dict[str, Any]]:
        with self._lock:
            trees = list(self._trees.values())
        out = []
        for t in trees:
            with t.lock:
                if t.closed:
                    continue
                out.append(
                    {
                        "tree_id": t.tree_id,
                        "backend": t.backend,
                        "sessions": list(t.sessions),
                        "node_count": len(t.tree),
                        "root_ids": t.tree.roots,
                        "store_bytes": t.store.memory_bytes,
                    }
                )
        return out

    # --- events -----------------------------------------------------------------------------
    def _frame_png(self, rec: SessionRecord) -> bytes:
        return encode_png(rec.session.get_decoded_frame())

    def _emit(self, kind: str, rec: SessionRecord, *, with_frame: bool = True) -> None:
        """Publish an event about ``rec``'s current frame (call with the tree lock held).

        The frame is only encoded when a client listens to this tree; a node's PNG is
        kept in the tree's frame cache for ``GET .../nodes/{id}/frame.png``.
        """
        tree = rec.tree
        if not self.hub.wants(tree.tree_id):
            return
        node_id = rec.current.node_id if not rec.closed else None
        png_b64 = None
        if with_frame and not rec.closed:
            png = self._frame_png(rec)
            if node_id is not None:
                self._cache_png(tree, node_id, png)
            png_b64 = base64.b64encode(png).decode("ascii")
        self.hub.publish(
            {
                "type": kind,
                "tree_id": tree.tree_id,
                "session_id": rec.session_id,
                "node_id": node_id,
                "frame_index": None if rec.closed else int(rec.session.frame_index),
                "frame_png": png_b64,
            }
        )

    def _cache_png(self, tree: TreeRecord, node_id: str, png: bytes) -> None:
        tree.pngs[node_id] = png
        tree.pngs.move_to_end(node_id)
        while len(tree.pngs) > self.settings.frame_cache_entries:
            tree.pngs.popitem(last=False)

    # --- tree-node bookkeeping ---------------------------------------------------------------
    @staticmethod
    def _annotate(tree: TreeRecord, node_id: str, *, terminated: bool | None = None) -> None:
        """Give a new node its ``return`` (sum of the rewards along its lineage; a node at
        the same frame as its parent adds nothing) and, if known, ``terminated``."""
        node = tree.tree.get_node(node_id)
        ret = 0.0
        if node.parent_id is not None:
            parent = tree.tree.get_node(node.parent_id)
            ret = float(parent.meta.get(RETURN_KEY, 0.0))
            if node.frame_index != parent.frame_index:
                ret += float(node.meta.get("reward") or 0.0)
        meta: dict[str, Any] = {RETURN_KEY: ret}
        if terminated is not None:
            meta["terminated"] = bool(terminated)
        tree.tree.update_node(node_id, **meta)

    @staticmethod
    def _facts_of_node(tree: TreeRecord, node_id: str) -> FrameFacts:
        meta = tree.tree.get_node(node_id).meta
        reward = meta.get("reward")
        return FrameFacts(
            reward=None if reward is None else float(reward),
            terminated=bool(meta.get("terminated", False)),
            node_id=node_id,
        )

    def _new_session_id(self) -> str:
        with self._lock:
            return f"s{next(self._session_ids)}"

    def _register(self, rec: SessionRecord) -> None:
        """Make a built session visible (the caller then releases its reserved slot)."""
        with self._lock:
            self._sessions[rec.session_id] = rec
            self._trees.setdefault(rec.tree.tree_id, rec.tree)
        rec.tree.sessions[rec.session_id] = rec

    # --- creating sessions ------------------------------------------------------------------
    def _new_tree(self, backend: str) -> TreeRecord:
        store = StateManager(self.prototype(backend), max_bytes=None)
        with self._lock:
            tree_id = f"t{next(self._tree_ids)}"
        return TreeRecord(tree_id, backend, store, TrajectoryTree(store=store))

    def _close_tree(self, tree: TreeRecord) -> None:
        """Free a tree with no sessions left (call with its lock held)."""
        tree.closed = True
        with self._lock:
            self._trees.pop(tree.tree_id, None)
        tree.tree.clear()
        tree.store.close()
        tree.pngs.clear()
        if tree.scratch is not None:
            tree.scratch.close()
            tree.scratch = None

    def create_session(self, backend: str | None, prompt: str | None, seed: int) -> dict:
        """A new session at frame 0 of a new tree; its root checkpoint is recorded."""
        backend = backend or self.settings.backend_default
        prototype = self.prototype(backend)
        prompt = prototype.prompts[0] if prompt is None else prompt
        if prompt not in prototype.prompts:
            raise InvalidRequest(str(UnknownPromptError(prompt, prototype.prompts)))
        self._reserve_session_slot()
        try:
            self._check_budget("creating a session")

            def start(session: Session) -> str:
                session.reset(prompt=prompt, seed=int(seed))
                return session.checkpoints[-1]

            return self._open_in_new_tree(backend, prototype, start)
        finally:
            self._release_session_slot()

    def import_snapshot(self, data: bytes) -> dict:
        """A new session (in a new tree) continuing from an uploaded snapshot."""
        if len(data) > self.settings.max_upload_bytes:
            raise PayloadTooLarge(  # the middleware normally refuses this first
                f"snapshot of {len(data)} bytes exceeds the {self.settings.max_upload_bytes}-"
                "byte upload limit"
            )
        self._reserve_session_slot()  # the cheap refusals first, then the validation
        try:
            self._check_budget("importing a snapshot")
            snap = parse_snapshot(data)
            if snap.backend not in self.backend_names():
                raise InvalidRequest(
                    f"snapshot was taken from backend {snap.backend!r}, which is not "
                    f"registered here (registered: {', '.join(self.backend_names())})"
                )
            prototype = self.prototype(snap.backend)
            snap = validate_snapshot(snap, prototype, self.signature(snap.backend))

            def start(session: Session) -> str:
                try:
                    session.load_snapshot(snap)
                except (StateMismatchError, ValueError) as exc:
                    raise InvalidRequest(f"snapshot does not load: {exc}") from None
                return session.checkpoint(kind="import")

            return self._open_in_new_tree(snap.backend, prototype, start)
        finally:
            self._release_session_slot()

    def _open_in_new_tree(self, backend: str, prototype: WorldModel,
                          start: Callable[[Session], str]) -> dict:
        """Build a session in a new tree, ``start`` it (returns its root checkpoint id),
        register it and announce it; the caller holds a reserved session slot."""
        tree = self._new_tree(backend)
        with tree.lock:
            session = Session(
                prototype.spawn(),
                state_manager=tree.store,
                tree=tree.tree,
                session_id=self._new_session_id(),
                max_rewind=self.settings.max_rewind,
            )
            try:
                root = start(session)
            except BaseException:
                session.close()
                self._close_tree(tree)  # never registered: nothing else refers to it
                raise
            self._annotate(tree, root, terminated=False)
            rec = SessionRecord(session.session_id, tree, session, [FrameFacts(node_id=root)])
            self._register(rec)
            self._emit("session_created", rec)
            return self.info(rec)

    def close_session(self, session_id: str) -> dict:
        """Close a session; a tree whose last session closes is freed with its store."""
        with self._locked_session(session_id) as rec:
            tree = rec.tree
            self._emit("session_closed", rec, with_frame=False)  # while it can still be read
            rec.closed = True
            rec.session.close()
            with self._lock:
                self._sessions.pop(session_id, None)
            tree.sessions.pop(session_id, None)
            tree_closed = not tree.sessions
            if tree_closed:
                self._close_tree(tree)
            return {"session_id": session_id, "tree_id": tree.tree_id, "tree_closed": tree_closed}

    # --- moving in a session -----------------------------------------------------------------
    def step(self, session_id: str, action: list[float], checkpoint: bool) -> dict:
        with self._locked_session(session_id) as rec:
            s = rec.session
            dim = s.model.action_dim
            if len(action) != dim:
                raise InvalidRequest(
                    f"action must have {dim} numbers for backend {rec.tree.backend!r}, "
                    f"got {len(action)}"
                )
            arr = np.asarray(action, dtype=np.float64)
            if not np.all(np.isfinite(arr)):
                raise InvalidRequest(f"action must be finite, got {action}")
            if checkpoint:
                self._check_budget("a checkpointed step")
            try:
                _, reward, terminated, _, _ = s.step(arr)
            except InvalidActionError as exc:
                raise InvalidRequest(str(exc)) from None
            rec.frames.append(FrameFacts(reward=float(reward), terminated=bool(terminated)))
            rec.sync_length()
            if checkpoint:
                cid = s.checkpoint(kind="step")
                self._annotate(rec.tree, cid, terminated=terminated)
                rec.current.node_id = cid
            self._emit("step", rec)
            return self.info(rec)

    def checkpoint(self, session_id: str, label: str | None) -> dict:
        with self._locked_session(session_id) as rec:
            self._check_budget("a checkpoint")
            meta = {"kind": "checkpoint"}
            if label is not None:
                meta["label"] = label
            cid = rec.session.checkpoint(**meta)
            self._annotate(rec.tree, cid, terminated=rec.current.terminated)
            rec.current.node_id = cid
            self._emit("checkpoint", rec)
            return {
                "checkpoint_id": cid,
                "tree_id": rec.tree.tree_id,
                "frame_index": int(rec.session.frame_index),
            }

    def restore(self, session_id: str, checkpoint_id: str) -> dict:
        with self._locked_session(session_id) as rec:
            tree = rec.tree
            self._check_node(tree, checkpoint_id)
            try:
                rec.session.restore(checkpoint_id)
            except UnknownCheckpointError as exc:
                raise NotFound(str(exc)) from None
            if rec.session.history_length == 0:
                rec.frames = [self._facts_of_node(tree, checkpoint_id)]
            else:  # back on this session's own history: its prefix up to the checkpoint
                rec.frames = rec.frames[: rec.session.history_length + 1]
                rec.current.node_id = checkpoint_id
            self._emit("restore", rec)
            return self.info(rec)

    def fork(
        self,
        session_id: str,
        checkpoint_id: str | None,
        prompt: str | None,
        seed: int | None,
    ) -> dict:
        """A new session in the same tree from ``checkpoint_id`` (default: now)."""
        rec = self._session(session_id)
        tree = rec.tree
        self._reserve_session_slot()
        try:
            with tree.lock:
                self._check_open_session(rec)
                parent = rec.session
                if checkpoint_id is not None:
                    self._check_node(tree, checkpoint_id)
                if prompt is not None and prompt not in parent.model.prompts:
                    raise InvalidRequest(str(UnknownPromptError(prompt, parent.model.prompts)))
                self._check_budget("a fork")
                if checkpoint_id is None:
                    checkpoint_id = parent.checkpoint(kind="fork-origin")
                    self._annotate(tree, checkpoint_id, terminated=rec.current.terminated)
                    rec.current.node_id = checkpoint_id
                    self._emit("checkpoint", rec)
                child = parent.fork(
                    checkpoint_id,
                    new_prompt=prompt,
                    new_seed=seed,
                    session_id=self._new_session_id(),
                )
                fork_node = child.checkpoints[-1]
                n = child.history_length + 1
                if n == 1:
                    frames = [self._facts_of_node(tree, checkpoint_id)]
                else:  # the child continues the parent's own history up to the checkpoint
                    frames = [FrameFacts(f.reward, f.terminated, f.node_id) for f in rec.frames[:n]]
                frames[-1].node_id = fork_node
                self._annotate(tree, fork_node, terminated=frames[-1].terminated)
                child_rec = SessionRecord(child.session_id, tree, child, frames)
                self._register(child_rec)
                self._emit("fork", child_rec)
                return self.info(child_rec)
        finally:
            self._release_session_slot()

    def rewind(self, session_id: str, n_steps: int) -> dict:
        with self._locked_session(session_id) as rec:
            try:
                node_id = rec.session.rewind(int(n_steps))
            except HistoryError as exc:
                raise InvalidRequest(str(exc)) from None
            if n_steps:
                del rec.frames[len(rec.frames) - n_steps :]
            rec.current.node_id = node_id
            self._emit("rewind", rec)
            return self.info(rec)

    # --- reading frames and trees ------------------------------------------------------------
    def session_frame_png(self, session_id: str, frame_index: int | None) -> bytes:
        with self._locked_session(session_id) as rec:
            s = rec.session
            if frame_index is not None and not 0 <= frame_index <= s.frame_index:
                raise InvalidRequest(
                    f"frame_index {frame_index} is outside session {session_id!r}'s history: "
                    f"valid frames are 0..{s.frame_index}"
                )
            try:
                return encode_png(s.get_decoded_frame(frame_index))
            except (IndexError, HistoryError) as exc:
                raise InvalidRequest(str(exc)) from None

    def tree_d3_json(self, tree_id: str) -> str:
        tree = self._tree(tree_id)
        with tree.lock:
            if tree.closed:
                raise NotFound(f"unknown tree {tree_id!r} (closed)")
            return tree.tree.to_d3_json()

    def node_png(self, tree_id: str, node_id: str) -> bytes:
        """The frame of a node: cached, or decoded from its snapshot on a scratch model."""
        tree = self._tree(tree_id)
        with tree.lock:
            self._check_node(tree, node_id)
            png = tree.pngs.get(node_id)
            if png is not None:
                tree.pngs.move_to_end(node_id)
                return png
            snap = tree.store.get_snapshot(node_id)
            if tree.scratch is None:
                tree.scratch = self.prototype(tree.backend).spawn()
            scratch = tree.scratch
            scratch.load_state(snap.model_state)
            png = encode_png(scratch.decode_frame(scratch.frame_count - 1))
            self._cache_png(tree, node_id, png)
            return png

    def lineage(self, tree_id: str, node_id: str) -> list[dict[str, Any]]:
        tree = self._tree(tree_id)
        with tree.lock:
            self._check_node(tree, node_id)
            return [
                {
                    "node_id": n.node_id,
                    "frame_index": n.frame_index,
                    "session_id": n.session_id,
                    "reward": n.meta.get("reward"),
                    "return": n.meta.get(RETURN_KEY),
                    "action": n.meta.get("action"),
                    "kind": n.meta.get("kind"),
                }
                for n in tree.tree.get_lineage(node_id)
            ]

    def node_snapshot_bytes(self, tree_id: str, node_id: str) -> bytes:
        tree = self._tree(tree_id)
        with tree.lock:
            self._check_node(tree, node_id)
            return tree.store.get_snapshot(node_id).to_bytes()

    # --- shutdown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close every session and tree (server shutdown)."""
        with self._lock:
            ids = list(self._sessions)
        for sid in ids:
            try:
                self.close_session(sid)
            except NotFound:
                pass
        with self._proto_lock:
            for model in self._prototypes.values():
                model.close()
            self._prototypes.clear()

