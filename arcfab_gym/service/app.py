"""The FastAPI app: HTTP and websocket routes over a :class:`Registry` of real sessions.

Build it with :func:`create_app` (tests do, in-process); ``arcfab serve`` runs it with
uvicorn. The routes only translate HTTP into registry calls; every rule (limits, ids,
locking, validation of uploads) lives in :mod:`arcfab_gym.service.registry`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path as PathParam, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect

import arcfab_gym
from arcfab_gym.errors import ArcFabricError, UnknownCheckpointError
from arcfab_gym.service.errors import ServiceError
from arcfab_gym.service.events import ALL_TREES, EventHub, Subscription
from arcfab_gym.service.middleware import BodyLimitMiddleware, TokenAuthMiddleware
from arcfab_gym.service.registry import Registry
from arcfab_gym.service.schemas import (
    BackendInfo,
    CheckpointRequest,
    CheckpointResponse,
    CloseResponse,
    ForkRequest,
    Health,
    LineageEntry,
    RestoreRequest,
    RewindRequest,
    SessionCreate,
    SessionInfo,
    Status,
    StepRequest,
    TreeSummary,
    error_responses,
)
from arcfab_gym.service.settings import ServiceSettings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
EXPLORER_PAGE = STATIC_DIR / "explorer.html"
D3_FILE = Path(arcfab_gym.__file__).parent / "viz" / "static" / "d3.v7.min.js"
SNAPSHOT_UPLOAD_PATH = "/api/snapshots"

SessionId = Annotated[str, PathParam(min_length=1, max_length=64)]
TreeId = Annotated[str, PathParam(min_length=1, max_length=64)]
NodeId = Annotated[str, PathParam(min_length=1, max_length=64)]

_PNG = {200: {"content": {"image/png": {}}, "description": "A PNG image."}}
_OCTETS = {200: {"content": {"application/octet-stream": {}}, "description": "Snapshot bytes."}}


def _json_error(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, list[dict]]:
    """One readable sentence for a validation failure, plus the errors without their
    inputs (an input can be NaN, which JSON cannot carry back)."""
    errors = []
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        where = ".".join(loc) or "request"
        msg = err.get("msg", "invalid value")
        errors.append({"loc": loc, "msg": msg, "type": err.get("type", "")})
        parts.append(f"{where}: {msg}")
    return "invalid request: " + "; ".join(parts), errors


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The service as an ASGI app (auth and body-size guards included)."""
    settings = settings or ServiceSettings()
    hub = EventHub(queue_size=settings.ws_queue_size)
    registry = Registry(settings, hub)

    app = FastAPI(
        title="arcfab-gym service",
        version=arcfab_gym.__version__,
        description=(
            "Arc Fabric sessions over world models: step, checkpoint, restore, fork, "
            "rewind; trajectory trees; snapshot export/import; live events on /api/ws."
        ),
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.hub = hub
    # Sessions live as long as the app object, not one lifespan: an in-process client may
    # start and stop the app several times. ``app.state.registry.close()`` frees them all.

    # --- errors ---------------------------------------------------------------------------
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _json_error(exc.status_code, exc.detail)

    @app.exception_handler(UnknownCheckpointError)
    async def _unknown_checkpoint(request: Request, exc: UnknownCheckpointError) -> JSONResponse:
        return _json_error(404, str(exc))

    @app.exception_handler(ArcFabricError)
    async def _fabric_error(request: Request, exc: ArcFabricError) -> JSONResponse:
        # Library errors the registry did not translate are still about the request.
        return _json_error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = _describe_validation_error(exc)
        return _json_error(422, detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    common = error_responses(401)

    # --- service ----------------------------------------------------------------------------
    @app.get("/api/health", response_model=Health, responses=common, tags=["service"])
    def health() -> dict:
        """Liveness: always ``ok`` while the server runs."""
        return {"status": "ok", "version": arcfab_gym.__version__}

    @app.get("/api/status", response_model=Status, responses=common, tags=["service"])
    def status() -> dict:
        """Sessions, trees, store bytes against the budget, backends, uptime."""
        return registry.status()

    @app.get("/api/backends", response_model=list[BackendInfo], responses=common,
             tags=["service"])  # fmt: skip
    def backends() -> list[dict]:
        """Every backend this server can run, with its action size and prompts."""
        return registry.backends()

    # --- sessions -------------------------------------------------------------------------
    @app.post(
        "/api/sessions",
        response_model=SessionInfo,
        responses=error_responses(400, 401, 409, 413, 422, 503, 507),
        tags=["sessions"],
    )
    def create_session(body: Annotated[SessionCreate | None, Body()] = None) -> dict:
        """Start a session at frame 0 of a new tree (its root checkpoint is recorded)."""
        body = body or SessionCreate()
        return registry.create_session(body.backend, body.prompt, body.seed)

    @app.get("/api/sessions", response_model=list[SessionInfo], responses=common,
             tags=["sessions"])  # fmt: skip
    def list_sessions() -> list[dict]:
        """All open sessions."""
        return registry.list_sessions()

    @app.get("/api/sessions/{session_id}", response_model=SessionInfo,
             responses=error_responses(401, 404, 422), tags=["sessions"])  # fmt: skip
    def get_session(session_id: SessionId) -> dict:
        return registry.get_session(session_id)

    @app.delete("/api/sessions/{session_id}", response_model=CloseResponse,
                responses=error_responses(401, 404, 422), tags=["sessions"])  # fmt: skip
    def close_session(session_id: SessionId) -> dict:
        """Close a session; its tree (and store) is freed with its last session."""
        return registry.close_session(session_id)

    @app.post("/api/sessions/{session_id}/step", response_model=SessionInfo,
              responses=error_responses(400, 401, 404, 413, 422, 507),
              tags=["sessions"])  # fmt: skip
    def step(session_id: SessionId, body: StepRequest) -> dict:
        """Advance one frame; with ``checkpoint`` the new frame becomes a tree node."""
        return registry.step(session_id, body.action, body.checkpoint)

    @app.post("/api/sessions/{session_id}/checkpoint", response_model=CheckpointResponse,
              responses=error_responses(400, 401, 404, 413, 422, 507),
              tags=["sessions"])  # fmt: skip
    def checkpoint(
        session_id: SessionId, body: Annotated[CheckpointRequest | None, Body()] = None
    ) -> dict:
        """Checkpoint the current frame as a tree node."""
        return registry.checkpoint(session_id, (body or CheckpointRequest()).label)

    @app.post("/api/sessions/{session_id}/restore", response_model=SessionInfo,
              responses=error_responses(400, 401, 404, 413, 422), tags=["sessions"])  # fmt: skip
    def restore(session_id: SessionId, body: RestoreRequest) -> dict:
        """Make a checkpoint of the session's tree its current state."""
        return registry.restore(session_id, body.checkpoint_id)

    @app.post(
        "/api/sessions/{session_id}/fork",
        response_model=SessionInfo,
        responses=error_responses(400, 401, 404, 409, 413, 422, 507),
        tags=["sessions"],
    )
    def fork(session_id: SessionId, body: Annotated[ForkRequest | None, Body()] = None) -> dict:
        """A new session of the same tree from a checkpoint (default: now), optionally
        re-prompted or re-seeded; returns the new session."""
        body = body or ForkRequest()
        return registry.fork(session_id, body.checkpoint_id, body.prompt, body.seed)

    @app.post("/api/sessions/{session_id}/rewind", response_model=SessionInfo,
              responses=error_responses(400, 401, 404, 413, 422), tags=["sessions"])  # fmt: skip
    def rewind(session_id: SessionId, body: Annotated[RewindRequest | None, Body()] = None) -> dict:
        """Go back ``n_steps`` frames of the session's history."""
        return registry.rewind(session_id, (body or RewindRequest()).n_steps)

    @app.get("/api/sessions/{session_id}/frame.png", response_class=Response,
             responses={**_PNG, **error_responses(401, 404, 422)}, tags=["frames"])  # fmt: skip
    def session_frame(
        session_id: SessionId,
        frame_index: Annotated[int | None, Query(ge=0, le=10**9)] = None,
    ) -> Response:
        """The decoded current frame (or ``frame_index`` of the session's history)."""
        png = registry.session_frame_png(session_id, frame_index)
        return Response(png, media_type="image/png")

    # --- trees ----------------------------------------------------------------------------
    @app.get("/api/trees", response_model=list[TreeSummary], responses=common, tags=["trees"])
    def list_trees() -> list[dict]:
        """Every open tree with its sessions and size."""
        return registry.list_trees()

    @app.get(
        "/api/trees/{tree_id}/d3",
        responses={
            200: {"content": {"application/json": {"schema": {"type": "object"}}},
                  "description": "TrajectoryTree.to_d3_tree() as JSON."},  # fmt: skip
            **error_responses(401, 404, 422),
        },
        response_class=Response,
        tags=["trees"],
    )
    def tree_d3(tree_id: TreeId) -> Response:
        """The tree as a nested D3 hierarchy (``id``, ``session_id``, ``frame_index``,
        ``meta`` with reward, return, action, prompt, kind..., ``children``)."""
        return Response(registry.tree_d3_json(tree_id), media_type="application/json")

    @app.get("/api/trees/{tree_id}/nodes/{node_id}/frame.png", response_class=Response,
             responses={**_PNG, **error_responses(401, 404, 422)}, tags=["trees"])  # fmt: skip
    def node_frame(tree_id: TreeId, node_id: NodeId) -> Response:
        """The frame of one node (any node, forks included)."""
        return Response(registry.node_png(tree_id, node_id), media_type="image/png")

    @app.get("/api/trees/{tree_id}/nodes/{node_id}/lineage", response_model=list[LineageEntry],
             responses=error_responses(401, 404, 422), tags=["trees"])  # fmt: skip
    def lineage(tree_id: TreeId, node_id: NodeId) -> list[dict]:
        """The nodes from the root down to ``node_id``."""
        return registry.lineage(tree_id, node_id)

    @app.get("/api/trees/{tree_id}/nodes/{node_id}/snapshot", response_class=Response,
             responses={**_OCTETS, **error_responses(401, 404, 422)}, tags=["trees"])  # fmt: skip
    def node_snapshot(tree_id: TreeId, node_id: NodeId) -> Response:
        """The node's world state as a safetensors snapshot (importable with
        ``POST /api/snapshots`` or ``WorldStateSnapshot.from_bytes``)."""
        data = registry.node_snapshot_bytes(tree_id, node_id)
        filename = f"{tree_id}-{node_id}.safetensors"
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @app.post(
        SNAPSHOT_UPLOAD_PATH,
        response_model=SessionInfo,
        responses=error_responses(400, 401, 409, 413, 422, 503, 507),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
        tags=["trees"],
    )
    async def import_snapshot(request: Request) -> dict:
        """A new session (new tree) from a snapshot file. Checked before use: size,
        format, version, checksum, backend and its config, tensor names, dtypes, shapes,
        and a trial load and step."""
        data = await request.body()
        return await run_in_threadpool(registry.import_snapshot, data)

    # --- live events ------------------------------------------------------------------------
    @app.websocket("/api/ws")
    async def events(websocket: WebSocket) -> None:
        """Send ``{"subscribe": "<tree_id>"|"*"}`` (or ``unsubscribe``); receive events."""
        await websocket.accept()
        sub = hub.subscribe(asyncio.get_running_loop())
        pump = asyncio.create_task(_pump_events(websocket, sub))
        try:
            while True:
                text = await websocket.receive_text()
                reply = _handle_ws_message(hub, sub, text)
                await websocket.send_json(reply)
        except WebSocketDisconnect:
            pass
        finally:
            hub.unsubscribe(sub)
            pump.cancel()

    # --- page and static files --------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def explorer_page() -> Response:
        if not EXPLORER_PAGE.is_file():
            return _json_error(404, "the explorer page is not installed (static/explorer.html)")
        return FileResponse(EXPLORER_PAGE, media_type="text/html")

    @app.get("/static/vendor/d3.v7.min.js", include_in_schema=False)
    def d3_script() -> Response:
        return FileResponse(D3_FILE, media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    # Guards, outermost first: no body is read before the token is checked.
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_json_bytes,
        limits={SNAPSHOT_UPLOAD_PATH: settings.max_upload_bytes},
    )
    if settings.token is not None:
        app.add_middleware(TokenAuthMiddleware, token=settings.token)
    return app


def _handle_ws_message(hub: EventHub, sub: Subscription, text: str) -> dict[str, Any]:
    """Apply one client message; the reply acknowledges it or names what is wrong."""
    try:
        msg = json.loads(text)
    except ValueError:
        return {"type": "error", "detail": "messages must be JSON objects"}
    if not isinstance(msg, dict):
        return {"type": "error", "detail": "messages must be JSON objects"}
    for key, interested in (("subscribe", True), ("unsubscribe", False)):
        tree_id = msg.get(key)
        if tree_id is None:
            continue
        if not isinstance(tree_id, str) or not tree_id or len(tree_id) > 64:
            return {"type": "error", "detail": f"{key} needs a tree id or {ALL_TREES!r}"}
        hub.set_interest(sub, tree_id, interested)
        return {"type": f"{key}d", "tree_id": tree_id}
    return {
        "type": "error",
        "detail": 'unknown message; send {"subscribe": "<tree_id>"} or {"subscribe": "*"}',
    }


async def _pump_events(websocket: WebSocket, sub: Subscription) -> None:
    """Forward queued events to the client until it goes away."""
    try:
        while True:
            event = await sub.queue.get()
            await websocket.send_json(event)
    except (WebSocketDisconnect, RuntimeError):
        pass
    except asyncio.CancelledError:
        raise
