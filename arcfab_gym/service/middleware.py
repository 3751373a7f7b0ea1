"""Pure-ASGI guards in front of the app: the bearer token and the request-body limit.

Both run before any route, so a request without the token never has its body read, and an
oversized body is refused after at most ``limit + one chunk`` bytes (or at once from its
``Content-Length``), whatever the route would have done with it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

__all__ = ["BodyLimitMiddleware", "TokenAuthMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_json(send: Send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class TokenAuthMiddleware:
    """Require ``token`` on every HTTP request and websocket handshake.

    Accepted as ``Authorization: Bearer <token>`` or ``?token=<token>`` (browsers cannot
    set headers on page loads or websockets). Compared with :func:`hmac.compare_digest`.
    A refused websocket gets an HTTP 401 where the server supports ASGI's
    ``websocket.http.response`` extension, else a close with code 1008 (policy violation).
    """

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self._token = token.encode()

    def _supplied(self, scope: Scope) -> bytes | None:
        auth = _header(scope, b"authorization")
        if auth is not None:
            scheme, _, value = auth.partition(b" ")
            if scheme.lower() == b"bearer":
                return value.strip()
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            return query["token"][-1].encode("latin-1", "replace")
        return None

    def _authorized(self, scope: Scope) -> bool:
        supplied = self._supplied(scope)
        return supplied is not None and hmac.compare_digest(supplied, self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        missing = self._supplied(scope) is None
        detail = (
            "missing token: send 'Authorization: Bearer <token>' (or ?token=<token>)"
            if missing
            else "wrong token: the bearer token does not match the server's"
        )
        if scope["type"] == "http":
            await _send_json(send, 401, detail, [(b"www-authenticate", b"Bearer")])
            return
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            body = json.dumps({"detail": detail}).encode()
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())],  # fmt: skip
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})


class BodyLimitMiddleware:
    """Refuse request bodies over a per-path limit with 413, reading at most that much.

    ``limits`` maps exact paths to their limit; every other path gets ``default_limit``.
    A ``Content-Length`` over the limit is refused before reading anything; otherwise the
    body is read chunk by chunk, counted, and refused as soon as the count passes the
    limit (this catches chunked bodies and lying headers). An accepted body is handed on
    to the app unchanged.
    """

    def __init__(self, app: ASGIApp, default_limit: int, limits: dict[str, int] | None = None):
        self.app = app
        self.default_limit = default_limit
        self.limits = dict(limits or {})

    def _too_large(self, limit: int, size: int | str) -> str:
        return (
            f"request body too large: {size} bytes, the limit for this route is {limit} "
            "bytes"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_limit)
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
                if length < 0:
                    raise ValueError
            except ValueError:
                await _send_json(send, 400, f"invalid Content-Length header {declared!r}")
                return
            if length > limit:
                await _send_json(send, 413, self._too_large(limit, length))
                return

        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await _send_json(send, 413, self._too_large(limit, f"more than {limit}"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
