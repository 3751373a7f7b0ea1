"""DreamZero's two-rank split (``ip_size=2``) run for real on two CPU processes (gloo):
a snapshot and a seed cover both ranks, saved and restored together or not at all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from arcfab_gym import WorldStateSnapshot
from arcfab_gym.models.dreamzero import runtime

_WHY = runtime.availability()
if _WHY is not None:  # skip on a developer's machine; fail in CI, which installs it (.ci/run)
    if runtime.required_here():
        pytest.fail(f"CI must run the dreamzero tests: {_WHY}", pytrace=False)
    pytest.skip(f"dreamzero backend unavailable: {_WHY}", allow_module_level=True)
WORKER = Path(__file__).with_name("dreamzero_rank_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(out: Path) -> list[tuple[int, str]]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in (0, 1)]  # fmt: skip
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-rank worker timed out")
    return [(p.returncode, log) for p, log in zip(procs, logs)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    results = _run_two_ranks(out)
    if any(code < 0 for code, _ in results):
        # Killed by a signal: once, on a loaded CI machine, gloo aborted in its C++
        # teardown after the work was done. Run the pair again once, and say so.
        warnings.warn(f"a rank died by signal {min(c for c, _ in results)}; ran both again")
        results = _run_two_ranks(out)
    for code, log in results:
        assert code == 0, log[-3000:]
    return out, json.loads((out / "rank0.json").read_text())


def single_process(steps: int):
    from arcfab_gym.models.dreamzero.backend import DreamZero

    torch.set_num_threads(1)
    m = DreamZero(num_inference_steps=4)
    acts = np.random.default_rng(0).uniform(-1, 1, size=(4, m.action_dim)).astype(np.float32)
    m.start(m.prompts[0], seed=0)
    for a in acts[:steps]:
        m.step(a)
    return m, acts


def test_the_gathered_state_is_the_single_process_state_bit_for_bit(two_ranks):
    out, _ = two_ranks
    snap = WorldStateSnapshot.load(out / "two_ranks.safetensors")
    m, _ = single_process(2)
    want = m.extract_state()
    assert any(k.startswith("kv_cache1/") for k in snap.tensors)
    assert any(k.startswith("kv_cache_neg/") for k in snap.tensors)
    assert snap.tensors.keys() == want.tensors.keys()
    for k, t in want.tensors.items():
        assert snap.tensors[k].numpy().tobytes() == t.numpy().tobytes(), k
    assert {k: v for k, v in snap.meta.items() if k != "gathered_from_ranks"} == want.meta


def test_both_ranks_restore_together_and_continue_exactly(two_ranks):
    out, r = two_ranks
    assert r["again"] == r["later"]  # scattered back to both ranks: the same future
    # ... which is also what one process makes from the same snapshot.
    m, acts = single_process(0)
    m.load_state(WorldStateSnapshot.load(out / "two_ranks.safetensors").model_state)
    assert [m.step(a).observation["action_chunk"].tolist() for a in acts[2:]] == r["later"]


def test_a_seed_covers_both_ranks_or_the_snapshot_is_refused(two_ranks):
    _, r = two_ranks
    assert "different worlds" in r["mismatch"] and "seed" in r["mismatch"]
    assert "kv_cache_neg (rank 1's share)" in r["refused"]
    assert r["seeds"] == [7, 7]
    assert r["seeded"] != r["later"]
