"""The ``dreamzero`` backend on DreamZero's own classes (tiny random size, CPU).

Skipped, with the reason, where the optional extra or DreamZero's source is missing:
``pip install -e ".[dreamzero]"`` and ``ARCFAB_DREAMZERO_SRC`` (default
``../shared/vendor/dreamzero`` beside the repository).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from arcfab_gym import HistoryError, Session, WorldStateSnapshot, create_world_model
from arcfab_gym.models.dreamzero import runtime

_WHY = runtime.availability()
if _WHY is not None:  # skip on a developer's machine; fail in CI, which installs it (.ci/run)
    if runtime.required_here():
        pytest.fail(f"CI must run the dreamzero tests: {_WHY}", pytrace=False)
    pytest.skip(f"dreamzero backend unavailable: {_WHY}", allow_module_level=True)

KW = {"num_inference_steps": 4}


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    from arcfab_gym.models.dreamzero.backend import DreamZero

    return DreamZero(**KW)


@pytest.fixture
def model(base):
    """A fresh world on the module's head (weights shared; state swapped in per call)."""
    m = base.spawn()
    m.start(m.prompts[0], seed=0)
    return m


def acts(model, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, model.action_dim)).astype(np.float32)


def run(model, actions) -> list:
    return [model.step(a) for a in actions]


def same(a, b) -> bool:
    return all(
        np.array_equal(x.observation[k], y.observation[k]) for x, y in zip(a, b, strict=True)
        for k in x.observation
    )  # fmt: skip


def bits(t: torch.Tensor) -> bytes:
    return (
        t.contiguous().view(torch.int16).numpy().tobytes()
        if t.dtype == torch.bfloat16
        else t.numpy().tobytes()
    )


# --- the snapshot mapping -------------------------------------------------------------------
def test_snapshot_holds_every_piece_of_dreamzero_state(model):
    run(model, acts(model, 2))
    s = model.extract_state()
    h = model.head
    t, meta = s.tensors, s.meta
    blocks = sorted(k for k in t if k.startswith("kv_cache1/"))
    assert len(blocks) == len([k for k in t if k.startswith("kv_cache_neg/")]) == 3
    # The blocks, concatenated, are the head's kv_cache1 / kv_cache_neg bit for bit.
    for name, cache in (("kv_cache1", h.kv_cache1), ("kv_cache_neg", h.kv_cache_neg)):
        for layer in range(model.num_layers):
            joined = torch.cat([t[f"{name}/{k:04d}"][layer] for k in range(3)], dim=2)
            assert tuple(joined.shape) == tuple(cache[layer].shape)  # [2, B, L, heads, hd]
            assert joined.numpy().tobytes() == bits(cache[layer]), (name, layer)
    for name in ("clip_feas", "ys"):
        assert t[name].numpy().tobytes() == bits(getattr(h, name)), name
    assert torch.equal(t["language"], h.language)
    assert meta["current_start_frame"] == h.current_start_frame == 7
    assert meta["seed"] == h.seed == 0
    assert len([k for k in t if k.startswith("latent_video/")]) == model.frame_count == 3
    # Dead state: shapes recorded, no bytes stored.
    assert meta["crossattn_cache_shape"] == [
        model.num_layers,
        2,
        1,
        512,
        model.num_heads,
        model.head_dim,
    ]
    assert not any("crossattn" in k for k in t)


def test_forward_pass_ignores_the_crossattention_caches(model, monkeypatch):
    """DreamZero allocates crossattn_cache(_neg) but never reads or writes them: filled
    with garbage they change no output bit, and come back untouched."""
    run(model, acts(model, 1))
    state = model.extract_state()
    nxt = acts(model, 2, seed=1)  # inside the window (a reset re-allocates zeros)
    expected = run(model, nxt)
    shape = model._crossattn_shape()[1:]
    g = torch.Generator().manual_seed(0)
    junk = tuple([torch.randn(shape, generator=g).to(torch.bfloat16) * 1e3 for _ in range(model.num_layers)]
                 for _ in range(2))  # fmt: skip
    junk[0][0][0, 0, 0, 0, 0] = float("nan")
    before = [bits(x) for branch in junk for x in branch]
    monkeypatch.setattr(model, "_dead_crossattn", lambda: junk)
    other = model.spawn()
    monkeypatch.setattr(other, "_dead_crossattn", lambda: junk)
    other.load_state(state)
    got = run(other, nxt)
    assert same(got, expected)
    assert model.head.crossattn_cache is junk[0]
    assert [bits(x) for branch in junk for x in branch] == before


def test_safetensors_round_trip_reproduces_the_next_output_bit_for_bit(model, tmp_path):
    run(model, acts(model, 2))
    snap = WorldStateSnapshot.from_model(model)
    expected = run(model, acts(model, 5, seed=3))  # crosses the window end
    path = snap.save(tmp_path / "dz.safetensors")
    import safetensors

    with safetensors.safe_open(str(path), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("kv_cache1/0000").dtype == torch.int16  # bf16 bits, exact
    assert not any("crossattn" in n for n in names)
    fresh = create_world_model(snap.backend, **snap.backend_config)  # a new head from disk
    assert fresh.head is not model.head
    fresh.load_state(WorldStateSnapshot.load(path).model_state)
    got = run(fresh, acts(fresh, 5, seed=3))
    assert same(got, expected)
    for a, b in zip(got, expected):
        assert a.info == b.info


# --- fabric semantics ----------------------------------------------------------------------
def test_the_window_resets_every_four_steps(model):
    # The backend contract runs a quarter of its long rollouts on DreamZero
    # (tests/test_backend_contract.py, ROLLOUT_SHARE) because this period makes even those
    # cross resets; if the period grows, that share must grow with it.
    resets = [o.info["reset"] is not None for o in run(model, acts(model, 8))]
    assert resets == [False, False, False, True, False, False, False, True]


def test_restore_never_trips_a_reset_rule(model):
    run(model, acts(model, 1))
    mid = model.extract_state()  # csf 5, inside the window
    other = model.spawn()
    other.load_state(mid)
    out = other.step(acts(other, 1)[0])
    assert out.info["reset"] is None and "reset" not in other.last_log
    assert other.current_start_frame == 7
    # After a new prompt too (the language key moves with it) ...
    other.load_state(mid)
    other.set_prompt(other.prompts[1])
    out = other.step(acts(other, 1)[0])
    assert out.info["reset"] is None and other.current_start_frame == 7
    # ... and the only reset is DreamZero's window end, at the same frame as uninterrupted.
    resets = [o.info["reset"] for o in run(other, acts(other, 3))]
    assert resets == [None, "current_start_frame >= local_attn_size", None]


def test_new_prompt_fork_continues_the_history(model):
    s = Session(model)
    s.reset(prompt=model.prompts[0], seed=0)
    s.step(acts(model, 1)[0])
    cid = s.checkpoint()
    parent = s.model.extract_state()
    same_prompt = s.fork(cid)
    new_prompt = s.fork(cid, new_prompt=model.prompts[1])
    a = acts(model, 1, seed=5)[0]
    o_same = same_prompt.model.step(a)
    o_new = new_prompt.model.step(a)
    assert o_new.info["reset"] is None and new_prompt.model.current_start_frame == 7
    assert new_prompt.model.frame_count == 3
    st = new_prompt.model.extract_state()
    for k in (k for k in parent.tensors if k.startswith(("kv_cache1/", "latent_video/"))):
        assert torch.equal(st.tensors[k], parent.tensors[k]), k  # the history is kept
    assert not np.array_equal(o_new.observation["action_chunk"], o_same.observation["action_chunk"])
    assert torch.equal(
        new_prompt.model.head.language, new_prompt.model.tokenize(model.prompts[1])[0]
    )


def test_new_seed_fork_samples_another_future(model):
    s = Session(model)
    s.reset(prompt=model.prompts[0], seed=0)
    cid = s.checkpoint()
    a = acts(model, 2, seed=2)
    again = [o.observation for o in run(s.fork(cid).model, a)]
    base = [o.observation for o in run(s.fork(cid).model, a)]
    other = [o.observation for o in run(s.fork(cid, new_seed=9).model, a)]
    for x, y in zip(base, again):
        np.testing.assert_array_equal(x["action_chunk"], y["action_chunk"])
    assert not np.array_equal(base[0]["action_chunk"], other[0]["action_chunk"])
    assert not np.array_equal(base[0]["frame"], other[0]["frame"])


def test_rewind_by_whole_frame_blocks(model):
    first = acts(model, 2)
    states = [model.extract_state()]
    for a in first:
        model.step(a)
        states.append(model.extract_state())
    future = run(model, acts(model, 1, seed=7))  # frame 3, still in the window
    for n, want in ((1, states[2]), (2, states[0])):
        model.rewind(n)  # frame 3 -> 2, then 2 -> 0: the window's first frame
        got = model.extract_state()
        assert got.meta == want.meta
        assert got.tensors.keys() == want.tensors.keys()
        for k, v in want.tensors.items():
            assert got.tensors[k].numpy().tobytes() == v.numpy().tobytes(), k
    assert model.frame_count == 1 and model.current_start_frame == 3
    run(model, first)
    assert same(run(model, acts(model, 1, seed=7)), future)


def test_rewind_past_the_window_is_a_clear_error(model):
    run(model, acts(model, 5))  # frames 0..5; the window restarted at frame 4
    assert model.extract_state().meta["window_start"] == 4
    model.rewind(1)
    with pytest.raises(HistoryError, match=r"attention window holds 0 \(frames 4..4"):
        model.rewind(1)
    # Through the fabric a rewind restores a full state, so the window is no limit there.
    s = Session(model.spawn())
    s.reset(prompt=model.prompts[0], seed=0)
    for a in acts(model, 5):
        s.step(a)
    s.rewind(5)
    assert s.model.frame_count == 1 and s.model.current_start_frame == 3


def test_inject_latent_goes_through_dreamzeros_latent_video_path(model, monkeypatch):
    s = Session(model)
    s.reset(prompt=model.prompts[0], seed=0)
    s.step(acts(model, 1)[0])
    plain = s.fork()
    c, n = 16, model.nfpb
    lat = torch.randn(c, n, *model._latent_hw(), generator=torch.Generator().manual_seed(3))
    seen = []
    orig = type(model.head).lazy_joint_video_action

    def spy(head, backbone, data, latent_video=None):
        seen.append(latent_video)
        return orig(head, backbone, data, latent_video=latent_video)

    monkeypatch.setattr(model.head, "lazy_joint_video_action", spy.__get__(model.head))
    s.inject_latent(lat)
    a = acts(model, 1, seed=4)[0]
    o_inj = s.step(a)[0]
    o_plain = plain.step(a)[0]
    assert torch.equal(seen[0][0].float(), lat.to(torch.bfloat16).float())  # what the head got
    assert not np.array_equal(o_inj["action_chunk"], o_plain["action_chunk"])
    with pytest.raises(ValueError, match="latent must be finite"):
        s.inject_latent(torch.zeros(c, n + 1, *model._latent_hw()))


def test_prompt_longer_than_text_len_is_a_clear_error(base):
    from arcfab_gym.models.dreamzero.backend import PromptTooLongError

    long = " ".join(["word"] * (base.text_len + 1))
    m = create_world_model("dreamzero", **KW, prompts=[base.prompts[0], long])
    with pytest.raises(PromptTooLongError, match=f"at most text_len={base.text_len}"):
        m.start(long, seed=0)
    m.start(base.prompts[0], seed=0)
    with pytest.raises(PromptTooLongError):
        m.set_prompt(long)


# --- prefix sharing --------------------------------------------------------------------------
def _storages(state) -> dict[int, int]:
    return {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.tensors.values()
    }


def test_checkpoints_share_their_prefix(model):
    """Each new checkpoint adds one frame block of cache and latents (plus small
    per-frame records), whatever the history length."""
    prev = _storages(model.extract_state())
    block = None
    for a in acts(model, 3):
        model.step(a)
        cur = _storages(model.extract_state())
        new = sum(n for p, n in cur.items() if p not in prev)
        kv = (
            2
            * model.num_layers
            * 2
            * model.nfpb
            * model.frame_seqlen
            * model.num_heads
            * model.head_dim
            * 2
        )
        block = kv + 16 * model.nfpb * 16 * 2  # both caches + the latent block
        small = 4096
        assert block <= new <= block + small, (new, block)
        prev = cur
    assert block is not None


def test_recompute_storage_rebuilds_the_cache_bit_for_bit(base, tmp_path):
    """kv_storage="recompute": snapshots keep the latents each block was written from
    (and its text), not the block; a restore re-runs DreamZero's cache-writing pass and
    gets the very bits back -- across a new prompt mid-window, an injected latent and a
    real frame (whose block has no latent to rebuild from, so it is kept as bytes)."""
    from arcfab_gym.models.dreamzero.backend import DreamZero

    m = DreamZero(**KW, kv_storage="recompute", _head=base.head)
    m.start(m.prompts[0], seed=0)
    a = acts(m, 8, seed=21)
    m.step(a[0])
    m.set_prompt(m.prompts[2])
    m.step(a[1])
    m.resync(
        latent=torch.randn(16, m.nfpb, *m._latent_hw(), generator=torch.Generator().manual_seed(1))
    )
    m.step(a[2])
    state = m.extract_state()
    assert not any(k.startswith("kv_cache") for k in state.tensors)
    assert state.nbytes() - state.tensors["clip_feas"].nbytes < 20_000  # no cache bytes
    live = [bits(x) for x in m.kv_cache("cond") + m.kv_cache("neg")]
    expected = run(m, a[3:5])
    other = DreamZero(**KW, kv_storage="recompute", _head=base.head)
    other.load_state(state)
    other._install(other._w)
    assert [bits(x) for x in other.head.kv_cache1 + other.head.kv_cache_neg] == live
    assert same(run(other, a[3:5]), expected)
    # A backend that stores blocks rebuilds them from such a state before snapshotting.
    keeper = DreamZero(**KW, _head=base.head)
    keeper.load_state(state)
    full = keeper.extract_state()
    assert sum(k.startswith("kv_cache") for k in full.tensors) == 2 * state.meta["kv_blocks"]
    assert [bits(x) for x in keeper.kv_cache("cond") + keeper.kv_cache("neg")] == live
    # A real frame's block is kept as bytes.
    m.resync(frame=np.full((*m.frame_hw, 3), 90, np.uint8))
    m.step(a[5])
    kept = m.extract_state()
    assert [k for k in kept.tensors if k.startswith("kv_cache")] == [
        "kv_cache1/0002",
        "kv_cache_neg/0002",
    ]
    future = run(m, a[6:8])
    fresh = create_world_model("dreamzero", **KW, kv_storage="recompute")
    snap2 = WorldStateSnapshot(
        tensors=kept.tensors,
        meta=kept.meta,
        backend="dreamzero",
        backend_config=m.config(),
        frame_index=0,
        prompt=m.prompt,
        seed=0,
    )
    fresh.load_state(WorldStateSnapshot.load(snap2.save(tmp_path / "r.safetensors")).model_state)
    assert same(run(fresh, a[6:8]), future)


# --- checkpoint folders ----------------------------------------------------------------------
def test_a_dreamzero_checkpoint_folder_builds_the_same_head(tmp_path, base):
    from arcfab_gym.models.dreamzero import tiny

    d = tiny.write_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    m = create_world_model("dreamzero", **KW, checkpoint=str(d))
    for (k, a), (_, b) in zip(
        sorted(m.head.state_dict().items()), sorted(base.head.state_dict().items())
    ):
        assert torch.equal(a, b), k
    m.start(m.prompts[0], seed=0)
    ref = base.spawn()
    ref.start(ref.prompts[0], seed=0)
    np.testing.assert_array_equal(m.observe()["action_chunk"], ref.observe()["action_chunk"])
    assert m.config()["checkpoint"] == str(d)


def test_gym_make_runs_the_dreamzero_backend(base):
    """ArcFabric-v0 on DreamZero: the spaces are the backend's own; steps, clone_state and
    restore_state replay exactly."""
    import gymnasium as gym

    env = gym.make("ArcFabric-v0", backend="dreamzero", backend_kwargs=KW)
    u = env.unwrapped
    assert u.prompt == base.prompts[0]
    assert env.action_space.shape == (base.action_dim,)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    env.action_space.seed(0)
    a = [env.action_space.sample() for _ in range(3)]
    env.step(a[0])
    snap = u.clone_state()
    want = [env.step(x)[0] for x in a[1:]]
    u.restore_state(snap)
    got = [env.step(x)[0] for x in a[1:]]
    for x, y in zip(got, want):
        assert env.observation_space.contains(x)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    env.close()


# --- the service --------------------------------------------------------------------------
def test_the_service_runs_sessions_on_dreamzero(base):
    """The web service builds the backend by name: sessions step, checkpoint, fork,
    rewind and render frames with no dreamzero-specific code."""
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from arcfab_gym.service.app import create_app
    from arcfab_gym.service.settings import ServiceSettings

    a = acts(base, 1)[0].tolist()
    with TestClient(create_app(ServiceSettings())) as c:
        info = c.post("/api/sessions", json={"backend": "dreamzero", "seed": 0}).json()
        sid = info["session_id"]
        assert info["action_dim"] == base.action_dim
        for _ in range(3):
            r = c.post(f"/api/sessions/{sid}/step", json={"action": a})
            assert r.status_code == 200, r.text
        cid = c.post(f"/api/sessions/{sid}/checkpoint", json={"label": "x"}).json()["checkpoint_id"]
        r = c.get(f"/api/sessions/{sid}/frame.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        child = c.post(f"/api/sessions/{sid}/fork", json={"checkpoint_id": cid}).json()
        assert child["frame_index"] == 3
        r = c.post(f"/api/sessions/{sid}/rewind", json={"n_steps": 2})
        assert r.status_code == 200 and r.json()["frame_index"] == 1


# --- a short stateful property test against a replay oracle ---------------------------------

_MACHINE: dict = {}


def _machine_model(kv_storage: str = "blocks"):
    """One head for the machines (1 denoising step: cheap; the state is what is checked),
    and one oracle world per kind of KV storage."""
    from arcfab_gym.models.dreamzero.backend import DreamZero

    if "base" not in _MACHINE:
        torch.set_num_threads(1)
        _MACHINE["base"] = DreamZero(num_inference_steps=1)
        _MACHINE["acts"] = acts(_MACHINE["base"], 6, seed=11)
    if kv_storage not in _MACHINE:
        _MACHINE[kv_storage] = DreamZero(num_inference_steps=1, kv_storage=kv_storage,
                                         _head=_MACHINE["base"].head)  # fmt: skip
    return _MACHINE[kv_storage]


class DreamZeroFabricMachine(RuleBasedStateMachine):
    """Random step / checkpoint / restore / fork (new prompt or seed) / rewind through a
    Session on the dreamzero backend; the active world must always equal a fresh replay
    of its lineage, bit for bit (across window resets too)."""

    KV = "blocks"

    def __init__(self):
        super().__init__()
        base = _machine_model(self.KV)
        self.A = _MACHINE["acts"]
        self.root = Session(base.spawn())
        self.root.reset(prompt=base.prompts[0], seed=0)
        self.active = self.root
        self.lineage = {self.root.session_id: [("start", base.prompts[0], 0)]}
        self.checkpoints: dict[str, list] = {}

    @rule(i=st.integers(0, 5))
    def step(self, i):
        self.active.step(self.A[i])
        self.lineage[self.active.session_id].append(("step", i))

    @rule()
    def checkpoint(self):
        cid = self.active.checkpoint()
        self.checkpoints[cid] = list(self.lineage[self.active.session_id])

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data())
    def restore(self, data):
        cid = data.draw(st.sampled_from(sorted(self.checkpoints)))
        self.active.restore(cid)
        self.lineage[self.active.session_id] = list(self.checkpoints[cid])

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data(), prompt=st.sampled_from([None, 1, 2]), seed=st.sampled_from([None, 5]))
    def fork(self, data, prompt, seed):
        cid = data.draw(st.sampled_from(sorted(self.checkpoints)))
        p = None if prompt is None else self.root.model.prompts[prompt]
        child = self.active.fork(cid, new_prompt=p, new_seed=seed)
        events = list(self.checkpoints[cid])
        if p is not None:
            events.append(("prompt", p))
        if seed is not None:
            events.append(("seed", seed))
        self.lineage[child.session_id] = events
        self.checkpoints[child.checkpoints[0]] = list(events)
        self.active = child

    @rule(n=st.integers(0, 3))
    def rewind(self, n):
        if n > self.active.history_length:
            with pytest.raises(HistoryError):
                self.active.rewind(n)
            return
        self.active.rewind(n)
        events = list(self.lineage[self.active.session_id])
        while n:
            n -= events.pop()[0] == "step"
        self.lineage[self.active.session_id] = events

    @invariant()
    def matches_replay(self):
        oracle = _machine_model(self.KV)
        for ev in self.lineage[self.active.session_id]:
            if ev[0] == "start":
                oracle.start(ev[1], ev[2])
            elif ev[0] == "step":
                oracle.step(self.A[ev[1]])
            elif ev[0] == "prompt":
                oracle.set_prompt(ev[1])
            else:
                oracle.set_seed(ev[1])
        got, want = self.active.model.extract_state(), oracle.extract_state()
        assert got.tensors.keys() == want.tensors.keys()
        for k in got.tensors:
            assert got.tensors[k].numpy().tobytes() == want.tensors[k].numpy().tobytes(), k
        assert got.meta == want.meta


DreamZeroFabricMachine.TestCase.settings = settings(
    max_examples=6, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
test_dreamzero_fabric_operations_match_replay = DreamZeroFabricMachine.TestCase


class DreamZeroRecomputeFabricMachine(DreamZeroFabricMachine):
    """The same, with snapshots that hold no KV bytes (rebuilt on every restore)."""

    KV = "recompute"


DreamZeroRecomputeFabricMachine.TestCase.settings = settings(
    max_examples=4, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
test_dreamzero_recompute_fabric_operations_match_replay = DreamZeroRecomputeFabricMachine.TestCase
