"""Tests for WorldStateSnapshot: bit-exact round trips, the checked file format, atomic saves."""

from __future__ import annotations

import json
import pickle
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arcfab_gym.errors import SnapshotFormatError
from arcfab_gym.fabric import snapshot as snapshot_mod
from arcfab_gym.fabric.snapshot import (
    FORMAT_NAME,
    SUPPORTED_FORMAT_VERSIONS,
    WorldStateSnapshot,
)
from arcfab_gym.models.base import ModelState, StepOutput, WorldModel


# --- helpers ---------------------------------------------------------------------------
def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert bits(a) == bits(b)


def make_snapshot(tensors: dict[str, torch.Tensor] | None = None, **kw: Any) -> WorldStateSnapshot:
    if tensors is None:
        tensors = {
            "frames/latent.0": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "rng": torch.arange(16, dtype=torch.uint8),
            "step": torch.tensor(5, dtype=torch.int64),
        }
    fields: dict[str, Any] = dict(
        meta={"frames": 6, "names": ["a", "b"]},
        backend="toy",
        backend_config={"size": 4},
        frame_index=5,
        prompt="push the block",
        seed=123,
        session_id="s1",
        parent_id="cp000001",
        rng_state=np.random.default_rng(2024).bit_generator.state,
        created_at=1700000000.25,
        extra={"note": "hello"},
    )
    fields.update(kw)
    return WorldStateSnapshot(tensors=tensors, **fields)


def with_nan_payloads(dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose bit patterns include NaNs with distinct payloads, -0.0 and infs."""
    patterns = {
        torch.float32: (torch.int32, [0x7FC00001, 0x7F800123, -0x00400001, -(2**31), 0x7F800000]),
        torch.float64: (
            torch.int64,
            [0x7FF8000000000123, 0x7FF0000000000001, -1, -(2**63), 0x3FF0000000000000],
        ),
        torch.bfloat16: (torch.int16, [0x7FC1, 0x7F81, -1, -32768, 0x3F80]),
        torch.float16: (torch.int16, [0x7E01, 0x7C01, -1, -32768, 0x3C00]),
    }
    int_dtype, values = patterns[dtype]
    return torch.tensor(values, dtype=int_dtype).view(dtype)


ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) if shape else 1
    if dtype == torch.bool:
        return (torch.rand(n, generator=g) > 0.5).reshape(shape)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 1e3).to(dtype).reshape(shape)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (n,), generator=g, dtype=dtype).reshape(shape)


class CounterModel(WorldModel):
    """Test-only backend: a frame counter and a torch.Generator."""

    name = "counter"
    prompts = ("left", "right")

    def __init__(self) -> None:
        self._gen = torch.Generator()
        self._count = torch.tensor(0, dtype=torch.int64)
        self._prompt = "left"
        self._seed = 0
        self._frames = 0

    def start(self, prompt, seed, initial_state=None):
        self._prompt = self.check_prompt(prompt)
        self.set_seed(seed)
        self._count = torch.tensor(0, dtype=torch.int64)
        self._frames = 1
        return self.observe(), {}

    def step(self, action):
        self.check_action(action)
        self._count = self._count + 1 + torch.randint(0, 3, (), generator=self._gen)
        self._frames += 1
        return StepOutput(self.observe(), 0.0, False, {})

    def extract_state(self):
        return ModelState(
            {"count": self._count.clone(), "rng/state": self._gen.get_state()},
            {"prompt": self._prompt, "seed": self._seed, "frames": self._frames},
        )

    def load_state(self, state, *, include_rng=True):
        self._count = state.tensors["count"].clone()
        if include_rng:
            self._gen.set_state(state.tensors["rng/state"].clone())
        self._prompt = state.meta["prompt"]
        self._seed = state.meta["seed"]
        self._frames = state.meta["frames"]

    def set_prompt(self, prompt):
        self._prompt = self.check_prompt(prompt)

    def set_seed(self, seed):
        self._seed = seed
        self._gen.manual_seed(seed)

    @property
    def frame_count(self):
        return self._frames

    @property
    def prompt(self):
        return self._prompt

    @property
    def seed(self):
        return self._seed

    def observe(self):
        return {"count": np.array([int(self._count)], dtype=np.int64)}

    def decode_frame(self, frame_index):
        self.check_frame_index(frame_index)
        return np.zeros((2, 2, 3), dtype=np.uint8)

    def spawn(self):
        return CounterModel()

    def config(self):
        return {"flavour": "plain"}


# --- round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly(dtype: torch.dtype, tmp_path: Path) -> None:
    tensors = {
        "matrix": sample_tensor(dtype, (3, 5), seed=1),
        "scalar": sample_tensor(dtype, (), seed=2),
        "empty": sample_tensor(dtype, (0, 4), seed=3),
    }
    if dtype.is_floating_point:
        tensors["nan/payloads"] = with_nan_payloads(dtype)
    snap = make_snapshot(tensors)
    for loaded in (
        WorldStateSnapshot.from_bytes(snap.to_bytes()),
        WorldStateSnapshot.load(snap.save(tmp_path / "s.safetensors")),
    ):
        assert loaded.tensors.keys() == tensors.keys()
        for name, t in tensors.items():
            assert_bit_identical(loaded.tensors[name], t)
        assert loaded.equals(snap)


def test_nan_payloads_survive_exactly() -> None:
    t = with_nan_payloads(torch.float32)
    loaded = WorldStateSnapshot.from_bytes(make_snapshot({"x": t}).to_bytes())
    got = loaded.tensors["x"].view(torch.int32).tolist()
    assert got == [0x7FC00001, 0x7F800123, -0x00400001, -(2**31), 0x7F800000]


def test_all_header_fields_round_trip(tmp_path: Path) -> None:
    snap = make_snapshot(checkpoint_id="cp000042")
    loaded = WorldStateSnapshot.load(snap.save(tmp_path / "a" / "b" / "snap.safetensors"))
    assert loaded.header_fields() == snap.header_fields()
    assert loaded.created_at == snap.created_at
    assert loaded.checkpoint_id == "cp000042"


def test_pcg64_rng_state_with_128_bit_ints_round_trips_and_resumes() -> None:
    gen = np.random.default_rng(7)
    gen.random(3)
    state = gen.bit_generator.state
    assert state["state"]["state"] > 2**64  # really a big int
    loaded = WorldStateSnapshot.from_bytes(make_snapshot(rng_state=state).to_bytes())
    assert loaded.rng_state == state
    resumed = np.random.default_rng()
    resumed.bit_generator.state = loaded.rng_state
    assert resumed.random(5).tolist() == gen.random(5).tolist()


def test_names_with_slashes_and_dots_zero_d_and_empty_tensors() -> None:
    tensors = {
        "a/b/c.d": torch.tensor(1.5),
        "x.y.z": torch.zeros(0),
        "nested/empty.2d": torch.zeros(3, 0, dtype=torch.int64),
        "/lead/and/trail/": torch.ones(2, 2),
    }
    loaded = WorldStateSnapshot.from_bytes(make_snapshot(tensors).to_bytes())
    assert loaded.tensors.keys() == tensors.keys()
    assert loaded.tensors["a/b/c.d"].shape == ()
    assert loaded.tensors["nested/empty.2d"].shape == (3, 0)
    assert loaded.equals(make_snapshot(tensors))


def test_empty_tensor_dict_round_trips(tmp_path: Path) -> None:
    snap = make_snapshot({})
    loaded = WorldStateSnapshot.load(snap.save(tmp_path / "empty.safetensors"))
    assert loaded.tensors == {}
    assert loaded.equals(snap)


def test_non_contiguous_and_storage_sharing_tensors_are_saved() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "strided": base[:, ::2], "whole": base, "row": base[1]}
    assert not tensors["t"].is_contiguous()
    loaded = WorldStateSnapshot.from_bytes(make_snapshot(tensors).to_bytes())
    for name, t in tensors.items():
        assert torch.equal(loaded.tensors[name], t)
        assert loaded.tensors[name].is_contiguous()
    # The loaded tensors are independent of each other and writable.
    loaded.tensors["whole"].add_(1)
    assert torch.equal(loaded.tensors["row"], base[1])


def test_loaded_tensors_are_writable_and_owned() -> None:
    data = make_snapshot().to_bytes()
    loaded = WorldStateSnapshot.from_bytes(data)
    loaded.tensors["frames/latent.0"].fill_(0)
    again = WorldStateSnapshot.from_bytes(data)
    assert again.tensors["frames/latent.0"].sum() == 66


def test_pickle_round_trip() -> None:
    snap = make_snapshot({"h": with_nan_payloads(torch.bfloat16), "k": torch.arange(3)})
    snap.checkpoint_id = "cp000009"
    back = pickle.loads(pickle.dumps(snap))
    assert back.equals(snap)
    assert back.header_fields() == snap.header_fields()


# --- model integration -------------------------------------------------------------------
def test_from_model_fills_fields_and_model_state_shares_tensors() -> None:
    model = CounterModel()
    model.start("right", seed=11)
    for _ in range(3):
        model.step(np.zeros(2, dtype=np.float32))
    snap = WorldStateSnapshot.from_model(
        model, session_id="sess", parent_id="cp000003", rng_state={"x": 2**100}, extra={"k": 1}
    )
    assert snap.backend == "counter"
    assert snap.backend_config == {"flavour": "plain"}
    assert snap.frame_index == 3  # frames 0..3 exist
    assert snap.prompt == "right" and snap.seed == 11
    assert snap.session_id == "sess" and snap.parent_id == "cp000003"
    assert snap.rng_state == {"x": 2**100} and snap.extra == {"k": 1}
    ms = snap.model_state
    assert ms.tensors is snap.tensors and ms.meta is snap.meta

    # Restoring the round-tripped state resumes the same future.
    loaded = WorldStateSnapshot.from_bytes(snap.to_bytes())
    expected = [model.step(np.zeros(2)).observation["count"][0] for _ in range(4)]
    other = CounterModel()
    other.load_state(loaded.model_state)
    assert [other.step(np.zeros(2)).observation["count"][0] for _ in range(4)] == expected


# --- size, copy, equals ------------------------------------------------------------------
def test_size_bytes_counts_tensor_bytes_exactly() -> None:
    tensors = {
        "a": torch.zeros(3, 5, dtype=torch.float64),
        "b": torch.zeros(7, dtype=torch.bfloat16),
        "c": torch.zeros((), dtype=torch.bool),
        "d": torch.zeros(0, 9),
    }
    snap = make_snapshot(tensors)
    assert snap.size_bytes() - len(snap.header_json()) == 3 * 5 * 8 + 7 * 2 + 1 + 0
    assert make_snapshot({}).size_bytes() == len(make_snapshot({}).header_json()) > 0


def test_copy_is_deep() -> None:
    snap = make_snapshot()
    dup = snap.copy()
    assert dup.equals(snap) and dup.header_fields() == snap.header_fields()
    dup.tensors["rng"][0] = 99
    dup.meta["names"].append("c")
    dup.rng_state["state"]["state"] += 1
    dup.extra["note"] = "changed"
    assert snap.tensors["rng"][0] == 0
    assert snap.meta["names"] == ["a", "b"]
    assert snap.extra["note"] == "hello"
    assert not dup.equals(snap)


def test_equals_ignores_identity_fields_only() -> None:
    a = make_snapshot()
    assert a.equals(make_snapshot(created_at=5.0, checkpoint_id="cp000777"))
    for change in (
        {"prompt": "other"},
        {"seed": 124},
        {"frame_index": 4},
        {"backend": "toy2"},
        {"backend_config": {"size": 5}},
        {"session_id": None},
        {"parent_id": "cp000002"},
        {"rng_state": None},
        {"extra": {}},
        {"meta": {"frames": 6}},
    ):
        assert not a.equals(make_snapshot(**change)), change
    assert not a.equals("not a snapshot")


def test_equals_is_bitwise_on_tensors() -> None:
    nan = with_nan_payloads(torch.float32)
    assert make_snapshot({"x": nan}).equals(make_snapshot({"x": nan.clone()}))
    other_nan = nan.clone()
    other_nan.view(torch.int32)[0] += 1  # still NaN, different payload
    assert torch.isnan(other_nan[0])
    assert not make_snapshot({"x": nan}).equals(make_snapshot({"x": other_nan}))
    zero, neg_zero = torch.tensor([0.0]), torch.tensor([-0.0])
    assert not make_snapshot({"x": zero}).equals(make_snapshot({"x": neg_zero}))
    # Same bytes, different dtype or shape: not equal.
    i = torch.arange(4, dtype=torch.int32)
    assert not make_snapshot({"x": i}).equals(make_snapshot({"x": i.view(torch.float32)}))
    assert not make_snapshot({"x": i}).equals(make_snapshot({"x": i.reshape(2, 2)}))
    assert not make_snapshot({"x": i}).equals(make_snapshot({"y": i}))
    assert not make_snapshot({"x": i}).equals(make_snapshot({"x": i, "y": i}))


def test_non_json_meta_is_rejected_naming_the_field(tmp_path: Path) -> None:
    target = tmp_path / "s.safetensors"
    make_snapshot().save(target)
    before = target.read_bytes()
    bad = make_snapshot(meta={"arr": np.zeros(2)})
    with pytest.raises(TypeError, match="meta"):
        bad.save(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_reserved_tensor_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="reserved"):
        make_snapshot({"__metadata__": torch.zeros(1)}).to_bytes()


# --- malformed input -----------------------------------------------------------------------
@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    return make_snapshot().save(tmp_path / "good.safetensors")


def header_span(data: bytes) -> tuple[int, int]:
    (n,) = struct.unpack_from("<Q", data)
    return 8, 8 + n


def load_error(path: Path) -> str:
    with pytest.raises(SnapshotFormatError) as info:
        WorldStateSnapshot.load(path)
    msg = str(info.value)
    assert str(path) in msg
    return msg


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WorldStateSnapshot.load(tmp_path / "nope.safetensors")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    assert "empty" in load_error(p)


def test_random_bytes_file(tmp_path: Path) -> None:
    rng = random.Random(0)
    for n in (3, 64, 4096):
        p = tmp_path / f"random{n}.bin"
        p.write_bytes(bytes(rng.randrange(256) for _ in range(n)))
        msg = load_error(p)
        assert "truncated" in msg or "not a safetensors file" in msg


def test_truncated_file_at_several_offsets(good_file: Path, tmp_path: Path) -> None:
    data = good_file.read_bytes()
    start, end = header_span(data)
    cuts = [1, 4, 7, 8, start + 10, (start + end) // 2, end - 1, end, end + 3, len(data) - 1]
    for cut in cuts:
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        assert "truncated" in load_error(p), cut


def test_flipped_byte_in_data_is_a_checksum_error(good_file: Path, tmp_path: Path) -> None:
    data = good_file.read_bytes()
    _, end = header_span(data)
    assert len(data) > end
    for pos in range(end, len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        p = tmp_path / "flip.safetensors"
        p.write_bytes(bytes(bad))
        assert "checksum mismatch" in load_error(p), pos


def test_flipped_byte_in_arcfab_header_is_a_checksum_error(good_file: Path, tmp_path: Path) -> None:
    data = good_file.read_bytes()
    pos = data.index(b"push the block")  # inside the arcfab.header JSON string
    bad = bytearray(data)
    bad[pos] ^= 0x01  # 'p' -> 'q': still valid JSON, different header
    p = tmp_path / "flip.safetensors"
    p.write_bytes(bytes(bad))
    assert "checksum mismatch" in load_error(p)


@pytest.mark.parametrize("mask", [0x01, 0x20, 0xFF])
def test_no_single_byte_flip_anywhere_loads_silently(good_file: Path, mask: int) -> None:
    data = good_file.read_bytes()
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= mask
        with pytest.raises(SnapshotFormatError):
            WorldStateSnapshot.from_bytes(bytes(bad), source="flip")


def test_foreign_safetensors_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"weight": torch.ones(2, 2)}, str(plain))
    assert "not an arcfab-gym snapshot" in load_error(plain)
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.ones(1)}, str(other), metadata={"format": "pt"})
    assert "not an arcfab-gym snapshot" in load_error(other)
    renamed = tmp_path / "renamed.safetensors"
    safetensors.torch.save_file(
        {"w": torch.ones(1)}, str(renamed), metadata={"arcfab.format": "someone-else/v9"}
    )
    assert "another tool" in load_error(renamed)


def _rewrite_metadata(data: bytes, **changes: str) -> bytes:
    """Re-save a snapshot's tensors with edited metadata (keeps everything else)."""
    start, end = header_span(data)
    metadata = json.loads(data[start:end])["__metadata__"]
    metadata.update(changes)
    return safetensors.torch.save(safetensors.torch.load(data), metadata=metadata)


def test_wrong_format_version(good_file: Path, tmp_path: Path) -> None:
    p = tmp_path / "v99.safetensors"
    p.write_bytes(_rewrite_metadata(good_file.read_bytes(), **{"arcfab.format_version": "99"}))
    msg = load_error(p)
    assert "'99'" in msg and "not supported" in msg
    for v in SUPPORTED_FORMAT_VERSIONS:
        assert v in msg


def test_tampered_header_with_valid_json_is_a_checksum_error(
    good_file: Path, tmp_path: Path
) -> None:
    data = good_file.read_bytes()
    start, end = header_span(data)
    header = json.loads(json.loads(data[start:end])["__metadata__"]["arcfab.header"])
    header["seed"] = 999
    p = tmp_path / "tampered.safetensors"
    p.write_bytes(_rewrite_metadata(data, **{"arcfab.header": json.dumps(header)}))
    assert "checksum mismatch" in load_error(p)


def test_header_with_wrong_field_types_is_rejected(tmp_path: Path) -> None:
    # A consistent file (checksum recomputed) whose header breaks the schema.
    snap = make_snapshot()
    header = snap.header_fields()
    header["frame_index"] = "five"
    header_json = json.dumps(header, sort_keys=True)
    tensors = snap.tensors
    meta = {
        "arcfab.format": FORMAT_NAME,
        "arcfab.format_version": "1",
        "arcfab.header": header_json,
        "arcfab.sha256": snapshot_mod._checksum(header_json, tensors),
    }
    p = tmp_path / "schema.safetensors"
    p.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    msg = load_error(p)
    assert "frame_index" in msg


def test_not_safetensors_json_garbage(tmp_path: Path) -> None:
    p = tmp_path / "garbage.safetensors"
    body = b"not json at all!"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    assert "not a safetensors file" in load_error(p)


# --- atomic saves --------------------------------------------------------------------------
def test_failed_replace_leaves_old_file_and_no_temp_files(
    good_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = good_file.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(snapshot_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        make_snapshot(seed=1).save(good_file)
    assert good_file.read_bytes() == before
    assert [p.name for p in good_file.parent.iterdir()] == [good_file.name]


def test_failed_write_midway_leaves_old_file_and_no_temp_files(
    good_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = good_file.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError("simulated disk full")

    monkeypatch.setattr(snapshot_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        make_snapshot(seed=2).save(good_file)
    assert good_file.read_bytes() == before
    assert WorldStateSnapshot.load(good_file).equals(make_snapshot())
    assert [p.name for p in good_file.parent.iterdir()] == [good_file.name]


def test_save_overwrites_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "s.safetensors"
    assert make_snapshot(seed=1).save(str(target)) == target
    make_snapshot(seed=2).save(target)
    assert WorldStateSnapshot.load(target).seed == 2
    assert [p.name for p in target.parent.iterdir()] == ["s.safetensors"]


def test_file_has_no_pickle_and_is_plain_safetensors(good_file: Path) -> None:
    data = good_file.read_bytes()
    assert b"\x80\x04" not in data[:2]  # not a pickle stream
    tensors = safetensors.torch.load(data)  # readable by stock safetensors
    assert set(tensors) == {"frames/latent.0", "rng", "step"}
    meta = json.loads(data[8 : 8 + struct.unpack_from("<Q", data)[0]])["__metadata__"]
    assert meta["arcfab.format"] == FORMAT_NAME and meta["arcfab.format_version"] == "1"
    assert json.loads(meta["arcfab.header"])["prompt"] == "push the block"


# --- property test --------------------------------------------------------------------------
_DTYPE_STRATEGY = st.sampled_from(ALL_DTYPES)
_NAME_STRATEGY = st.text(alphabet="abcXYZ019/._-", min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__"
)
_JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**130), max_value=2**130)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda kids: st.lists(kids, max_size=3)
    | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=8,
)


@st.composite
def tensor_strategy(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(_DTYPE_STRATEGY)
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    n = int(np.prod(shape)) if shape else 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = bytearray(draw(st.binary(min_size=n * itemsize, max_size=n * itemsize)))
    if dtype == torch.bool:
        raw = bytearray(b & 1 for b in raw)  # only 0/1 are valid bools
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    # Arbitrary bit patterns: every NaN payload, denormal and -0.0 gets exercised.
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=st.dictionaries(_NAME_STRATEGY, tensor_strategy(), max_size=5),
    meta=st.dictionaries(st.text(max_size=6), _JSON, max_size=4),
    seed=st.integers(min_value=-(2**70), max_value=2**70),
    prompt=st.text(max_size=20),
)
def test_property_random_snapshots_round_trip(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], seed: int, prompt: str
) -> None:
    snap = make_snapshot(tensors, meta=meta, seed=seed, prompt=prompt)
    loaded = WorldStateSnapshot.from_bytes(snap.to_bytes())
    assert loaded.equals(snap)
    assert loaded.header_fields() == snap.header_fields()
    for name, t in tensors.items():
        assert_bit_identical(loaded.tensors[name], t)
    assert snap.size_bytes() == sum(t.numel() * t.element_size() for t in tensors.values()) + len(
        snap.header_json()
    )
