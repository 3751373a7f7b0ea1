"""The ``arcfab serve`` HTTP/websocket API, end to end against real sessions in-process.

Most tests use ``pusht-sim`` (exact physics, fast); a few use ``mini-dreamzero``.
"""

from __future__ import annotations

import base64
import json
import struct
import warnings

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

with warnings.catch_warnings():  # starlette asks for httpx2; httpx still works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from arcfab_gym.fabric.snapshot import WorldStateSnapshot  # noqa: E402
from arcfab_gym.service import ServiceSettings, create_app  # noqa: E402
from arcfab_gym.service.png import PNG_SIGNATURE  # noqa: E402
from arcfab_gym.tasks.pusht import PROMPTS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

ACTIONS = [[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6], [0.7, 0.1], [-0.2, -0.9]]


def make_client(**settings) -> TestClient:
    return TestClient(create_app(ServiceSettings(**settings)))


@pytest.fixture
def client():
    with make_client() as c:
        yield c


@pytest.fixture
def one_torch_thread():
    """What ``arcfab serve`` sets: one intra-op thread (multi-threaded steps of the learned
    model crawl on a busy two-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def new_session(client: TestClient, **body) -> dict:
    r = client.post("/api/sessions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def step(client: TestClient, sid: str, action, **extra) -> dict:
    r = client.post(f"/api/sessions/{sid}/step", json={"action": action, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and IHDR chunk."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def frame(client: TestClient, sid: str, **params) -> bytes:
    r = client.get(f"/api/sessions/{sid}/frame.png", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return r.content


def d3_nodes(client: TestClient, tree_id: str) -> list[dict]:
    r = client.get(f"/api/trees/{tree_id}/d3")
    assert r.status_code == 200, r.text
    out, stack = [], [r.json()]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node["children"])
    return out


def assert_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for w in words:
        assert w.lower() in detail.lower(), (w, detail)


# --- service ------------------------------------------------------------------------------
def test_health_status_backends(client):
    assert client.get("/api/health").json() == {"status": "ok", "version": "0.1.0"}
    status = client.get("/api/status").json()
    assert status["sessions"] == 0 and status["max_sessions"] == 16
    assert status["store_budget_bytes"] == 512 * 2**20
    assert {"pusht-sim", "mini-dreamzero"} <= set(status["backends"])
    backends = {b["name"]: b for b in client.get("/api/backends").json()}
    assert backends["pusht-sim"]["action_dim"] == 2
    assert backends["pusht-sim"]["prompts"] == list(PROMPTS)


# --- sessions ---------------------------------------------------------------------------------
def test_create_step_grows_tree_and_frames_decode(client):
    info = new_session(client, backend="pusht-sim", prompt=PROMPTS[1], seed=4)
    assert info["frame_index"] == 0 and info["history_length"] == 0
    assert info["prompt"] == PROMPTS[1] and info["seed"] == 4 and info["action_dim"] == 2
    sid, tid = info["session_id"], info["tree_id"]
    root = info["node_id"]
    assert [n["id"] for n in d3_nodes(client, tid)] == [root]

    for k, a in enumerate(ACTIONS, start=1):
        info = step(client, sid, a)
        assert info["frame_index"] == k and info["history_length"] == k
        assert isinstance(info["reward"], float) and info["terminated"] is False
        assert len(d3_nodes(client, tid)) == k + 1  # one node per checkpointed step
    last = info["node_id"]

    # A step without a checkpoint moves on but adds no node.
    info = step(client, sid, [0.0, 0.0], checkpoint=False)
    assert info["node_id"] is None and len(d3_nodes(client, tid)) == len(ACTIONS) + 1

    assert png_size(frame(client, sid)) == (96, 96)
    assert frame(client, sid, frame_index=0) != frame(client, sid)
    assert_error(client.get(f"/api/sessions/{sid}/frame.png?frame_index=99"), 422, "frame_index")

    lineage = client.get(f"/api/trees/{tid}/nodes/{last}/lineage").json()
    assert [e["frame_index"] for e in lineage] == list(range(len(ACTIONS) + 1))
    assert lineage[0]["node_id"] == root and lineage[-1]["node_id"] == last
    assert lineage[0]["reward"] is None and lineage[1]["action"] == ACTIONS[0]
    assert lineage[-1]["return"] == pytest.approx(sum(e["reward"] for e in lineage[1:]))

    node_png = client.get(f"/api/trees/{tid}/nodes/{root}/frame.png")
    assert node_png.status_code == 200 and png_size(node_png.content) == (96, 96)
    assert node_png.content == frame(client, sid, frame_index=0)

    listed = client.get("/api/sessions").json()
    assert [s["session_id"] for s in listed] == [sid]
    assert client.get(f"/api/sessions/{sid}").json()["frame_index"] == len(ACTIONS) + 1
    trees = client.get("/api/trees").json()
    assert trees[0]["tree_id"] == tid and trees[0]["node_count"] == len(ACTIONS) + 1


def test_checkpoint_restore_rewind(client):
    info = new_session(client, seed=1)
    sid, root = info["session_id"], info["node_id"]
    first = step(client, sid, ACTIONS[0])
    r = client.post(f"/api/sessions/{sid}/checkpoint", json={"label": "here"})
    assert r.status_code == 200
    cid = r.json()["checkpoint_id"]
    assert r.json()["frame_index"] == 1
    at_checkpoint = frame(client, sid)
    for a in ACTIONS[1:4]:
        step(client, sid, a)
    assert frame(client, sid) != at_checkpoint

    info = client.post(f"/api/sessions/{sid}/restore", json={"checkpoint_id": cid}).json()
    assert info["frame_index"] == 1 and info["node_id"] == cid
    assert info["history_length"] == 1 and info["reward"] == first["reward"]
    assert frame(client, sid) == at_checkpoint
    # Back on its own history, the session can rewind past the checkpoint to the root.
    info = client.post(f"/api/sessions/{sid}/rewind", json={"n_steps": 1}).json()
    assert info["frame_index"] == 0 and info["node_id"] == root and info["reward"] is None
    info = client.post(f"/api/sessions/{sid}/restore", json={"checkpoint_id": cid}).json()
    assert info["node_id"] == cid

    for a in ACTIONS[1:4]:
        step(client, sid, a)
    before = client.get(f"/api/sessions/{sid}").json()
    info = client.post(f"/api/sessions/{sid}/rewind", json={"n_steps": 2}).json()
    assert info["frame_index"] == before["frame_index"] - 2
    assert info["history_length"] == before["history_length"] - 2
    assert info["node_id"] is not None  # every step was checkpointed
    assert_error(
        client.post(f"/api/sessions/{sid}/rewind", json={"n_steps": 50}), 422, "cannot rewind"
    )
    # A rewound session steps on from where it went back to, identically.
    again = step(client, sid, ACTIONS[2])
    assert again["frame_index"] == info["frame_index"] + 1


def test_fork_shares_tree_and_branches(client):
    info = new_session(client, seed=2)
    sid, tid = info["session_id"], info["tree_id"]
    for a in ACTIONS[:2]:
        step(client, sid, a)
    fork_point = client.get(f"/api/sessions/{sid}").json()["node_id"]
    r = client.post(f"/api/sessions/{sid}/fork", json={"checkpoint_id": fork_point,
                                                        "prompt": PROMPTS[2], "seed": 9})
    assert r.status_code == 200, r.text
    child = r.json()
    assert child["tree_id"] == tid and child["session_id"] != sid
    assert child["frame_index"] == 2 and child["prompt"] == PROMPTS[2] and child["seed"] == 9

    # The branches diverge under different actions.
    step(client, sid, [0.9, 0.9])
    step(client, child["session_id"], [-0.9, -0.9])
    assert frame(client, sid) != frame(client, child["session_id"])

    nodes = {n["id"]: n for n in d3_nodes(client, tid)}
    assert len(nodes[fork_point]["children"]) == 2
    assert {n["session_id"] for n in nodes.values()} == {sid, child["session_id"]}
    # Every node decodes, fork nodes included.
    for node_id in nodes:
        r = client.get(f"/api/trees/{tid}/nodes/{node_id}/frame.png")
        assert r.status_code == 200 and png_size(r.content) == (96, 96)

    # Lineages of the two leaves share the prefix up to the fork point.
    a = client.get(f"/api/trees/{tid}/nodes/{nodes_leaf(nodes, sid)}/lineage").json()
    b = client.get(f"/api/trees/{tid}/nodes/{nodes_leaf(nodes, child['session_id'])}/lineage")
    b = b.json()
    assert a[:3] == b[:3] and a[-1]["session_id"] == sid and b[-1]["session_id"] != sid

    # A fork without a checkpoint id forks from now.
    now = client.post(f"/api/sessions/{sid}/fork", json={}).json()
    assert now["frame_index"] == client.get(f"/api/sessions/{sid}").json()["frame_index"]
    assert frame(client, now["session_id"]) == frame(client, sid)


def nodes_leaf(nodes: dict, session_id: str) -> str:
    leaves = [n for n in nodes.values() if n["session_id"] == session_id and not n["children"]]
    return max(leaves, key=lambda n: n["frame_index"])["id"]


def test_same_seed_same_actions_give_identical_frames(client):
    a = new_session(client, seed=11)["session_id"]
    b = new_session(client, seed=11)["session_id"]
    c = new_session(client, seed=12)["session_id"]
    assert frame(client, a) == frame(client, b)
    assert frame(client, a) != frame(client, c)
    for act in ACTIONS:
        ra, rb = step(client, a, act), step(client, b, act)
        assert ra["reward"] == rb["reward"]
        assert frame(client, a) == frame(client, b)


def test_delete_session_frees_tree(client):
    info = new_session(client)
    sid, tid = info["session_id"], info["tree_id"]
    child = client.post(f"/api/sessions/{sid}/fork", json={}).json()
    r = client.delete(f"/api/sessions/{sid}")
    assert r.json() == {"session_id": sid, "tree_id": tid, "tree_closed": False}
    assert_error(client.get(f"/api/sessions/{sid}"), 404, sid)
    assert client.get(f"/api/trees/{tid}/d3").status_code == 200  # the fork keeps it
    r = client.delete(f"/api/sessions/{child['session_id']}")
    assert r.json()["tree_closed"] is True
    assert_error(client.get(f"/api/trees/{tid}/d3"), 404, tid)
    assert client.get("/api/status").json()["store_bytes"] == 0


# --- snapshots --------------------------------------------------------------------------------
def export_current(client: TestClient, info: dict) -> bytes:
    r = client.get(f"/api/trees/{info['tree_id']}/nodes/{info['node_id']}/snapshot")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    return r.content


def upload(client: TestClient, data: bytes):
    return client.post(
        "/api/snapshots", content=data, headers={"content-type": "application/octet-stream"}
    )


@pytest.mark.parametrize("backend", ["pusht-sim", "mini-dreamzero"])
def test_snapshot_round_trip_gives_identical_next_frames(client, backend, one_torch_thread):
    info = new_session(client, backend=backend, seed=5)
    sid = info["session_id"]
    for a in ACTIONS[:3]:
        info = step(client, sid, a)
    data = export_current(client, info)
    assert WorldStateSnapshot.from_bytes(data).frame_index == 3

    r = upload(client, data)
    assert r.status_code == 200, r.text
    imported = r.json()
    assert imported["tree_id"] != info["tree_id"] and imported["frame_index"] == 3
    assert imported["backend"] == backend
    assert frame(client, imported["session_id"]) == frame(client, sid)
    for a in ACTIONS[3:]:
        ra, rb = step(client, sid, a), step(client, imported["session_id"], a)
        assert ra["reward"] == rb["reward"]
        assert frame(client, sid) == frame(client, imported["session_id"])


def test_corrupt_truncated_and_foreign_uploads_are_refused(client):
    info = new_session(client, seed=3)
    info = step(client, info["session_id"], ACTIONS[0])
    data = export_current(client, info)

    flipped = bytearray(data)
    flipped[-3] ^= 0x40  # inside the tensor data
    assert_error(upload(client, bytes(flipped)), 422, "checksum")
    assert_error(upload(client, data[: len(data) // 2]), 422, "truncated")
    assert_error(upload(client, data[:5]), 422, "truncated")
    assert_error(upload(client, b""), 422, "empty")
    assert_error(upload(client, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"), 422,
                 "not a safetensors file")  # fmt: skip
    assert client.get("/api/status").json()["sessions"] == 1  # nothing was created


def _resave(data: bytes, edit) -> bytes:
    """A validly check-summed snapshot with ``edit`` applied (a crafted, wrong upload)."""
    snap = WorldStateSnapshot.from_bytes(data)
    edit(snap)
    return snap.to_bytes()


def test_uploads_with_wrong_backend_shapes_or_config_are_refused(client):
    import torch

    info = new_session(client, seed=3)
    info = step(client, info["session_id"], ACTIONS[0])
    data = export_current(client, info)

    def wrong_shape(s):
        s.tensors["physics/bodies"] = torch.zeros(2, 17, dtype=torch.float64)

    def wrong_dtype(s):
        s.tensors["physics/bodies"] = s.tensors["physics/bodies"].float()

    def missing(s):
        del s.tensors["physics/curr_dt"]

    def extra(s):
        s.tensors["evil/payload"] = torch.zeros(3)

    def nan(s):
        s.tensors["physics/bodies"] = s.tensors["physics/bodies"].clone()
        s.tensors["physics/bodies"][0, 0] = float("nan")

    def backend(s):
        s.backend = "no-such-backend"

    def config(s):
        s.backend_config = {"frame_size": 64, "action_repeat": 1}

    def frame_index(s):
        s.frame_index = 40

    def other_backends_state(s):
        s.backend = "mini-dreamzero"
        s.backend_config = {"cfg_scale": 1.5, "num_denoise_steps": 2, "local_attn_size": 16,
                            "warm_start": 0.0}  # fmt: skip

    for edit, words in [
        (wrong_shape, ["physics/bodies", "[2, 17]"]),
        (wrong_dtype, ["physics/bodies", "float32"]),
        (missing, ["physics/curr_dt"]),
        (extra, ["evil/payload"]),
        (nan, ["nan"]),
        (backend, ["no-such-backend", "not registered"]),
        (config, ["backend_config"]),
        (frame_index, ["frame_index 40"]),
        (other_backends_state, ["not part of a 'mini-dreamzero' state"]),
    ]:
        assert_error(upload(client, _resave(data, edit)), 422, *words)
    assert client.get("/api/status").json()["sessions"] == 1


# --- bad input --------------------------------------------------------------------------------
def test_unknown_ids_are_404(client):
    info = new_session(client)
    sid, tid = info["session_id"], info["tree_id"]
    assert_error(client.get("/api/sessions/nope"), 404, "nope")
    assert_error(client.post("/api/sessions/nope/step", json={"action": [0, 0]}), 404, "nope")
    assert_error(client.delete("/api/sessions/nope"), 404, "nope")
    assert_error(client.get("/api/sessions/nope/frame.png"), 404, "nope")
    assert_error(client.post(f"/api/sessions/{sid}/restore", json={"checkpoint_id": "cp999"}),
                 404, "cp999")  # fmt: skip
    assert_error(client.post(f"/api/sessions/{sid}/fork", json={"checkpoint_id": "cp999"}),
                 404, "cp999")  # fmt: skip
    assert_error(client.get("/api/trees/nope/d3"), 404, "nope")
    assert_error(client.get(f"/api/trees/{tid}/nodes/cp999/frame.png"), 404, "cp999")
    assert_error(client.get(f"/api/trees/{tid}/nodes/cp999/lineage"), 404, "cp999")
    assert_error(client.get(f"/api/trees/{tid}/nodes/cp999/snapshot"), 404, "cp999")


def test_bad_actions_are_422(client):
    sid = new_session(client)["session_id"]
    url = f"/api/sessions/{sid}/step"
    headers = {"content-type": "application/json"}
    assert_error(client.post(url, json={"action": [0.1]}), 422, "action", "2 numbers")
    assert_error(client.post(url, json={"action": [0.1, 0.2, 0.3]}), 422, "2 numbers")
    assert_error(client.post(url, json={"action": []}), 422, "action")
    assert_error(client.post(url, json={"action": [2.0, 0.0]}), 422, "action")
    assert_error(client.post(url, json={"action": ["a", 0.0]}), 422, "action")
    assert_error(client.post(url, json={}), 422, "action")
    assert_error(client.post(url, json={"action": [0, 0], "typo": 1}), 422, "typo")
    # NaN as the JSON literal (Python's json accepts it), and inf via a float that overflows.
    assert_error(client.post(url, content='{"action": [NaN, 0.0]}', headers=headers), 422,
                 "finite")  # fmt: skip
    assert_error(client.post(url, content='{"action": [1e999, 0.0]}', headers=headers), 422,
                 "finite")  # fmt: skip
    assert_error(client.post(url, content='{"action": [-Infinity, 0.0]}', headers=headers), 422,
                 "finite")  # fmt: skip
    assert_error(client.post(url, content="{not json", headers=headers), 422, "json")
    # None of it moved the session.
    assert client.get(f"/api/sessions/{sid}").json()["frame_index"] == 0


def test_bad_session_parameters_are_422(client):
    assert_error(client.post("/api/sessions", json={"prompt": "dance"}), 422, "dance",
                 PROMPTS[0])  # fmt: skip
    assert_error(client.post("/api/sessions", json={"backend": "nope"}), 422, "nope",
                 "pusht-sim")  # fmt: skip
    for seed in (-1, 2**40, "3", 1.5, True):
        assert_error(client.post("/api/sessions", json={"seed": seed}), 422, "seed")
    sid = new_session(client)["session_id"]
    assert_error(client.post(f"/api/sessions/{sid}/fork", json={"prompt": "dance"}), 422,
                 "dance")  # fmt: skip
    assert_error(client.post(f"/api/sessions/{sid}/rewind", json={"n_steps": -1}), 422,
                 "n_steps")  # fmt: skip
    assert client.get("/api/status").json()["sessions"] == 1


def test_oversized_bodies_are_413():
    with make_client(max_json_bytes=1024, max_upload_bytes=4096) as client:
        sid = new_session(client)["session_id"]
        big = {"action": [0.0, 0.0], "pad": "x" * 5000}
        assert_error(client.post(f"/api/sessions/{sid}/step", json=big), 413, "too large")

        # A chunked body without Content-Length is counted as it streams in.
        def chunks():
            for _ in range(10):
                yield b" " * 512

        r = client.post(f"/api/sessions/{sid}/step", content=chunks(),
                        headers={"content-type": "application/json"})  # fmt: skip
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert_error(r, 413, "too large")
        assert_error(upload(client, b"\0" * 5000), 413, "too large", "4096")
        # Just under the limits is fine.
        assert client.post(f"/api/sessions/{sid}/step", json={"action": [0, 0]}).status_code == 200
        assert upload(client, b"\0" * 4000).status_code == 422


# --- limits -----------------------------------------------------------------------------------
def test_max_sessions():
    with make_client(max_sessions=2) as client:
        first = new_session(client)
        new_session(client)
        assert_error(client.post("/api/sessions", json={}), 409, "max sessions")
        sid = first["session_id"]
        assert_error(client.post(f"/api/sessions/{sid}/fork", json={}), 409, "max sessions")
        data = export_current(client, first)
        assert_error(upload(client, data), 409, "max sessions")
        client.delete(f"/api/sessions/{sid}")
        assert client.post("/api/sessions", json={}).status_code == 200


def test_store_budget():
    with make_client(store_budget_bytes=6000) as client:
        info = new_session(client, seed=1)
        sid = info["session_id"]
        refused = None
        for k in range(50):
            r = client.post(f"/api/sessions/{sid}/step", json={"action": [0.1, 0.1]})
            if r.status_code != 200:
                refused = r
                break
        assert refused is not None, "the budget was never reached"
        assert_error(refused, 507, "budget")
        status = client.get("/api/status").json()
        assert status["store_bytes"] >= 6000
        # The refused step did not happen; unchecked steps still may.
        assert client.get(f"/api/sessions/{sid}").json()["frame_index"] == k
        assert step(client, sid, [0.1, 0.1], checkpoint=False)["frame_index"] == k + 1
        assert_error(client.post(f"/api/sessions/{sid}/checkpoint", json={}), 507, "budget")
        assert_error(client.post("/api/sessions", json={}), 507, "budget")
        assert_error(client.post(f"/api/sessions/{sid}/fork", json={}), 507, "budget")
        client.delete(f"/api/sessions/{sid}")
        assert client.post("/api/sessions", json={}).status_code == 200


# --- token ------------------------------------------------------------------------------------
def test_token_required_everywhere_when_set():
    from starlette.testclient import WebSocketDenialResponse

    with make_client(token="s3cret") as client:
        for path in ("/api/health", "/api/status", "/", "/openapi.json", "/docs",
                     "/static/vendor/d3.v7.min.js"):  # fmt: skip
            assert_error(client.get(path), 401, "missing token")
            assert_error(client.get(path, headers={"Authorization": "Bearer nope"}), 401,
                         "wrong token")  # fmt: skip
        assert_error(client.post("/api/sessions", json={}), 401, "missing token")
        ok = {"Authorization": "Bearer s3cret"}
        assert client.get("/api/health", headers=ok).status_code == 200
        assert client.get("/openapi.json", headers=ok).status_code == 200
        assert client.get("/static/vendor/d3.v7.min.js", headers=ok).status_code == 200
        assert client.get("/api/health?token=s3cret").status_code == 200
        with pytest.raises(WebSocketDenialResponse):
            with client.websocket_connect("/api/ws"):
                pass
        with pytest.raises(WebSocketDenialResponse):
            with client.websocket_connect("/api/ws?token=wrong"):
                pass
        with client.websocket_connect("/api/ws?token=s3cret") as ws:
            ws.send_json({"subscribe": "*"})
            assert ws.receive_json() == {"type": "subscribed", "tree_id": "*"}


def test_open_without_token(client):
    assert client.get("/api/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/static/vendor/d3.v7.min.js").content.startswith(b"// https://d3js.org")


# --- websocket ------------------------------------------------------------------------------
def test_websocket_pushes_step_and_fork_events_with_frames(client):
    info = new_session(client, seed=6)
    sid, tid = info["session_id"], info["tree_id"]
    other = new_session(client, seed=7)["session_id"]
    with client.websocket_connect("/api/ws") as ws:
        ws.send_json({"subscribe": tid})
        assert ws.receive_json() == {"type": "subscribed", "tree_id": tid}
        step(client, other, ACTIONS[0])  # another tree: not delivered
        stepped = step(client, sid, ACTIONS[0])
        event = ws.receive_json()
        assert event["type"] == "step" and event["tree_id"] == tid
        assert event["session_id"] == sid and event["node_id"] == stepped["node_id"]
        assert event["frame_index"] == 1
        png = base64.b64decode(event["frame_png"])
        assert png_size(png) == (96, 96) and png == frame(client, sid)

        child = client.post(f"/api/sessions/{sid}/fork",
                            json={"checkpoint_id": stepped["node_id"]}).json()  # fmt: skip
        event = ws.receive_json()
        assert event["type"] == "fork" and event["session_id"] == child["session_id"]
        assert event["node_id"] == child["node_id"] and event["frame_png"]

        client.post(f"/api/sessions/{child['session_id']}/rewind", json={"n_steps": 1})
        assert ws.receive_json()["type"] == "rewind"
        client.delete(f"/api/sessions/{child['session_id']}")
        closed = ws.receive_json()
        assert closed["type"] == "session_closed" and closed["frame_png"] is None

        ws.send_text("not json")
        assert ws.receive_json()["type"] == "error"


def test_openapi_documents_errors_and_action_bounds(client):
    spec = client.get("/openapi.json").json()
    step_op = spec["paths"]["/api/sessions/{session_id}/step"]["post"]
    assert {"404", "413", "422", "507"} <= set(step_op["responses"])
    err = step_op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert err.endswith("/ErrorResponse")
    action = spec["components"]["schemas"]["StepRequest"]["properties"]["action"]
    assert action["items"]["minimum"] == -1 and action["items"]["maximum"] == 1
    upload_op = spec["paths"]["/api/snapshots"]["post"]
    assert "application/octet-stream" in upload_op["requestBody"]["content"]
    png = spec["paths"]["/api/sessions/{session_id}/frame.png"]["get"]["responses"]["200"]
    assert "image/png" in png["content"]


# --- mini-dreamzero ---------------------------------------------------------------------------
def test_mini_dreamzero_session_fork_and_node_frames(client, one_torch_thread):
    info = new_session(client, backend="mini-dreamzero", seed=0)
    sid, tid = info["session_id"], info["tree_id"]
    for a in ACTIONS[:3]:
        info = step(client, sid, a)
    assert png_size(frame(client, sid)) == (64, 64)
    child = client.post(f"/api/sessions/{sid}/fork", json={"checkpoint_id": info["node_id"],
                                                           "seed": 3}).json()  # fmt: skip
    step(client, child["session_id"], ACTIONS[3])
    nodes = d3_nodes(client, tid)
    assert len(nodes) == 1 + 3 + 1 + 1
    for n in nodes:
        r = client.get(f"/api/trees/{tid}/nodes/{n['id']}/frame.png")
        assert r.status_code == 200 and png_size(r.content) == (64, 64)
    # A node's frame equals the frame the session showed when it was made.
    r = client.get(f"/api/trees/{tid}/nodes/{info['node_id']}/frame.png")
    assert r.content == frame(client, sid, frame_index=3)
    # Same seed, same actions: the learned model is deterministic too.
    again = new_session(client, backend="mini-dreamzero", seed=0)["session_id"]
    for a in ACTIONS[:3]:
        step(client, again, a)
    assert frame(client, again) == frame(client, sid)
    json.dumps(client.get("/api/status").json())


def test_concurrent_requests_on_one_tree_stay_consistent(client):
    """Threads stepping and forking the sessions of one tree: the per-tree lock keeps the
    tree exactly one node per checkpointed step or fork."""
    from concurrent.futures import ThreadPoolExecutor

    info = new_session(client, seed=8)
    sid, tid = info["session_id"], info["tree_id"]
    forks = [client.post(f"/api/sessions/{sid}/fork", json={}).json()["session_id"]
             for _ in range(3)]  # fmt: skip
    sessions = [sid, *forks]
    steps_each = 15

    def drive(s: str) -> list[int]:
        return [client.post(f"/api/sessions/{s}/step", json={"action": [0.3, -0.2]}).status_code
                for _ in range(steps_each)]  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        codes = [c for cs in pool.map(drive, sessions) for c in cs]
    assert codes == [200] * len(codes)
    # root + 3 fork-origins (a fork of "now" checkpoints now) + 3 forks + every step
    assert len(d3_nodes(client, tid)) == 1 + 3 + 3 + 4 * steps_each
    frames = {s: client.get(f"/api/sessions/{s}").json()["frame_index"] for s in sessions}
    assert set(frames.values()) == {steps_each}


# --- command line -----------------------------------------------------------------------------
def test_serve_flags_map_to_settings(monkeypatch):
    from arcfab_gym.service.cli import build_parser, settings_from_args

    monkeypatch.setenv("ARCFAB_TOKEN", "from-env")
    args = build_parser().parse_args(
        ["serve", "--port", "9001", "--max-sessions", "3", "--store-budget-mb", "2",
         "--max-body-kb", "32", "--backend-default", "mini-dreamzero"]  # fmt: skip
    )
    s = settings_from_args(args)
    assert (s.host, s.port, s.token, s.max_sessions) == ("127.0.0.1", 9001, "from-env", 3)
    assert s.store_budget_bytes == 2 * 2**20 and s.max_upload_bytes == 32 * 2**10
    assert s.max_json_bytes == 32 * 2**10 and s.backend_default == "mini-dreamzero"
    unlimited = settings_from_args(build_parser().parse_args(["serve", "--store-budget-mb", "0"]))
    assert unlimited.store_budget_bytes is None


def test_python_m_service_starts_a_real_server():
    """``python -m arcfab_gym.service`` binds loopback and answers /api/health."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "arcfab_gym.service", "--port", str(port), "--log-level",
         "warning", "--token", "t0k"],  # fmt: skip
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/health",
                              headers={"Authorization": "Bearer t0k"})  # fmt: skip
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "no answer within 60 s"
                time.sleep(0.2)
        assert r.json() == {"status": "ok", "version": "0.1.0"}
        assert httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
