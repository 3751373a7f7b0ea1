"""Property-based fuzzing of the service's OpenAPI schema with schemathesis (v4 API).

Every documented operation gets generated requests (valid and invalid); the server must
never answer with a 5xx, must answer only with documented status codes, and its bodies
must match the documented schemas. A few sessions are made beforehand and their ids
injected into some cases, so the fuzzer also reaches past the 404 of unknown ids.
"""

from __future__ import annotations

import warnings

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

with warnings.catch_warnings():  # starlette's TestClient, used by schemathesis for ASGI
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from arcfab_gym.service import ServiceSettings, create_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Small limits so that the fuzzer also hits them (max sessions, body size).
APP = create_app(ServiceSettings(max_sessions=6, max_json_bytes=4096, max_upload_bytes=65536))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _seed_sessions() -> dict[str, str]:
    """Two real sessions (one stepped, one fork) whose ids the fuzzer may use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = TestClient(APP)
    info = client.post("/api/sessions", json={"seed": 1}).json()
    sid = info["session_id"]
    client.post(f"/api/sessions/{sid}/step", json={"action": [0.2, 0.1]})
    info = client.get(f"/api/sessions/{sid}").json()
    return {"session_id": sid, "tree_id": info["tree_id"], "node_id": info["node_id"]}


KNOWN = _seed_sessions()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


STATUSES: dict[str, list[int]] = {}


@schema.hook
def flatmap_path_parameters(ctx, path_parameters):
    """Either the generated ids or the real session, tree and node ids (never for DELETE,
    which would close the real session for every later case)."""
    if not path_parameters or ctx.operation.method.upper() == "DELETE":
        return st.just(path_parameters)
    known = {k: KNOWN[k] for k in path_parameters if k in KNOWN}
    return st.sampled_from([path_parameters, {**path_parameters, **known}])


@schema.hook
def after_call(ctx, case, response):
    STATUSES.setdefault(f"{case.method} {case.path}", []).append(response.status_code)


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_never_fails_on_generated_input(case):
    case.call_and_validate(checks=CHECKS)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_on_generated_input_long(case):
    case.call_and_validate(checks=CHECKS)


def test_zz_fuzzing_reached_real_sessions():
    """The fuzz cases above got past the 404 of unknown ids (this runs after them)."""
    if not STATUSES:
        pytest.skip("the fuzz test did not run in this session")
    for op in (
        "GET /api/sessions/{session_id}",
        "GET /api/sessions/{session_id}/frame.png",
        "GET /api/trees/{tree_id}/d3",
        "GET /api/trees/{tree_id}/nodes/{node_id}/frame.png",
    ):
        assert 200 in STATUSES.get(op, []), op
    assert {404, 422} <= set(STATUSES["POST /api/sessions/{session_id}/step"])
