"""Errors a user can cause, each naming the problem and the fix.

All derive from :class:`ArcFabricError` so callers can catch the library's errors in one
place; each also derives from the built-in exception a Python user would expect.
"""

from __future__ import annotations

from collections.abc import Iterable


class ArcFabricError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidActionError(ArcFabricError, ValueError):
    """An action of the wrong shape, not finite, or outside the action space."""


class UnknownPromptError(ArcFabricError, ValueError):
    """A prompt outside the backend's closed vocabulary."""

    def __init__(self, prompt: str, valid: Iterable[str]):
        self.prompt = prompt
        self.valid = tuple(valid)
        listing = "\n".join(f"  - {p!r}" for p in self.valid)
        super().__init__(f"unknown prompt {prompt!r}; valid prompts are:\n{listing}")

    def __reduce__(self):  # picklable (errors cross process boundaries, e.g. from Ray actors)
        return (type(self), (self.prompt, self.valid))


class UnknownBackendError(ArcFabricError, KeyError):
    """A backend name that is not registered."""

    def __init__(self, name: str, valid: Iterable[str]):
        self.name = name
        self.valid = tuple(valid)
        super().__init__(f"unknown world model {name!r}; registered: {', '.join(self.valid)}")

    def __reduce__(self):
        return (type(self), (self.name, self.valid))

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class UnknownCheckpointError(ArcFabricError, KeyError):
    """A checkpoint id the store does not hold (never created, or already freed)."""

    def __init__(self, checkpoint_id: str, hint: str = ""):
        self.checkpoint_id = checkpoint_id
        self.hint = hint
        msg = f"unknown checkpoint {checkpoint_id!r}"
        super().__init__(msg + (f": {hint}" if hint else ""))

    def __reduce__(self):
        return (type(self), (self.checkpoint_id, self.hint))

    def __str__(self) -> str:
        return self.args[0]


class SnapshotFormatError(ArcFabricError, ValueError):
    """A snapshot file that is truncated, corrupt, of another format or version."""


class BudgetError(ArcFabricError, ValueError):
    """A memory budget too small for what must stay in memory."""


class HistoryError(ArcFabricError, ValueError):
    """A rewind or frame request beyond the recorded history."""


class StateMismatchError(ArcFabricError, ValueError):
    """A snapshot taken from a different backend or configuration than the one loading it."""


class DuplicateNodeError(ArcFabricError, ValueError):
    """A trajectory-tree node id that is already in the tree."""


class TreeFormatError(ArcFabricError, ValueError):
    """A trajectory-tree document that is malformed, of another format or version, or not a forest."""


class RefcountError(ArcFabricError, ValueError):
    """A checkpoint reference-count misuse: releasing more often than retained, or
    deleting a checkpoint someone still holds."""


class StoreClosedError(ArcFabricError, RuntimeError):
    """An operation on a state store after its ``close()``."""
