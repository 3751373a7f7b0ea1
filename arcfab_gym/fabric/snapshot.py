"""One frozen, self-describing world state and its on-disk / on-the-wire format.

:class:`WorldStateSnapshot` bundles a backend's :class:`~arcfab_gym.models.base.ModelState`
with everything needed to rebuild and label it (backend name and config, frame index,
prompt, seed, lineage ids, env-level RNG state). Its serialised form is a plain
safetensors file -- no pickle anywhere -- whose ``__metadata__`` carries the non-tensor
fields as JSON plus a SHA-256 checksum over a canonical encoding of header and tensors,
so truncation and bit rot are detected instead of silently loading a wrong world.
"""

from __future__ import annotations

import copy as _copy
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch

from arcfab_gym.atomic import write_atomic
from arcfab_gym.errors import SnapshotFormatError
from arcfab_gym.models.base import ModelState

if TYPE_CHECKING:
    from arcfab_gym.models.base import WorldModel

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "WorldStateSnapshot",
]

#: Value of the ``arcfab.format`` metadata key; anything else is a foreign file.
FORMAT_NAME = "arcfab-gym/world-state-snapshot"
#: The version this code writes.
FORMAT_VERSION = "1"
#: Versions this code can read.
SUPPORTED_FORMAT_VERSIONS: tuple[str, ...] = ("1",)

_KEY_FORMAT = "arcfab.format"
_KEY_VERSION = "arcfab.format_version"
_KEY_HEADER = "arcfab.header"
_KEY_SHA = "arcfab.sha256"

# safetensors reserves this name for the string metadata block.
_RESERVED_TENSOR_NAME = "__metadata__"

# A safetensors file starts with a little-endian u64 header length.
_LEN_PREFIX = struct.Struct("<Q")

# Non-tensor fields written into ``arcfab.header`` and their accepted types on load.
# ``bool`` is excluded from the int fields explicitly below (bool is an int subclass).
_HEADER_FIELDS: dict[str, tuple[type, ...]] = {
    "backend": (str,),
    "backend_config": (dict,),
    "checkpoint_id": (str, type(None)),
    "created_at": (float, int),
    "extra": (dict,),
    "frame_index": (int,),
    "meta": (dict,),
    "parent_id": (str, type(None)),
    "prompt": (str,),
    "rng_state": (dict, type(None)),
    "seed": (int,),
    "session_id": (str, type(None)),
}
# Fields that identify *which* state this is rather than *what* it is; ``equals`` skips them.
_IDENTITY_FIELDS = frozenset({"created_at", "checkpoint_id"})


def _dumps(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, ASCII only, so equal headers give equal
    bytes. Python's json writes arbitrarily large ints exactly (numpy PCG64 states hold
    128-bit ints) and floats via repr, so both round-trip bit-exactly."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a CPU contiguous tensor as a uint8 numpy view (no copy when the
    tensor is already contiguous). ``reshape(-1)`` first because 0-d tensors cannot be
    dtype-viewed; viewing as uint8 makes bfloat16/bool (no numpy dtype) work and compares
    NaN payloads bitwise."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _as_cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _checksum(header_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a length-prefixed encoding of the header and of every tensor's name,
    dtype, shape and bytes in sorted name order. Length prefixes make the encoding
    unambiguous (no two different inputs concatenate to the same stream)."""
    h = hashlib.sha256()

    def block(data: bytes | Any) -> None:
        view = memoryview(data)
        h.update(_LEN_PREFIX.pack(view.nbytes))
        h.update(view)

    block(f"{FORMAT_NAME}\0{FORMAT_VERSION}".encode())
    block(header_json.encode("utf-8"))
    h.update(_LEN_PREFIX.pack(len(tensors)))
    for name in sorted(tensors):
        t = _as_cpu_contiguous(tensors[name])
        block(name.encode("utf-8"))
        block(str(t.dtype).removeprefix("torch.").encode())
        h.update(_LEN_PREFIX.pack(t.dim()))
        for d in t.shape:
            h.update(_LEN_PREFIX.pack(d))
        block(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes_t(t: torch.Tensor) -> torch.Tensor:
    """Like :func:`_tensor_bytes` but stays a tensor (for ``torch.equal``)."""
    return t.reshape(-1).view(torch.uint8)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = _as_cpu_contiguous(a), _as_cpu_contiguous(b)
    return bool(torch.equal(_tensor_bytes_t(a), _tensor_bytes_t(b)))


def _format_error(source: str, reason: str, fix: str = "") -> SnapshotFormatError:
    msg = f"cannot load world-state snapshot from {source}: {reason}"
    if fix:
        msg += f". {fix}"
    return SnapshotFormatError(msg)


def _copy_json(value: Any) -> Any:
    """Deep copy of a JSON-like value (dicts, lists, tuples, scalars); many times faster
    than ``copy.deepcopy`` on the small dicts snapshots carry, which matters for
    ``clone_state`` in search loops."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_json(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return _copy.deepcopy(value)


@dataclass(eq=False)  # eq=False: tensor ``==`` is elementwise; use :meth:`equals` instead.
class WorldStateSnapshot:
    """A frozen world state: backend tensors and meta plus labels and lineage.

    Treat a snapshot as immutable once taken or handed to a store; :meth:`copy` gives an
    independent one. ``tensors`` live on the CPU; every dict field must be JSON-serialisable.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    backend: str
    backend_config: dict[str, Any]
    frame_index: int
    prompt: str
    seed: int
    session_id: str | None = None
    checkpoint_id: str | None = None
    parent_id: str | None = None
    #: Env-level RNG state (e.g. ``np.random.Generator.bit_generator.state``); JSON-able.
    rng_state: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    # --- construction --------------------------------------------------------------------
    @property
    def model_state(self) -> ModelState:
        """The backend state, sharing (not copying) this snapshot's tensors and meta;
        backends copy on ``load_state``, so this is safe to pass to one."""
        return ModelState(self.tensors, self.meta)

    @classmethod
    def from_model(
        cls,
        model: WorldModel,
        *,
        session_id: str | None = None,
        checkpoint_id: str | None = None,
        parent_id: str | None = None,
        rng_state: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> WorldStateSnapshot:
        """Snapshot ``model``'s current frame (``extract_state`` already deep-copies)."""
        state = model.extract_state()
        return cls(
            tensors=state.tensors,
            meta=state.meta,
            backend=model.name,
            backend_config=model.config(),
            # frame_count counts frame 0, so the current frame's index is one less.
            frame_index=model.frame_count - 1,
            prompt=model.prompt,
            seed=model.seed,
            session_id=session_id,
            checkpoint_id=checkpoint_id,
            parent_id=parent_id,
            # Copied so later changes to the caller's dicts cannot reach the snapshot.
            rng_state=_copy.deepcopy(rng_state),
            extra=_copy.deepcopy(extra) if extra else {},
        )

    # --- introspection -------------------------------------------------------------------
    def header_fields(self) -> dict[str, Any]:
        """All non-tensor fields as a plain dict (what ``arcfab.header`` stores)."""
        return {name: getattr(self, name) for name in _HEADER_FIELDS}

    def header_json(self) -> str:
        """The canonical JSON of :meth:`header_fields`; names the offending field on error."""
        fields = self.header_fields()
        try:
            return _dumps(fields)
        except (TypeError, ValueError) as exc:
            bad = []
            for name, value in fields.items():
                try:
                    _dumps(value)
                except (TypeError, ValueError):
                    bad.append(name)
            raise TypeError(
                f"snapshot field(s) {', '.join(bad) or '?'} are not JSON-serialisable ({exc}); "
                "keep meta, backend_config, rng_state and extra to dicts with str keys of "
                "str/int/float/bool/None/lists -- put arrays into tensors instead"
            ) from exc

    def size_bytes(self) -> int:
        """Exact tensor bytes plus the length of the JSON header (the store's budget unit)."""
        tensor_bytes = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return tensor_bytes + len(self.header_json())

    def copy(self) -> WorldStateSnapshot:
        """A deep copy: cloned tensors, copied dicts, same ids and timestamp."""
        return WorldStateSnapshot(
            tensors={k: v.detach().clone() for k, v in self.tensors.items()},
            **{k: _copy_json(v) for k, v in self.header_fields().items()},
        )

    def equals(self, other: object) -> bool:
        """True iff ``other`` holds the same world: every field except ``created_at`` and
        ``checkpoint_id`` equal and every tensor bit-identical (dtype, shape and bytes, so
        NaNs with equal payloads compare equal and ``0.0`` differs from ``-0.0``)."""
        if not isinstance(other, WorldStateSnapshot):
            return False
        mine = {k: v for k, v in self.header_fields().items() if k not in _IDENTITY_FIELDS}
        theirs = {k: v for k, v in other.header_fields().items() if k not in _IDENTITY_FIELDS}
        try:
            # Compare the serialised form: that is what survives a save/load, so a tuple
            # and the list it loads back as count as equal, and NaN floats compare equal.
            if _dumps(mine) != _dumps(theirs):
                return False
        except (TypeError, ValueError):
            if mine != theirs:
                return False
        if self.tensors.keys() != other.tensors.keys():
            return False
        return all(_bits_equal(self.tensors[k], other.tensors[k]) for k in self.tensors)

    # --- serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialise to the safetensors-based snapshot format (see module docstring)."""
        tensors: dict[str, torch.Tensor] = {}
        seen_storages: set[int] = set()
        for name, t in self.tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {name!r}")
            if name == _RESERVED_TENSOR_NAME:
                raise ValueError(
                    f"tensor name {name!r} is reserved by safetensors; rename that tensor"
                )
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"snapshot tensor {name!r} must be a torch.Tensor, got {type(t).__name__}"
                )
            t = _as_cpu_contiguous(t)
            # safetensors refuses tensors that share memory; clone the second and later
            # views of one storage (rare: backends normally extract independent copies).
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in seen_storages:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            if t.numel():
                seen_storages.add(ptr)
            tensors[name] = t
        header_json = self.header_json()
        metadata = {
            _KEY_FORMAT: FORMAT_NAME,
            _KEY_VERSION: FORMAT_VERSION,
            _KEY_HEADER: header_json,
            _KEY_SHA: _checksum(header_json, tensors),
        }
        return safetensors.torch.save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, source: str = "<bytes>"
    ) -> WorldStateSnapshot:
        """Parse :meth:`to_bytes` output; ``source`` names the origin in error messages.

        Raises :class:`SnapshotFormatError` for anything that is not an intact snapshot
        of a supported version. Validation completes before the object is built.
        """
        data = bytes(data)
        outer = _parse_safetensors_header(data, source)
        metadata = outer.get("__metadata__")
        if not isinstance(metadata, dict) or _KEY_FORMAT not in metadata:
            raise _format_error(
                source,
                "this is a safetensors file but not an arcfab-gym snapshot (its metadata "
                f"has no {_KEY_FORMAT!r} key)",
                "Load it with safetensors directly, or pass a file written by "
                "WorldStateSnapshot.save()",
            )
        if metadata[_KEY_FORMAT] != FORMAT_NAME:
            raise _format_error(
                source,
                f"{_KEY_FORMAT} is {metadata[_KEY_FORMAT]!r}, expected {FORMAT_NAME!r}",
                "This file was written by another tool",
            )
        version = metadata.get(_KEY_VERSION)
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise _format_error(
                source,
                f"format version {version!r} is not supported; this arcfab-gym reads "
                f"version(s) {', '.join(SUPPORTED_FORMAT_VERSIONS)}",
                "Upgrade arcfab-gym to read newer snapshots, or re-save the snapshot with "
                "this version",
            )
        header_json = metadata.get(_KEY_HEADER)
        expected_sha = metadata.get(_KEY_SHA)
        if not isinstance(header_json, str) or not isinstance(expected_sha, str):
            raise _format_error(
                source,
                f"the metadata lacks {_KEY_HEADER!r} or {_KEY_SHA!r}",
                "The file is damaged or was not written by WorldStateSnapshot.save()",
            )

        try:
            tensors = safetensors.torch.load(data)
        except Exception as exc:  # the Rust SafetensorError and friends
            raise _format_error(
                source,
                f"the tensor data is truncated or inconsistent with the header ({exc})",
                "The file is corrupt; re-create it from the original source",
            ) from exc

        actual_sha = _checksum(header_json, tensors)
        if actual_sha != expected_sha:
            raise _format_error(
                source,
                f"checksum mismatch (stored sha256 {expected_sha[:16]}..., computed "
                f"{actual_sha[:16]}...): the file is corrupt",
                "Re-create it from the original source; do not edit snapshot files by hand",
            )

        try:
            header = json.loads(header_json)
        except ValueError as exc:
            raise _format_error(source, f"the {_KEY_HEADER} JSON does not parse ({exc})") from exc
        if not isinstance(header, dict):
            raise _format_error(source, f"the {_KEY_HEADER} JSON is not an object")
        missing = sorted(set(_HEADER_FIELDS) - header.keys())
        if missing:
            raise _format_error(source, f"the header lacks field(s) {', '.join(missing)}")
        for name, types in _HEADER_FIELDS.items():
            value = header[name]
            if not isinstance(value, types) or (
                isinstance(value, bool) and bool not in types
            ):
                raise _format_error(
                    source,
                    f"header field {name!r} has type {type(value).__name__}, expected "
                    + " or ".join(t.__name__ for t in types),
                )
        fields = {name: header[name] for name in _HEADER_FIELDS}
        fields["created_at"] = float(fields["created_at"])
        return cls(tensors=tensors, **fields)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically to ``path`` (parents created) and return it as a ``Path``.

        The bytes go to a temporary file in the same directory, are fsynced, and then
        ``os.replace`` it over ``path``; on any failure the temporary file is removed and
        an existing file at ``path`` is left untouched.
        """
        data = self.to_bytes()  # serialise first: a bad field must not touch the disk
        return write_atomic(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WorldStateSnapshot:
        """Read a file written by :meth:`save` (see :meth:`from_bytes` for the errors)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no world-state snapshot at {str(path)!r}: the file does not exist; check "
                "the path (snapshots are written by WorldStateSnapshot.save())"
            ) from None
        return cls.from_bytes(data, source=repr(str(path)))

    # --- pickling ------------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        # Pickle via the checked safetensors bytes: compact, integrity-checked, and free of
        # torch's storage-sharing reducers when snapshots cross process boundaries.
        return (_snapshot_from_bytes, (self.to_bytes(),))

    def __repr__(self) -> str:
        return (
            f"WorldStateSnapshot(backend={self.backend!r}, frame_index={self.frame_index}, "
            f"prompt={self.prompt!r}, seed={self.seed}, checkpoint_id={self.checkpoint_id!r}, "
            f"session_id={self.session_id!r}, tensors={len(self.tensors)}, "
            f"bytes={sum(t.numel() * t.element_size() for t in self.tensors.values())})"
        )


def _snapshot_from_bytes(data: bytes) -> WorldStateSnapshot:
    """Module-level so pickle can find it by name."""
    return WorldStateSnapshot.from_bytes(data, source="<pickled snapshot>")


def _parse_safetensors_header(data: bytes, source: str) -> dict[str, Any]:
    """Decode the outer safetensors JSON header with precise messages for each failure."""
    if len(data) == 0:
        raise _format_error(source, "the file is empty", "It was probably never fully written")
    if len(data) < _LEN_PREFIX.size:
        raise _format_error(
            source,
            f"the file is truncated: {len(data)} bytes is shorter than the 8-byte "
            "safetensors length prefix",
        )
    (header_len,) = _LEN_PREFIX.unpack_from(data)
    available = len(data) - _LEN_PREFIX.size
    if header_len == 0 or header_len > 100 * 2**20:
        raise _format_error(
            source,
            f"not a safetensors file (implausible header length {header_len})",
            "Pass a file written by WorldStateSnapshot.save()",
        )
    if header_len > available:
        raise _format_error(
            source,
            f"the file is truncated inside its header: the header needs {header_len} bytes "
            f"but only {available} follow the length prefix",
        )
    raw = data[_LEN_PREFIX.size : _LEN_PREFIX.size + header_len]
    try:
        outer = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _format_error(
            source,
            f"not a safetensors file, or its header is corrupt (header is not valid JSON: {exc})",
        ) from exc
    if not isinstance(outer, dict):
        raise _format_error(source, "not a safetensors file (header is not a JSON object)")

    # Check the data length ourselves so truncation inside the data gets a clear message.
    end = 0
    for name, info in outer.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _format_error(
                source, f"the header entry for tensor {name!r} is malformed (corrupt file)"
            )
        end = max(end, offsets[1])
    data_len = available - header_len
    if data_len < end:
        raise _format_error(
            source,
            f"the file is truncated: the tensors need {end} data bytes but only {data_len} "
            "are present",
            "It was probably cut off while being written or copied",
        )
    return outer


