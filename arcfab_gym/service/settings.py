"""Configuration of the ``arcfab serve`` web service."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServiceSettings"]

_MB = 2**20
_KB = 2**10


@dataclass(frozen=True)
class ServiceSettings:
    """Everything :func:`~arcfab_gym.service.app.create_app` needs; immutable once built.

    Args:
        host, port: where ``arcfab serve`` binds (not used by the app itself).
        token: when set, every request (pages, docs, API, websocket) must carry it, as
            ``Authorization: Bearer <token>`` or as a ``?token=`` query parameter.
        max_sessions: open sessions allowed at once, over all trees.
        store_budget_bytes: bytes the checkpoint stores of all trees may hold together
            (``None``: unlimited). Beyond it new checkpoints and sessions are refused with
            HTTP 507; nothing is spilled to disk.
        max_upload_bytes: largest snapshot upload (``POST /api/snapshots``) accepted.
        max_json_bytes: largest body of any other request.
        backend_default: backend of ``POST /api/sessions`` when the body names none.
        max_rewind: frames each session keeps for ``rewind``.
        frame_cache_entries: PNGs of tree nodes kept per tree.
        ws_queue_size: events buffered per websocket client before the oldest are dropped.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_sessions: int = 16
    store_budget_bytes: int | None = 512 * _MB
    max_upload_bytes: int = 8 * _MB
    max_json_bytes: int = 64 * _KB
    backend_default: str = "pusht-sim"
    max_rewind: int = 256
    frame_cache_entries: int = 512
    ws_queue_size: int = 256

    def __post_init__(self) -> None:
        if self.token is not None and not self.token:
            raise ValueError("token must be a non-empty string or None (no authentication)")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.store_budget_bytes is not None and self.store_budget_bytes < 0:
            raise ValueError(
                f"store_budget_bytes must be >= 0 or None, got {self.store_budget_bytes}"
            )
        for name in ("max_upload_bytes", "max_json_bytes", "frame_cache_entries",
                     "ws_queue_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rewind < 0:
            raise ValueError(f"max_rewind must be >= 0, got {self.max_rewind}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
