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
