"""A thread-safe, reference-counted checkpoint store with an LRU memory budget.

:class:`StateManager` owns :class:`~arcfab_gym.fabric.snapshot.WorldStateSnapshot`
objects under short deterministic ids. Callers hold references (``retain``/``release``)
and may ``pin`` snapshots that must stay in RAM. When the in-memory bytes exceed
``max_bytes`` the least-recently-used unpinned snapshots are spilled losslessly to
safetensors files in ``spill_dir`` and loaded back on demand; a snapshot is freed only
when nobody references it and it is not pinned.

**Memory is counted per unique storage.** Backends may hand out references to immutable
tensors (``mini-dreamzero`` does: its KV-cache blocks and latent chunks are never
written once made), so many snapshots can share the same tensor storage. The store keys
each storage by ``untyped_storage().data_ptr()`` (with the device, off the CPU) and its
``nbytes()``, and keeps a reference count of the in-memory snapshots using it:
:attr:`StateManager.memory_bytes` is the bytes of the distinct storages held in memory
plus each snapshot's JSON header, and :attr:`StateManager.logical_bytes` is the old
per-snapshot sum (what full copies would cost). Spilling a snapshot frees only the storages
no other in-memory snapshot uses, so the LRU loop may have to spill several. A snapshot
loaded back from disk gets fresh, unshared tensors. The store holds the storages it
counts, so an address cannot be reused by another tensor while it is on the books.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arcfab_gym.errors import (
    BudgetError,
    RefcountError,
    StateMismatchError,
    StoreClosedError,
    UnknownCheckpointError,
)
from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.models.base import WorldModel

__all__ = ["StateManager"]


#: Identity of a tensor storage: its data pointer (CPU), or (device, data pointer).
#: Unique among live storages; the store holds every storage it counts, so an address
#: cannot be reused while it is on the books.
_StorageKey = int | tuple[str, int]


def _storages_of(
    snapshot: WorldStateSnapshot,
) -> tuple[dict[_StorageKey, torch.UntypedStorage], int]:
    """The distinct non-empty storages behind ``snapshot``'s tensors, and the tensors'
    logical bytes (``numel * element_size`` summed, as in ``size_bytes``).

    Runs on every checkpoint over every tensor (hundreds for a long history), so it
    sticks to the cheapest accessors (``str(device)`` alone would double its cost).
    """
    out: dict[_StorageKey, torch.UntypedStorage] = {}
    logical = 0
    for name, t in snapshot.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"snapshot tensor {name!r} must be a torch.Tensor, got {type(t).__name__}"
            )
        logical += t.numel() * t.element_size()
        st = t.untyped_storage()
        if not st.nbytes():
            continue
        out[st.data_ptr() if t.is_cpu else (str(t.device), st.data_ptr())] = st
    return out, logical


@dataclass
class _Entry:
    """Book-keeping for one stored checkpoint. Exactly one of ``snapshot`` (in memory)
    and ``spill_path`` (on disk) is set."""

    snapshot: WorldStateSnapshot | None
    #: ``snapshot.size_bytes()`` when stored (logical bytes: tensors as if unshared plus
    #: the header); fixed so the accounting always balances.
    size: int
    #: ``len(snapshot.header_json())`` when stored.
    header_size: int = 0
    #: The distinct storages of the in-memory snapshot (empty while spilled).
    storages: dict[_StorageKey, torch.UntypedStorage] | None = None
    refcount: int = 1
    pinned: bool = False
    spill_path: Path | None = None
    disk_size: int = 0


class _StorageBooks:
    """Reference counts of tensor storages over a set of snapshots, and the unique bytes.

    ``bytes`` = bytes of the distinct storages + the headers of the snapshots counted.
    Each counted storage object is held, so its address stays unique while counted.
    """

    def __init__(self) -> None:
        # key -> [number of counted snapshots using it, nbytes when first counted, storage]
        self.refs: dict[_StorageKey, list[Any]] = {}
        self.unique_bytes = 0
        self.header_bytes = 0
        self.logical_bytes = 0

    @property
    def bytes(self) -> int:
        return self.unique_bytes + self.header_bytes

    def added_bytes(self, storages: dict[_StorageKey, torch.UntypedStorage], header: int) -> int:
        """What :meth:`add` of these storages and header would add to :attr:`bytes`."""
        refs = self.refs
        return header + sum(st.nbytes() for k, st in storages.items() if k not in refs)

    def add(self, entry: _Entry) -> None:
        assert entry.storages is not None
        refs = self.refs
        for key, st in entry.storages.items():
            rec = refs.get(key)
            if rec is None:
                nbytes = st.nbytes()
                refs[key] = [1, nbytes, st]
                self.unique_bytes += nbytes
            else:
                rec[0] += 1
        self.header_bytes += entry.header_size
        self.logical_bytes += entry.size

    def remove(self, entry: _Entry) -> None:
        assert entry.storages is not None
        refs = self.refs
        for key in entry.storages:
            rec = refs[key]
            rec[0] -= 1
            if rec[0] == 0:
                del refs[key]
                self.unique_bytes -= rec[1]
        self.header_bytes -= entry.header_size
        self.logical_bytes -= entry.size

    def clear(self) -> None:
        self.refs.clear()
        self.unique_bytes = self.header_bytes = self.logical_bytes = 0


class _SpillArea:
    """The spill directory and the files written there.

    Kept apart from :class:`StateManager` so a ``weakref.finalize`` can clean up without
    holding a reference to the manager (which would keep it alive forever).
    """

    def __init__(self, directory: Path | None) -> None:
        self.user_dir = directory
        self.temp_dir: Path | None = None
        self.files: set[Path] = set()

    def directory(self) -> Path:
        if self.user_dir is not None:
            self.user_dir.mkdir(parents=True, exist_ok=True)
            return self.user_dir
        if self.temp_dir is None:  # created lazily: most stores never spill
            self.temp_dir = Path(tempfile.mkdtemp(prefix="arcfab-spill-"))
        return self.temp_dir

    def cleanup(self) -> None:
        """Remove what this store wrote; a user-given directory itself is kept."""
        for f in list(self.files):
            try:
                f.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                continue  # best effort at shutdown; keep going with the rest
            self.files.discard(f)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


class StateManager:
    """Stores world-state snapshots under ids ``cp000001``, ``cp000002``, ...

    Args:
        model: the world model used when a method is called without ``model=``.
        max_bytes: in-memory budget for stored snapshots (``None`` = unlimited), in
            unique bytes (see :attr:`memory_bytes`: storages shared by several snapshots
            count once). Pinned snapshots are held to the same budget, also in unique bytes.
        spill_dir: where over-budget snapshots go. Default: a private temporary
            directory, created on first spill and removed by :meth:`close` (or when the
            manager is garbage-collected). A directory you pass is never deleted; only
            the files this manager wrote in it are, on close.

    Snapshots returned by :meth:`get_snapshot`/:meth:`restore` are the stored objects,
    not copies: treat them as read-only (use ``snapshot.copy()`` to modify one). All
    methods are safe to call from several threads.
    """

    def __init__(
        self,
        model: WorldModel | None = None,
        *,
        max_bytes: int | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if max_bytes is not None:
            if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
                raise TypeError(f"max_bytes must be an int or None, got {max_bytes!r}")
            if max_bytes < 0:
                raise BudgetError(
                    f"max_bytes must be >= 0 (or None for no limit), got {max_bytes}"
                )
        self.model = model
        self._max_bytes = max_bytes
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        # In-memory, unpinned ids, least recently used first: the spill candidates.
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._freed: set[str] = set()
        self._counter = 0
        self._mem = _StorageBooks()  # every in-memory snapshot
        self._pins = _StorageBooks()  # the pinned ones (always in memory)
        self._disk_bytes = 0
        self._spills = 0
        self._loads = 0
        self._closed = False
        self._spill = _SpillArea(Path(spill_dir) if spill_dir is not None else None)
        self._finalizer = weakref.finalize(self, self._spill.cleanup)

    # --- taking snapshots ----------------------------------------------------------------
    def extract_state(
        self, model: WorldModel | None = None, **snapshot_kwargs: Any
    ) -> WorldStateSnapshot:
        """Snapshot ``model`` (or the bound model) without storing it. ``snapshot_kwargs``
        go to :meth:`WorldStateSnapshot.from_model` (session_id, parent_id, rng_state, ...)."""
        return WorldStateSnapshot.from_model(self._model_for(model), **snapshot_kwargs)

    def checkpoint(
        self,
        session_id: str,
        prompt_text: str | None = None,
        *,
        model: WorldModel | None = None,
        snapshot: WorldStateSnapshot | None = None,
        parent_id: str | None = None,
        pin: bool = False,
        rng_state: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Store the current state of ``model`` (or the bound model) and return its id.

        With ``snapshot=`` that snapshot is stored instead (``model`` is then not used) and
        the store takes ownership of it; ``session_id`` and any given ``parent_id``,
        ``rng_state`` and ``extra`` are written into it. ``prompt_text`` is a label: if it
        differs from the snapshot's prompt it is kept in ``extra["prompt_text"]``. The
        caller owns the one reference the new checkpoint starts with.
        """
        self._check_open()
        if snapshot is None:
            snap = WorldStateSnapshot.from_model(
                self._model_for(model),
                session_id=session_id,
                parent_id=parent_id,
                rng_state=rng_state,
                extra=extra,
            )
        else:
            if not isinstance(snapshot, WorldStateSnapshot):
                raise TypeError(
                    f"snapshot must be a WorldStateSnapshot, got {type(snapshot).__name__}"
                )
            snap = snapshot
            snap.session_id = session_id
            if parent_id is not None:
                snap.parent_id = parent_id
            if rng_state is not None:
                snap.rng_state = rng_state
            if extra:
                snap.extra.update(extra)
        if prompt_text is not None and prompt_text != snap.prompt:
            snap.extra["prompt_text"] = prompt_text
        return self.put(snap, pin=pin)

    # --- storing and reading -------------------------------------------------------------
    def put(self, snapshot: WorldStateSnapshot, *, pin: bool = False) -> str:
        """Store ``snapshot`` (the store owns it from now on; no copy is made), set its
        ``checkpoint_id`` and return that id. Reference count starts at 1.

        Raises :class:`BudgetError` (store unchanged) if ``pin`` and the pinned bytes
        would exceed ``max_bytes``.
        """
        if not isinstance(snapshot, WorldStateSnapshot):
            raise TypeError(f"put() needs a WorldStateSnapshot, got {type(snapshot).__name__}")
        with self._lock:
            self._check_open()
            held = self._entries.get(snapshot.checkpoint_id or "")
            if held is not None and held.snapshot is snapshot:
                raise ValueError(
                    f"this snapshot object is already stored as {snapshot.checkpoint_id!r}; "
                    "use retain() to share it, or put(snapshot.copy()) for a second checkpoint"
                )
            new_id = self._format_id(self._counter + 1)
            old_id = snapshot.checkpoint_id
            snapshot.checkpoint_id = new_id  # part of the header, so set before sizing
            try:
                header_size = len(snapshot.header_json())
                storages, tensor_bytes = _storages_of(snapshot)
                entry = _Entry(
                    snapshot=snapshot,
                    size=tensor_bytes + header_size,  # == snapshot.size_bytes()
                    header_size=header_size,
                    storages=storages,
                    pinned=pin,
                )
                if pin:
                    self._check_pin_budget(
                        self._pins.added_bytes(entry.storages, entry.header_size),
                        what=f"pinning new checkpoint {new_id}",
                    )
            except BaseException:
                snapshot.checkpoint_id = old_id  # leave the caller's object as it was
                raise
            self._counter += 1
            self._entries[new_id] = entry
            self._mem.add(entry)
            if pin:
                self._pins.add(entry)
            else:
                self._lru[new_id] = None
            try:
                self._enforce_budget()
            except BaseException:
                # The caller never got the id, so nobody could ever release it: undo.
                self._free(new_id, remember=False)
                snapshot.checkpoint_id = old_id
                raise
            return new_id

    def get_snapshot(self, checkpoint_id: str) -> WorldStateSnapshot:
        """The stored snapshot (read-only; loaded back from disk if spilled).

        It becomes the most recently used; the budget is enforced afterwards, so with a
        tight budget other snapshots -- or, if it alone exceeds the budget, this one --
        may be spilled again. The returned object stays valid either way.
        """
        with self._lock:
            entry = self._entry(checkpoint_id)
            snap = self._load_into_memory(checkpoint_id, entry)
            if not entry.pinned:
                self._lru.move_to_end(checkpoint_id)
            self._enforce_budget()
            return snap

    def restore(
        self,
        checkpoint_id: str,
        model: WorldModel | None = None,
        *,
        include_rng: bool = True,
    ) -> WorldStateSnapshot:
        """Load checkpoint ``checkpoint_id`` into ``model`` (or the bound model) and return
        its snapshot.

        The snapshot's own tensors are passed to ``model.load_state``; this relies on the
        backend contract that ``load_state`` copies and never aliases the given state.
        """
        m = self._model_for(model)
        with self._lock:
            snap = self.get_snapshot(checkpoint_id)
            if snap.backend != m.name:
                raise StateMismatchError(
                    f"checkpoint {checkpoint_id!r} was taken from backend {snap.backend!r} "
                    f"but the model to restore into is {m.name!r}; restore it into a "
                    f"{snap.backend!r} model (create_world_model({snap.backend!r}, "
                    "**snapshot.backend_config))"
                )
            m.load_state(snap.model_state, include_rng=include_rng)
            return snap

    # --- reference counting and pinning --------------------------------------------------
    def retain(self, checkpoint_id: str) -> int:
        """Add one reference; returns the new count."""
        with self._lock:
            entry = self._entry(checkpoint_id)
            entry.refcount += 1
            return entry.refcount

    def release(self, checkpoint_id: str) -> int:
        """Drop one reference; returns the new count. At 0 an unpinned checkpoint is freed
        (memory and spill file)."""
        with self._lock:
            entry = self._entry(checkpoint_id)
            if entry.refcount <= 0:
                raise RefcountError(
                    f"release({checkpoint_id!r}) called with reference count already 0 "
                    "(it is only kept alive by its pin); each release() must match one "
                    "checkpoint()/put()/retain()"
                )
            entry.refcount -= 1
            if entry.refcount == 0 and not entry.pinned:
                self._free(checkpoint_id)
            return entry.refcount

    def refcount(self, checkpoint_id: str) -> int:
        with self._lock:
            return self._entry(checkpoint_id).refcount

    def pin(self, checkpoint_id: str) -> None:
        """Keep ``checkpoint_id`` in memory (never spilled) until :meth:`unpin`.

        Raises :class:`BudgetError` (store unchanged) if the pinned bytes would exceed
        ``max_bytes``. A spilled checkpoint is loaded back first.
        """
        with self._lock:
            entry = self._entry(checkpoint_id)
            if entry.pinned:
                return
            if entry.snapshot is not None:
                added = self._pins.added_bytes(entry.storages, entry.header_size)
            else:
                added = entry.size  # loaded back from disk, nothing in it is shared
            self._check_pin_budget(added, what=f"pinning checkpoint {checkpoint_id}")
            self._load_into_memory(checkpoint_id, entry)
            self._lru.pop(checkpoint_id, None)
            entry.pinned = True
            self._pins.add(entry)
            self._enforce_budget()

    def unpin(self, checkpoint_id: str) -> None:
        """Allow ``checkpoint_id`` to spill again; frees it if nobody references it."""
        with self._lock:
            entry = self._entry(checkpoint_id)
            if not entry.pinned:
                return
            entry.pinned = False
            self._pins.remove(entry)
            if entry.refcount == 0:
                self._free(checkpoint_id)
                return
            self._lru[checkpoint_id] = None  # most recently used
            self._enforce_budget()

    def is_pinned(self, checkpoint_id: str) -> bool:
        with self._lock:
            return self._entry(checkpoint_id).pinned

    def delete(self, checkpoint_id: str, *, force: bool = False) -> None:
        """Free ``checkpoint_id`` now. Without ``force`` it must have no references left
        (a pinned checkpoint with no references is deleted)."""
        with self._lock:
            entry = self._entry(checkpoint_id)
            if entry.refcount > 0 and not force:
                raise RefcountError(
                    f"checkpoint {checkpoint_id!r} still has {entry.refcount} reference(s); "
                    "release() them first, or delete(..., force=True) to free it anyway"
                )
            self._free(checkpoint_id)

    # --- introspection -------------------------------------------------------------------
    def __contains__(self, checkpoint_id: object) -> bool:
        with self._lock:
            return checkpoint_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def ids(self) -> list[str]:
        """Ids of the stored checkpoints, oldest first."""
        with self._lock:
            return list(self._entries)

    def is_spilled(self, checkpoint_id: str) -> bool:
        with self._lock:
            return self._entry(checkpoint_id).snapshot is None

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory: each distinct tensor storage of the in-memory snapshots
        once (``untyped_storage().nbytes()``), plus every in-memory snapshot's JSON header.
        This is what ``max_bytes`` limits."""
        with self._lock:
            return self._mem.bytes

    @property
    def logical_bytes(self) -> int:
        """Sum of ``size_bytes()`` over the in-memory snapshots: what they would hold if
        none shared a storage (full copies). ``logical_bytes - memory_bytes`` is what
        sharing saves (it can be negative when views hold larger storages)."""
        with self._lock:
            return self._mem.logical_bytes

    @property
    def pinned_bytes(self) -> int:
        """Unique bytes of the pinned snapshots (counted like :attr:`memory_bytes`)."""
        with self._lock:
            return self._pins.bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of spill files on disk."""
        with self._lock:
            return self._disk_bytes

    @property
    def spill_dir(self) -> Path | None:
        """The spill directory (``None`` until a default temporary one is first needed)."""
        return self._spill.user_dir or self._spill.temp_dir

    def stats(self) -> dict[str, Any]:
        with self._lock:
            spilled = sum(1 for e in self._entries.values() if e.snapshot is None)
            return {
                "count": len(self._entries),
                "in_memory": len(self._entries) - spilled,
                "spilled": spilled,
                "pinned": sum(1 for e in self._entries.values() if e.pinned),
                "memory_bytes": self._mem.bytes,
                "logical_bytes": self._mem.logical_bytes,
                "shared_bytes_saved": self._mem.logical_bytes - self._mem.bytes,
                "unique_storages": len(self._mem.refs),
                "pinned_bytes": self._pins.bytes,
                "disk_bytes": self._disk_bytes,
                "max_bytes": self._max_bytes,
                "spills": self._spills,
                "loads": self._loads,
            }

    # --- life cycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Drop every checkpoint and remove the spill files (and a default spill dir).
        Safe to call twice; later use raises :class:`StoreClosedError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._entries.clear()
            self._lru.clear()
            self._mem.clear()
            self._pins.clear()
            self._disk_bytes = 0
            self._finalizer()  # runs _SpillArea.cleanup once

    def __enter__(self) -> StateManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"StateManager(count={s['count']}, in_memory={s['in_memory']}, "
            f"spilled={s['spilled']}, memory_bytes={s['memory_bytes']}, "
            f"max_bytes={s['max_bytes']})"
        )

    # --- internals (call with the lock held) ---------------------------------------------
    @staticmethod
    def _format_id(n: int) -> str:
        return f"cp{n:06d}"  # widens by itself past 999999

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(
                "this StateManager is closed; create a new one to store checkpoints"
            )

    def _model_for(self, model: WorldModel | None) -> WorldModel:
        m = model if model is not None else self.model
        if m is None:
            raise TypeError(
                "no world model: pass model=... or bind one with StateManager(model)"
            )
        return m

    def _entry(self, checkpoint_id: str) -> _Entry:
        self._check_open()
        entry = self._entries.get(checkpoint_id)
        if entry is None:
            n = len(self._entries)
            held = f"the store holds {n} checkpoint{'s' if n != 1 else ''}"
            if n:
                sample = list(self._entries)
                shown = ", ".join(sample[:5]) + (", ..." if n > 5 else "")
                held += f" ({shown})"
            if checkpoint_id in self._freed:
                hint = (
                    f"it was released and freed (its reference count reached 0); {held}. "
                    "retain() or pin() a checkpoint to keep it alive"
                )
            else:
                hint = f"{held}; use an id returned by checkpoint() or put()"
            raise UnknownCheckpointError(checkpoint_id, hint)
        return entry

    def _check_pin_budget(self, added: int, *, what: str) -> None:
        """``added``: the unique bytes pinning it adds (storages other pins already hold
        are not counted again)."""
        if self._max_bytes is None:
            return
        pinned = self._pins.bytes
        needed = pinned + added
        if needed > self._max_bytes:
            raise BudgetError(
                f"{what} needs {needed} bytes of pinned memory ({added} for it + "
                f"{pinned} already pinned) but max_bytes is {self._max_bytes}; "
                "raise max_bytes or unpin() other checkpoints"
            )

    def _load_into_memory(self, checkpoint_id: str, entry: _Entry) -> WorldStateSnapshot:
        if entry.snapshot is not None:
            return entry.snapshot
        assert entry.spill_path is not None
        snap = WorldStateSnapshot.load(entry.spill_path)
        storages, _ = _storages_of(snap)
        # Only touch the books after the load succeeded, so a bad file leaves them intact.
        entry.snapshot = snap
        entry.storages = storages
        self._mem.add(entry)
        self._drop_spill_file(entry)
        self._lru[checkpoint_id] = None
        self._loads += 1
        return snap

    def _enforce_budget(self) -> None:
        if self._max_bytes is None:
            return
        # Spilling one snapshot frees only the storages no other in-memory snapshot uses
        # (possibly just its header), so re-check after every spill.
        while self._mem.bytes > self._max_bytes and self._lru:
            victim = next(iter(self._lru))
            self._spill_one(victim, self._entries[victim])

    def _spill_one(self, checkpoint_id: str, entry: _Entry) -> None:
        assert entry.snapshot is not None and not entry.pinned
        path = self._spill.directory() / f"{checkpoint_id}.safetensors"
        # Registered before writing so a crash mid-save still gets the file cleaned up.
        self._spill.files.add(path)
        try:
            entry.snapshot.save(path)
            disk_size = path.stat().st_size
        except BaseException:
            self._spill.files.discard(path)
            raise
        entry.spill_path = path
        entry.disk_size = disk_size
        self._mem.remove(entry)
        entry.snapshot = None
        entry.storages = None
        self._lru.pop(checkpoint_id)
        self._disk_bytes += disk_size
        self._spills += 1

    def _drop_spill_file(self, entry: _Entry) -> None:
        if entry.spill_path is None:
            return
        try:
            entry.spill_path.unlink()
            self._spill.files.discard(entry.spill_path)
        except FileNotFoundError:
            self._spill.files.discard(entry.spill_path)
        except OSError:
            pass  # still listed in _spill.files, so close() tries again
        self._disk_bytes -= entry.disk_size
        entry.spill_path = None
        entry.disk_size = 0

    def _free(self, checkpoint_id: str, *, remember: bool = True) -> None:
        entry = self._entries.pop(checkpoint_id)
        self._lru.pop(checkpoint_id, None)
        if entry.pinned:
            self._pins.remove(entry)
        if entry.snapshot is not None:
            self._mem.remove(entry)
            entry.snapshot = None
            entry.storages = None
        self._drop_spill_file(entry)
        if remember:
            self._freed.add(checkpoint_id)
