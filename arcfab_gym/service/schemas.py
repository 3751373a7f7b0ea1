"""Request and response models of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ActionValue",
    "BackendInfo",
    "CheckpointRequest",
    "CheckpointResponse",
    "CloseResponse",
    "ErrorResponse",
    "ForkRequest",
    "Health",
    "LineageEntry",
    "RestoreRequest",
    "RewindRequest",
    "SessionCreate",
    "SessionInfo",
    "Status",
    "StepRequest",
    "TreeSummary",
]

#: Seeds accepted from clients (the range the env itself draws backend seeds from).
MAX_SEED = 2**31 - 1

#: One action component: a finite number in the action box [-1, 1].
ActionValue = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False, strict=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]
Prompt = Annotated[str, Field(min_length=1, max_length=200)]
Id = Annotated[str, Field(min_length=1, max_length=64)]


class _Request(BaseModel):
    """Request bodies refuse unknown fields, so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What is wrong, naming the field or id at fault.")


class Health(BaseModel):
    status: str
    version: str


class Status(BaseModel):
    sessions: int
    max_sessions: int
    trees: int
    store_bytes: int = Field(description="In-memory bytes of all checkpoint stores.")
    store_budget_bytes: int | None
    backends: list[str]
    uptime_s: float


class BackendInfo(BaseModel):
    name: str
    action_dim: int
    prompts: list[str]
    frame_size: int = Field(description="Side in pixels of the decoded frames.")


class SessionCreate(_Request):
    backend: Annotated[str, Field(min_length=1, max_length=100)] | None = Field(
        default=None, description="A registered backend; default: the server's default."
    )
    prompt: Prompt | None = Field(default=None, description="Default: the backend's first.")
    seed: Seed = 0


class SessionInfo(BaseModel):
    session_id: str
    tree_id: str
    backend: str
    prompt: str
    seed: int
    frame_index: int
    action_dim: int
    history_length: int = Field(description="Steps that rewind can undo.")
    node_id: str | None = Field(description="Checkpoint id of the current frame, if any.")
    reward: float | None = Field(description="Reward of the step that made this frame.")
    terminated: bool


class StepRequest(_Request):
    action: list[ActionValue] = Field(
        min_length=1, max_length=64, description="action_dim finite numbers in [-1, 1]."
    )
    checkpoint: bool = Field(
        default=True, description="Checkpoint the new frame (one new tree node per step)."
    )


class CheckpointRequest(_Request):
    label: Annotated[str, Field(max_length=200)] | None = None


class CheckpointResponse(BaseModel):
    checkpoint_id: str
    tree_id: str
    frame_index: int


class RestoreRequest(_Request):
    checkpoint_id: Id


class ForkRequest(_Request):
    checkpoint_id: Id | None = Field(default=None, description="Default: a checkpoint of now.")
    prompt: Prompt | None = None
    seed: Seed | None = None


class RewindRequest(_Request):
    n_steps: Annotated[int, Field(ge=0, le=1_000_000, strict=True)] = 1


class CloseResponse(BaseModel):
    session_id: str
    tree_id: str
    tree_closed: bool = Field(description="True when this was the tree's last session.")


class LineageEntry(BaseModel):
    node_id: str
    frame_index: int
    session_id: str
    reward: float | None
    # ``return`` is a Python keyword, hence the alias.
    return_: float | None = Field(alias="return", serialization_alias="return")
    action: list[float] | None
    kind: str | None

    model_config = ConfigDict(populate_by_name=True)


class TreeSummary(BaseModel):
    tree_id: str
    backend: str
    sessions: list[str]
    node_count: int
    root_ids: list[str]
    store_bytes: int


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting the error statuses a route can return."""
    text = {
        400: "Malformed request.",
        401: "Missing or wrong token.",
        404: "Unknown session, tree, node or checkpoint.",
        409: "Max sessions reached.",
        413: "Request body too large.",
        422: "Invalid input (shape, range, prompt, backend, snapshot...).",
        503: "Backend cannot be built on this server.",
        507: "Store byte budget reached.",
    }
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}
