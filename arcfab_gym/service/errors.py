"""Errors the service reports to clients, each carrying its HTTP status.

The registry raises these; the app turns every one into ``{"detail": message}`` with
the status below. Library errors caused by client input are translated into them where
they are caught, so no client input ever yields a 5xx.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "ServiceError",
    "ServiceUnavailable",
    "TooManySessions",
]


class ServiceError(Exception):
    """Base class: an error a client caused or must know about; ``str()`` is the detail."""

    status_code = 400

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    """An unknown session, tree, node or checkpoint id."""

    status_code = 404


class InvalidRequest(ServiceError):
    """Input that is well-formed JSON but wrong: a bad action, prompt, backend, snapshot..."""

    status_code = 422


class TooManySessions(ServiceError):
    """The ``max_sessions`` limit is reached; close a session first."""

    status_code = 409


class PayloadTooLarge(ServiceError):
    """A request body over the size limit."""

    status_code = 413


class BudgetExceeded(ServiceError):
    """The checkpoint stores hold ``store_budget_bytes`` already; close sessions first."""

    status_code = 507


class ServiceUnavailable(ServiceError):
    """A registered backend that cannot be built on this server (e.g. missing weights)."""

    status_code = 503
