"""Checkpoints of mini-dreamzero share their prefix: small-scale runs of
``benchmarks/checkpoint_sharing.py`` (tiny random weights, so no trained model needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from arcfab_gym.fabric.store import StateManager
from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero
from arcfab_gym.tasks import pusht

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoint_sharing.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("checkpoint_sharing_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tree_memory_is_close_to_the_unique_frames(bench, tiny_weights_dir, one_thread) -> None:
    model = MiniDreamZero(weights_dir=tiny_weights_dir, local_attn_size=64, num_denoise_steps=1)
    r = bench.build_tree(model, nodes=60, seed=0)
    assert r.nodes == 60 and r.frames > 60
    # Every frame's cache block is held exactly once, however many nodes share it.
    block_bytes = r.frame_bytes - model.latent(0).numel() * 4
    assert r.by_kind["kv_cache"] == r.frames * block_bytes
    assert r.memory_bytes <= 1.5 * r.unique_frame_bytes + r.header_bytes
    # Full copies would hold every node's whole history: several times more.
    assert r.logical_bytes > 2 * r.memory_bytes


def test_a_checkpoint_adds_only_the_new_frames_bytes(tiny_weights_dir, one_thread) -> None:
    """Deterministic counterpart of the timing test: a checkpoint one frame after another
    adds about one frame's bytes to the store, not the history's."""
    model = MiniDreamZero(weights_dir=tiny_weights_dir, local_attn_size=64, num_denoise_steps=1)
    model.start(pusht.DEFAULT_PROMPT, seed=0)
    for _ in range(63):
        model.step(np.zeros(2, np.float32))
    with StateManager(model) as sm:
        sm.checkpoint("s")
        before = sm.memory_bytes
        history = sm.logical_bytes
        model.step(np.zeros(2, np.float32))
        sm.checkpoint("s")
        added = sm.memory_bytes - before
    frame = model.extract_state().tensors
    block = next(t for k, t in frame.items() if k.startswith("kv_cache/")).nbytes
    # one block + the copied partial latent chunk (< 8 latents) + per-node small tensors
    assert added < block + 8 * model.latent(0).nbytes + 16 * 1024
    assert added < history / 10


def test_checkpoint_time_does_not_grow_with_the_history_bytes(
    bench, tiny_weights_dir, one_thread
) -> None:
    model = MiniDreamZero(weights_dir=tiny_weights_dir, local_attn_size=64, num_denoise_steps=1)
    res = bench.time_checkpoints(model, histories=(4, 64), rounds=7, calls=10)
    store, deep = res["store"], res["deepcopy"]
    growth = store[64]["checkpoint"] / store[4]["checkpoint"]
    # History 64 holds 16x the frames (~14x the bytes) of history 4; a copying checkpoint
    # grows with them. The store's checkpoint still walks the tensor dict (one entry per
    # frame block), so it is not constant, but it stays far below linear ...
    assert growth < 6, res
    # ... and far below the deep copy at the long history.
    assert store[64]["checkpoint"] * 3 < deep[64]["checkpoint"], res
