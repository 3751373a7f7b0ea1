"""Validation of a snapshot uploaded by a client, before anything of it is used.

Order of checks (each failure raises :class:`InvalidRequest` naming the problem):

1. format, version and checksum -- :meth:`WorldStateSnapshot.from_bytes`;
2. the backend is registered and served here, and ``backend_config`` equals the config
   of this server's instance (a client can never choose weights or any file path);
3. the tensors match a freshly made state of that backend: the same names (numbered
   families like ``kv_cache/000012`` match by their prefix), dtypes and shapes (only the
   leading dimension, a count of frames or contacts, may differ), all values finite;
4. a trial run on a throwaway instance: ``load_state``, the frame index agrees with the
   history it holds, the current frame decodes, and one step succeeds.

Only then is the snapshot handed to a session.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import torch

from arcfab_gym.errors import SnapshotFormatError
from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.models.base import WorldModel
from arcfab_gym.service.errors import InvalidRequest

__all__ = ["StateSignature", "validate_snapshot"]

#: ``kv_cache/000012`` -> family ``kv_cache/#``: numbered tensors of variable count.
_NUMBERED = re.compile(r"^(.*/)\d+$")


def _family(name: str) -> str:
    m = _NUMBERED.match(name)
    return m.group(1) + "#" if m else name


@dataclass(frozen=True)
class StateSignature:
    """What every state of one backend looks like: per tensor family, the dtype, the
    number of dimensions and the dimensions after the first."""

    backend: str
    families: dict[str, tuple[torch.dtype, int, tuple[int, ...]]]
    meta_keys: frozenset[str]

    @classmethod
    def of_fresh_state(cls, prototype: WorldModel) -> StateSignature:
        """The signature of a fresh start of a spawn of ``prototype``."""
        model = prototype.spawn()
        try:
            model.start(model.prompts[0], 0)
            state = model.extract_state()
        finally:
            model.close()
        families = {}
        for name, t in state.tensors.items():
            families[_family(name)] = (t.dtype, t.dim(), tuple(t.shape[1:]))
        return cls(prototype.name, families, frozenset(state.meta))

    def check(self, snap: WorldStateSnapshot) -> None:
        seen: set[str] = set()
        for name, t in snap.tensors.items():
            fam = _family(name)
            if fam not in self.families:
                raise InvalidRequest(
                    f"snapshot tensor {name!r} is not part of a {self.backend!r} state "
                    f"(expected tensors: {', '.join(sorted(self.families))})"
                )
            dtype, ndim, tail = self.families[fam]
            if t.dtype != dtype or t.dim() != ndim or tuple(t.shape[1:]) != tail:
                want = f"{str(dtype).removeprefix('torch.')} [*, {', '.join(map(str, tail))}]"
                if ndim == 1:
                    want = f"{str(dtype).removeprefix('torch.')} [*]"
                elif ndim == 0:
                    want = f"{str(dtype).removeprefix('torch.')} scalar"
                raise InvalidRequest(
                    f"snapshot tensor {name!r} is {str(t.dtype).removeprefix('torch.')} "
                    f"{list(t.shape)}, a {self.backend!r} state has {want} there"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InvalidRequest(f"snapshot tensor {name!r} holds NaN or infinite values")
            seen.add(fam)
        missing = sorted(set(self.families) - seen)
        if missing:
            raise InvalidRequest(
                f"snapshot lacks tensor(s) {', '.join(missing)} of a {self.backend!r} state"
            )
        missing_meta = sorted(self.meta_keys - set(snap.meta))
        if missing_meta:
            raise InvalidRequest(
                f"snapshot state meta lacks key(s) {', '.join(missing_meta)} of a "
                f"{self.backend!r} state"
            )


def parse_snapshot(data: bytes) -> WorldStateSnapshot:
    """Step 1: parse and integrity-check the bytes."""
    try:
        return WorldStateSnapshot.from_bytes(data, source="the uploaded snapshot")
    except SnapshotFormatError as exc:
        raise InvalidRequest(str(exc)) from None


def validate_snapshot(
    snap: WorldStateSnapshot,
    prototype: WorldModel,
    signature: StateSignature,
) -> WorldStateSnapshot:
    """Steps 2-4 for a parsed snapshot whose backend is ``prototype.name``; returns a
    clean copy of it (lineage ids dropped: they belong to another store)."""
    expected = prototype.config()
    if snap.backend_config != expected:
        raise InvalidRequest(
            f"snapshot backend_config {snap.backend_config!r} differs from this server's "
            f"{snap.backend!r} config {expected!r}; it was made by a differently configured "
            "backend"
        )
    signature.check(snap)
    if snap.prompt not in prototype.prompts:
        raise InvalidRequest(f"snapshot prompt {snap.prompt!r} is not one of {snap.backend!r}'s")
    if not 0 <= snap.seed < 2**63:
        raise InvalidRequest(f"snapshot seed {snap.seed} is out of range")

    trial = prototype.spawn()
    try:
        try:
            trial.load_state(snap.model_state, include_rng=True)
        except Exception as exc:  # untrusted input in backend code: any failure is a 422
            raise InvalidRequest(
                f"snapshot does not load into backend {snap.backend!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if trial.frame_count - 1 != snap.frame_index:
            raise InvalidRequest(
                f"snapshot frame_index {snap.frame_index} disagrees with the "
                f"{trial.frame_count} frames of history its state holds"
            )
        try:
            trial.decode_frame(trial.frame_count - 1)
            trial.step(np.zeros(trial.action_dim, dtype=np.float32))
        except Exception as exc:  # see above
            raise InvalidRequest(
                f"snapshot loads but cannot be stepped by backend {snap.backend!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    finally:
        trial.close()
    return dataclasses.replace(snap, session_id=None, checkpoint_id=None, parent_id=None)
