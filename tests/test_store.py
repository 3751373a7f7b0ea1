"""Tests for StateManager: ids, reference counts, pinning, the LRU spill budget, threads."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from arcfab_gym.errors import (
    ArcFabricError,
    BudgetError,
    RefcountError,
    SnapshotFormatError,
    StateMismatchError,
    StoreClosedError,
    UnknownCheckpointError,
)
from arcfab_gym.fabric import snapshot as snapshot_mod
from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.fabric.store import StateManager
from arcfab_gym.models.base import ModelState, StepOutput, WorldModel

PAYLOAD = 256  # float32 elements per snapshot -> 1 KiB of tensor data


class TinyModel(WorldModel):
    """Test-only backend: a counter, a torch.Generator and a random payload."""

    name = "tiny"
    prompts = ("go left", "go right")

    def __init__(self, payload: int = PAYLOAD) -> None:
        self._payload = payload
        self._gen = torch.Generator()
        self._count = 0
        self._trace = torch.zeros(payload)
        self._prompt = "go left"
        self._seed = 0

    def start(self, prompt, seed, initial_state=None):
        self._prompt = self.check_prompt(prompt)
        self.set_seed(seed)
        self._count = 0
        self._trace = torch.rand(self._payload, generator=self._gen)
        return self.observe(), {}

    def step(self, action):
        a = self.check_action(action)
        self._count += 1
        self._trace = self._trace + float(a[0]) + torch.rand(self._payload, generator=self._gen)
        return StepOutput(self.observe(), float(self._trace[0]), False, {})

    def extract_state(self):
        return ModelState(
            {"trace": self._trace.clone(), "rng/torch": self._gen.get_state()},
            {"count": self._count, "prompt": self._prompt, "seed": self._seed},
        )

    def load_state(self, state, *, include_rng=True):
        self._trace = state.tensors["trace"].clone()
        if include_rng:
            self._gen.set_state(state.tensors["rng/torch"].clone())
        self._count = state.meta["count"]
        self._prompt = state.meta["prompt"]
        self._seed = state.meta["seed"]

    def set_prompt(self, prompt):
        self._prompt = self.check_prompt(prompt)

    def set_seed(self, seed):
        self._seed = seed
        self._gen.manual_seed(seed)

    @property
    def frame_count(self):
        return self._count + 1

    @property
    def prompt(self):
        return self._prompt

    @property
    def seed(self):
        return self._seed

    def observe(self):
        return {"trace": self._trace[:4].numpy().copy()}

    def decode_frame(self, frame_index):
        self.check_frame_index(frame_index)
        return np.zeros((2, 2, 3), dtype=np.uint8)

    def spawn(self):
        return TinyModel(self._payload)

    def config(self):
        return {"payload": self._payload}


class OtherModel(TinyModel):
    name = "other"


ZERO = np.zeros(2, dtype=np.float32)


def make_snap(i: int = 0, payload: int = PAYLOAD) -> WorldStateSnapshot:
    """A snapshot whose size does not depend on ``i`` (fixed created_at, same-width ints)."""
    g = torch.Generator().manual_seed(i)
    return WorldStateSnapshot(
        tensors={"trace": torch.rand(payload, generator=g), "i": torch.tensor(i)},
        meta={"i": i},
        backend="tiny",
        backend_config={},
        frame_index=i,
        prompt="go left",
        seed=i,
        created_at=1.0,
    )


# Every checkpoint below gets an id of the same width, so all sizes match this.
SIZE = (lambda s: (setattr(s, "checkpoint_id", "cp000001"), s.size_bytes())[1])(make_snap(0))


@pytest.fixture
def model() -> TinyModel:
    m = TinyModel()
    m.start("go left", seed=3)
    return m


@pytest.fixture
def store(tmp_path: Path):
    sm = StateManager(max_bytes=2 * SIZE + SIZE // 2, spill_dir=tmp_path / "spill")
    yield sm
    sm.close()


# --- ids and basic storage ------------------------------------------------------------
def test_ids_are_deterministic_per_manager() -> None:
    a, b = StateManager(), StateManager()
    assert [a.put(make_snap(i)) for i in range(3)] == ["cp000001", "cp000002", "cp000003"]
    assert [b.put(make_snap(i)) for i in range(3)] == ["cp000001", "cp000002", "cp000003"]
    assert a.ids() == ["cp000001", "cp000002", "cp000003"]
    assert StateManager._format_id(1_000_000) == "cp1000000"  # widens, never truncates
    a.close()
    b.close()


def test_put_sets_checkpoint_id_and_owns_snapshot() -> None:
    sm = StateManager()
    snap = make_snap(1)
    cid = sm.put(snap)
    assert snap.checkpoint_id == cid
    assert sm.get_snapshot(cid) is snap  # no copy
    assert cid in sm and len(sm) == 1 and sm.refcount(cid) == 1
    with pytest.raises(ValueError, match="already stored"):
        sm.put(snap)
    assert len(sm) == 1


def test_checkpoint_and_restore_resume_the_same_future(model: TinyModel) -> None:
    sm = StateManager(model)
    for _ in range(2):
        model.step(ZERO)
    cid = sm.checkpoint("sess-1", extra={"why": "test"})
    snap = sm.get_snapshot(cid)
    assert snap.session_id == "sess-1" and snap.frame_index == 2 and snap.backend == "tiny"
    assert snap.extra == {"why": "test"}
    future = [model.step(ZERO).reward for _ in range(3)]

    model.step(ZERO)  # wander off, then come back
    back = sm.restore(cid)
    assert back is snap and model.frame_count == 3
    assert [model.step(ZERO).reward for _ in range(3)] == future
    # The model did not alias the stored tensors: stepping left the snapshot unchanged.
    assert sm.get_snapshot(cid).equals(snap.copy())


def test_restore_without_rng_keeps_the_current_stream(model: TinyModel) -> None:
    sm = StateManager(model)
    cid = sm.checkpoint("s")
    with_rng = [model.step(ZERO).reward for _ in range(2)]
    sm.restore(cid, include_rng=False)
    assert [model.step(ZERO).reward for _ in range(2)] != with_rng


def test_restore_into_a_spawned_model_and_extract_state(model: TinyModel) -> None:
    sm = StateManager()
    snap = sm.extract_state(model, session_id="x")
    assert snap.checkpoint_id is None and len(sm) == 0 and snap.session_id == "x"
    cid = sm.checkpoint("x", model=model)
    other = model.spawn()
    sm.restore(cid, other)
    assert other.extract_state().tensors["trace"].equal(model.extract_state().tensors["trace"])


def test_prompt_text_is_recorded_only_when_it_differs(model: TinyModel) -> None:
    sm = StateManager(model)
    same = sm.checkpoint("s", "go left")
    assert "prompt_text" not in sm.get_snapshot(same).extra
    label = sm.checkpoint("s", "walk to the goal, please")
    assert sm.get_snapshot(label).extra["prompt_text"] == "walk to the goal, please"
    assert sm.get_snapshot(label).prompt == "go left"


def test_checkpoint_of_given_snapshot_fills_lineage() -> None:
    sm = StateManager()
    snap = make_snap(4)
    cid = sm.checkpoint("sess", snapshot=snap, parent_id="cp000000", rng_state={"s": 2**90})
    got = sm.get_snapshot(cid)
    assert got is snap and got.session_id == "sess" and got.parent_id == "cp000000"
    assert got.rng_state == {"s": 2**90}


def test_missing_model_and_backend_mismatch(model: TinyModel) -> None:
    sm = StateManager()
    with pytest.raises(TypeError, match="model="):
        sm.checkpoint("s")
    cid = sm.checkpoint("s", model=model)
    with pytest.raises(StateMismatchError) as info:
        sm.restore(cid, OtherModel())
    assert "'tiny'" in str(info.value) and "'other'" in str(info.value)


# --- unknown ids and reference counts ---------------------------------------------------
def test_unknown_and_freed_ids_have_helpful_errors() -> None:
    sm = StateManager()
    a = sm.put(make_snap(1))
    sm.put(make_snap(2))
    with pytest.raises(UnknownCheckpointError) as info:
        sm.get_snapshot("cp999999")
    msg = str(info.value)
    assert "'cp999999'" in msg and "holds 2 checkpoints" in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, ArcFabricError)

    sm.release(a)
    assert a not in sm
    with pytest.raises(UnknownCheckpointError, match="was released and freed") as info:
        sm.restore(a, TinyModel())
    assert "holds 1 checkpoint" in str(info.value)
    for op in (sm.retain, sm.release, sm.refcount, sm.pin, sm.unpin, sm.is_spilled, sm.delete):
        with pytest.raises(UnknownCheckpointError):
            op(a)


def test_retain_release_counts_and_frees() -> None:
    sm = StateManager()
    cid = sm.put(make_snap())
    assert sm.retain(cid) == 2 and sm.retain(cid) == 3
    assert sm.release(cid) == 2 and sm.release(cid) == 1
    assert cid in sm and sm.memory_bytes == SIZE
    assert sm.release(cid) == 0
    assert cid not in sm and len(sm) == 0 and sm.memory_bytes == 0


def test_pinned_checkpoint_outlives_its_references_until_unpinned() -> None:
    sm = StateManager()
    cid = sm.put(make_snap(), pin=True)
    assert sm.release(cid) == 0
    assert cid in sm and sm.is_pinned(cid)
    with pytest.raises(RefcountError, match="already 0"):
        sm.release(cid)
    sm.unpin(cid)
    assert cid not in sm and sm.memory_bytes == 0


def test_delete_needs_force_while_referenced(store: StateManager) -> None:
    cid = store.put(make_snap())
    with pytest.raises(RefcountError, match="force=True"):
        store.delete(cid)
    assert cid in store
    store.delete(cid, force=True)
    assert cid not in store and store.memory_bytes == 0
    pinned = store.put(make_snap(1), pin=True)
    store.release(pinned)
    store.delete(pinned)  # no references left: allowed although pinned
    assert len(store) == 0 and store.stats()["pinned"] == 0
    with pytest.raises(UnknownCheckpointError, match="released and freed"):
        store.get_snapshot(pinned)


# --- budget, LRU and spilling -----------------------------------------------------------
def test_max_bytes_validation(tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match="max_bytes"):
        StateManager(max_bytes=-1)
    with pytest.raises(TypeError):
        StateManager(max_bytes=1.5)  # type: ignore[arg-type]
    sm = StateManager(max_bytes=0, spill_dir=tmp_path)
    cid = sm.put(make_snap())
    assert sm.is_spilled(cid) and sm.memory_bytes == 0
    sm.close()


def test_spills_follow_lru_order(store: StateManager) -> None:
    a, b, c = (store.put(make_snap(i)) for i in range(3))
    assert [store.is_spilled(x) for x in (a, b, c)] == [True, False, False]
    store.get_snapshot(b)  # b becomes most recent: c is now the LRU
    d = store.put(make_snap(3))
    assert [store.is_spilled(x) for x in (a, b, c, d)] == [True, False, True, False]
    store.get_snapshot(a)  # load a; LRU among in-memory (b, d) is b
    assert [store.is_spilled(x) for x in (a, b, c, d)] == [False, True, True, False]
    assert store.memory_bytes == 2 * SIZE <= store.max_bytes
    s = store.stats()
    assert (s["count"], s["in_memory"], s["spilled"], s["spills"], s["loads"]) == (4, 2, 2, 3, 1)


def test_spill_and_reload_is_lossless(store: StateManager) -> None:
    originals = [make_snap(i) for i in range(5)]
    nan_bits = torch.tensor([0x7FC00001, -1], dtype=torch.int32)
    originals[0].tensors["nan"] = nan_bits.view(torch.float32)
    originals[0].rng_state = np.random.default_rng(1).bit_generator.state
    expected = [s.copy() for s in originals]
    ids = [store.put(s) for s in originals]
    assert store.is_spilled(ids[0])
    spill_file = store.spill_dir / f"{ids[0]}.safetensors"
    assert spill_file.is_file()
    assert store.disk_bytes == sum(
        (store.spill_dir / f"{i}.safetensors").stat().st_size for i in ids if store.is_spilled(i)
    )
    for cid, exp in zip(ids, expected):
        got = store.get_snapshot(cid)
        assert got.equals(exp)
        assert got.checkpoint_id == cid and got.created_at == exp.created_at
    # Reloading removed the spill file; the entry is in memory now.
    assert not store.is_spilled(ids[-1])
    assert store.memory_bytes <= store.max_bytes


def test_restore_from_a_spilled_checkpoint(tmp_path: Path, model: TinyModel) -> None:
    sm = StateManager(model, max_bytes=0, spill_dir=tmp_path)
    cid = sm.checkpoint("s")
    assert sm.is_spilled(cid)
    future = [model.step(ZERO).reward for _ in range(3)]
    sm.restore(cid)
    assert [model.step(ZERO).reward for _ in range(3)] == future
    sm.close()


def test_pinned_snapshots_never_spill(store: StateManager) -> None:
    pinned = store.put(make_snap(0), pin=True)
    others = [store.put(make_snap(i)) for i in range(1, 6)]
    for cid in others:
        store.get_snapshot(cid)
        assert not store.is_spilled(pinned)
        assert store.memory_bytes <= store.max_bytes
    # Pinning a spilled checkpoint loads it back and keeps it.
    assert store.is_spilled(others[0])
    store.pin(others[0])
    assert not store.is_spilled(others[0])
    for i in range(3):
        store.put(make_snap(10 + i))
    assert not store.is_spilled(others[0]) and not store.is_spilled(pinned)
    assert store.stats()["pinned"] == 2
    # Unpinned again, it is an ordinary spill candidate.
    store.unpin(others[0])
    store.put(make_snap(20))
    store.put(make_snap(21))
    assert store.is_spilled(others[0])


def test_budget_error_on_pins_leaves_store_unchanged(tmp_path: Path) -> None:
    sm = StateManager(max_bytes=SIZE + SIZE // 2, spill_dir=tmp_path)
    first = sm.put(make_snap(0), pin=True)
    plain = sm.put(make_snap(1))
    before = (sm.ids(), sm.stats(), sm.refcount(first), sm.is_spilled(plain))

    snap = make_snap(2)
    with pytest.raises(BudgetError) as info:
        sm.put(snap, pin=True)
    msg = str(info.value)
    assert str(sm.max_bytes) in msg and str(2 * SIZE) in msg
    assert "raise max_bytes" in msg and "unpin" in msg
    assert snap.checkpoint_id is None
    with pytest.raises(BudgetError, match="unpin"):
        sm.pin(plain)
    assert not sm.is_pinned(plain)
    assert (sm.ids(), sm.stats(), sm.refcount(first), sm.is_spilled(plain)) == before
    # The failed put consumed no id.
    assert sm.put(make_snap(3)) == "cp000003"
    sm.close()


def test_snapshot_larger_than_the_budget_is_spilled_not_refused(tmp_path: Path) -> None:
    sm = StateManager(max_bytes=SIZE // 2, spill_dir=tmp_path)
    expected = make_snap(7)
    cid = sm.put(expected.copy())
    assert sm.is_spilled(cid) and sm.memory_bytes == 0
    got = sm.get_snapshot(cid)
    assert got.equals(expected)  # the returned object is valid ...
    assert sm.is_spilled(cid) and sm.memory_bytes == 0  # ... and the budget still holds
    with pytest.raises(BudgetError):
        sm.pin(cid)
    assert sm.is_spilled(cid)
    sm.close()


def test_release_and_delete_remove_spill_files(store: StateManager) -> None:
    a, b = store.put(make_snap(0)), store.put(make_snap(1))
    store.put(make_snap(2))
    store.put(make_snap(3))
    spill = store.spill_dir
    assert store.is_spilled(a) and store.is_spilled(b)
    assert (spill / f"{a}.safetensors").exists()
    disk = store.disk_bytes
    store.release(a)
    assert not (spill / f"{a}.safetensors").exists()
    assert store.disk_bytes < disk
    store.delete(b, force=True)
    assert not (spill / f"{b}.safetensors").exists()
    assert store.disk_bytes == 0 and sorted(spill.iterdir()) == []


def test_corrupt_spill_file_raises_and_keeps_the_entry(store: StateManager) -> None:
    a = store.put(make_snap(0))
    for i in range(1, 3):
        store.put(make_snap(i))
    path = store.spill_dir / f"{a}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotFormatError, match="checksum"):
        store.get_snapshot(a)
    assert store.is_spilled(a) and a in store


def test_failed_spill_rolls_back_the_put(
    store: StateManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put(make_snap(0))
    store.put(make_snap(1))
    before = (store.ids(), store.stats())

    def broken_save(self, path):
        raise OSError("simulated: disk full")

    monkeypatch.setattr(snapshot_mod.WorldStateSnapshot, "save", broken_save)
    snap = make_snap(2)
    with pytest.raises(OSError, match="disk full"):
        store.put(snap)
    assert (store.ids(), store.stats()) == before
    assert snap.checkpoint_id is None
    assert list(store.spill_dir.glob("*")) == []  # no half-written spill files


# --- spill directory life cycle ---------------------------------------------------------
def test_default_spill_dir_is_lazy_and_removed_on_close() -> None:
    sm = StateManager(max_bytes=0)
    assert sm.spill_dir is None  # nothing spilled yet, nothing created
    sm.put(make_snap())
    spill = sm.spill_dir
    assert spill is not None and spill.is_dir() and spill.name.startswith("arcfab-spill-")
    sm.close()
    sm.close()  # idempotent
    assert not spill.exists()
    with pytest.raises(StoreClosedError):
        sm.put(make_snap())
    with pytest.raises(StoreClosedError):
        sm.get_snapshot("cp000001")


def test_default_spill_dir_is_removed_when_garbage_collected() -> None:
    sm = StateManager(max_bytes=0)
    sm.put(make_snap())
    spill = sm.spill_dir
    assert spill.is_dir()
    del sm
    gc.collect()
    assert not spill.exists()


def test_user_spill_dir_is_kept_but_our_files_are_removed(tmp_path: Path) -> None:
    spill = tmp_path / "mine"
    spill.mkdir()
    (spill / "keep.txt").write_text("not ours")
    with StateManager(max_bytes=0, spill_dir=spill) as sm:
        ids = [sm.put(make_snap(i)) for i in range(3)]
        assert sorted(p.name for p in spill.iterdir()) == sorted(
            [f"{i}.safetensors" for i in ids] + ["keep.txt"]
        )
    assert spill.is_dir()
    assert [p.name for p in spill.iterdir()] == ["keep.txt"]


# --- threads ----------------------------------------------------------------------------
def test_thread_safety_smoke(tmp_path: Path) -> None:
    sm = StateManager(max_bytes=3 * SIZE, spill_dir=tmp_path)
    shared = sm.put(make_snap(999))
    shared_expected = make_snap(999)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            mine: list[tuple[str, WorldStateSnapshot]] = []
            for j in range(25):
                i = k * 1000 + j
                cid = sm.put(make_snap(i))
                mine.append((cid, make_snap(i)))
                sm.retain(shared)
                assert sm.get_snapshot(shared).equals(shared_expected)
                sm.release(shared)
                if j % 3 == 2:  # release the oldest of ours
                    old, exp = mine.pop(0)
                    assert sm.get_snapshot(old).equals(exp)
                    sm.release(old)
            for cid, exp in mine:
                assert sm.get_snapshot(cid).equals(exp)
                sm.release(cid)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sm.ids() == [shared] and sm.refcount(shared) == 1
    assert sm.stats()["spills"] > 0
    sm.release(shared)
    assert len(sm) == 0 and sm.memory_bytes == 0 and sm.disk_bytes == 0
    assert list(tmp_path.iterdir()) == []
    # 1 shared + 4 threads x 25 puts, each with a unique id.
    assert sm.put(make_snap()) == "cp000102"
    sm.close()


# --- unique-storage accounting ----------------------------------------------------------
BASE = 1024  # float32 elements of the shared tensor -> 4 KiB


def shared_snap(i: int, base: torch.Tensor, own: int = 16) -> WorldStateSnapshot:
    """A snapshot holding a reference to ``base`` (shared) and a small tensor of its own."""
    g = torch.Generator().manual_seed(1000 + i)
    return WorldStateSnapshot(
        tensors={"base": base, "own": torch.rand(own, generator=g)},
        meta={"i": i},
        backend="tiny",
        backend_config={},
        frame_index=i,
        prompt="go left",
        seed=i,
        created_at=1.0,
    )


def header(sm: StateManager, cid: str) -> int:
    return len(sm.get_snapshot(cid).header_json())


def test_shared_storage_is_counted_once() -> None:
    base = torch.rand(BASE)
    with StateManager() as sm:
        a = sm.put(shared_snap(0, base))
        b = sm.put(shared_snap(1, base))
        # a view of the same storage is the same storage
        c = sm.put(shared_snap(2, base[: BASE // 2]))
        heads = sum(header(sm, x) for x in (a, b, c))
        unique = 4 * BASE + 3 * 16 * 4
        assert sm.memory_bytes == unique + heads
        logical = sum(sm.get_snapshot(x).size_bytes() for x in (a, b, c))
        assert sm.logical_bytes == logical == 4 * (BASE + BASE + BASE // 2 + 3 * 16) + heads
        s = sm.stats()
        assert s["memory_bytes"] == sm.memory_bytes and s["logical_bytes"] == logical
        assert s["shared_bytes_saved"] == logical - sm.memory_bytes == 4 * (BASE + BASE // 2)
        assert s["unique_storages"] == 4


def test_checkpoints_of_a_sharing_model_count_the_shared_tensor_once() -> None:
    class SharingModel(TinyModel):
        def extract_state(self):  # references, not copies (like mini-dreamzero)
            st = super().extract_state()
            st.tensors["trace"] = self._trace
            return st

    m = SharingModel(payload=BASE)
    m.start("go left", seed=0)
    with StateManager(m) as sm:
        a = sm.checkpoint("s")
        b = sm.checkpoint("s")  # same trace tensor; rng state is a fresh tensor each time
        rng = m._gen.get_state().numel()
        assert sm.memory_bytes == 4 * BASE + 2 * rng + header(sm, a) + header(sm, b)
        m.step(ZERO)  # the model makes a new trace tensor; the stored one is untouched
        c = sm.checkpoint("s")
        assert sm.memory_bytes == 2 * 4 * BASE + 3 * rng + sum(header(sm, x) for x in (a, b, c))


def test_spilling_or_freeing_one_keeps_the_shared_bytes(tmp_path: Path) -> None:
    base = torch.rand(BASE)
    with StateManager(spill_dir=tmp_path) as sm:
        a = sm.put(shared_snap(0, base))
        b = sm.put(shared_snap(1, base))
        ha, hb = header(sm, a), header(sm, b)
        own = 16 * 4
        both = sm.memory_bytes
        assert both == 4 * BASE + 2 * own + ha + hb
        # Spill a: only its own tensor and header leave memory; b still holds base.
        sm._spill_one(a, sm._entries[a])
        assert sm.is_spilled(a)
        assert sm.memory_bytes == 4 * BASE + own + hb == sm.logical_bytes
        # Loading a back gives it fresh (unshared) tensors.
        got = sm.get_snapshot(a)
        assert got.equals(shared_snap(0, base)) and got.checkpoint_id == a
        assert sm.memory_bytes == 2 * 4 * BASE + 2 * own + ha + hb
        # Free b: a's reloaded copy remains.
        sm.release(b)
        assert sm.memory_bytes == 4 * BASE + own + ha
        sm.release(a)
        assert sm.memory_bytes == 0 and sm.logical_bytes == 0
        assert sm.stats()["unique_storages"] == 0 and sm.disk_bytes == 0


def test_freeing_all_sharers_returns_memory_to_zero() -> None:
    base = torch.rand(BASE)
    with StateManager() as sm:
        ids = [sm.put(shared_snap(i, base)) for i in range(5)]
        sm.pin(ids[0])
        for cid in ids[1:]:
            sm.release(cid)
            assert sm.memory_bytes >= 4 * BASE  # ids[0] still holds the base
        sm.release(ids[0])
        assert ids[0] in sm  # pinned
        sm.unpin(ids[0])
        assert len(sm) == 0 and sm.memory_bytes == 0 and sm.logical_bytes == 0
        assert sm.pinned_bytes == 0 and sm.stats()["shared_bytes_saved"] == 0


def test_budget_counts_unique_bytes(tmp_path: Path) -> None:
    base = torch.rand(BASE)
    probe = shared_snap(0, base)
    probe.checkpoint_id = "cp000001"
    one = probe.size_bytes()  # logical bytes of one snapshot
    extra = one - 4 * BASE  # its own tensor + header
    # Room for the base once plus ten snapshots' own bytes: ten sharers fit although
    # their logical size is ten times the budget's worth of base.
    budget = 4 * BASE + 10 * extra + extra // 2  # (i >= 10 has a 3-byte longer header)
    with StateManager(max_bytes=budget, spill_dir=tmp_path) as sm:
        ids = [sm.put(shared_snap(i, base)) for i in range(10)]
        assert not any(sm.is_spilled(x) for x in ids)
        assert sm.memory_bytes <= budget < sm.logical_bytes
        assert sm.stats()["spills"] == 0
        # An eleventh sharer needs only its own bytes: one LRU snapshot spills (frees
        # just its own bytes, the base stays with the others).
        ids.append(sm.put(shared_snap(10, base)))
        assert [sm.is_spilled(x) for x in ids] == [True] + [False] * 10
        assert sm.memory_bytes <= budget
        # A snapshot with a new big tensor: spilling sharers frees only their own bytes,
        # so the loop keeps spilling until the budget holds.
        big = sm.put(make_snap(99, payload=BASE // 2))
        spilled = [sm.is_spilled(x) for x in ids]
        assert sm.memory_bytes <= budget and not sm.is_spilled(big)
        n_spilled = sum(spilled)
        assert spilled == [True] * n_spilled + [False] * (len(ids) - n_spilled)  # LRU order
        # 2 KiB of new data, ~0.3 KiB freed per spilled sharer; the base stays.
        assert 4 <= n_spilled < len(ids)
        in_mem = [x for x in ids if not sm.is_spilled(x)]
        assert sm.memory_bytes == (
            4 * BASE  # the shared base, once
            + 2 * BASE + 8 + header(sm, big)  # big: its payload, its "i" and header
            + sum(16 * 4 + header(sm, x) for x in in_mem)
        )


def test_spilling_everything_that_shares_frees_the_storage(tmp_path: Path) -> None:
    base = torch.rand(BASE)
    with StateManager(max_bytes=4 * BASE, spill_dir=tmp_path) as sm:
        a = sm.put(shared_snap(0, base))  # base + own + header > budget: spilled itself
        assert sm.is_spilled(a) and sm.memory_bytes == 0
        sm.put(shared_snap(1, base))
        assert sm.memory_bytes == 0 and sm.stats()["unique_storages"] == 0


def test_pin_budget_counts_shared_storage_once(tmp_path: Path) -> None:
    base = torch.rand(BASE)
    probe = shared_snap(0, base)
    probe.checkpoint_id = "cp000001"
    one = probe.size_bytes()
    budget = one + (one - 4 * BASE) + 8  # two pinned sharers fit; logical would not
    with StateManager(max_bytes=budget, spill_dir=tmp_path) as sm:
        a = sm.put(shared_snap(0, base), pin=True)
        b = sm.put(shared_snap(1, base), pin=True)
        assert sm.pinned_bytes == sm.memory_bytes <= budget < sm.logical_bytes
        # A third pinned sharer would exceed it by its own bytes; a non-sharer by far.
        with pytest.raises(BudgetError, match="already pinned"):
            sm.put(shared_snap(2, base), pin=True)
        with pytest.raises(BudgetError):
            sm.put(make_snap(5, payload=BASE), pin=True)
        assert sm.ids() == [a, b]
        sm.unpin(a)
        assert sm.pinned_bytes == 4 * BASE + 16 * 4 + header(sm, b)  # b alone
        c = sm.put(shared_snap(2, base), pin=True)  # fits again ...
        assert sm.is_spilled(a)  # ... and pushes the now unpinned a out
        assert sm.memory_bytes == sm.pinned_bytes <= budget
        sm.release(a)
        assert sm.memory_bytes == sm.pinned_bytes and sm.ids() == [b, c]


def test_thread_safety_with_shared_storages(tmp_path: Path) -> None:
    bases = [torch.rand(BASE) for _ in range(3)]
    probe = shared_snap(0, bases[0])
    probe.checkpoint_id = "cp000001"
    sm = StateManager(max_bytes=2 * probe.size_bytes(), spill_dir=tmp_path)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            mine = []
            for j in range(20):
                i = k * 100 + j
                mine.append((sm.put(shared_snap(i, bases[j % 3])), i))
                assert sm.memory_bytes <= sm.max_bytes
                if j % 2:
                    cid, i_old = mine.pop(0)
                    assert sm.get_snapshot(cid).equals(shared_snap(i_old, bases[i_old % 100 % 3]))
                    sm.release(cid)
            for cid, _ in mine:
                sm.release(cid)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(sm) == 0 and sm.memory_bytes == 0 and sm.logical_bytes == 0
    assert sm.stats()["unique_storages"] == 0 and sm.disk_bytes == 0 and sm.stats()["spills"] > 0
    sm.close()
