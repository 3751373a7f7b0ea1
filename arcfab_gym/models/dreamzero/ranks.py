"""Snapshots and seeds across DreamZero's two-rank split (``ip_size=2``).

With two GPUs DreamZero runs the conditional CFG branch on rank 0 (``kv_cache1``) and the
negative branch on rank 1 (``kv_cache_neg``), swapping predictions every denoising step. A
snapshot of one rank alone is half a world (the public Arc Fabric layer snapshots rank 0
only), and a seed set on one rank alone makes the ranks denoise different noise. These
collectives keep both ranks together:

* :func:`gather_state` -- every rank calls it; all ranks first check that they hold the
  same world (frame, counters, seed, prompt, latents, action chunks); if any differs every
  rank raises :class:`RankMismatchError` and nothing is returned; else rank 0 receives
  rank 1's cache blocks and returns one whole state, laid out exactly as a single-process
  backend's (both caches), so it saves to one safetensors file and loads anywhere;
* :func:`scatter_state` -- every rank calls it; rank 0 checks the whole state before
  anyone loads (a state missing either cache is refused on every rank), then each rank
  loads its share: both ranks restored together, or neither;
* :func:`set_seed` -- every rank calls it; rank 0's seed is broadcast and set on both.

They use ``torch.distributed`` object collectives on the split's process group (gloo on a
CPU; on GPUs pass a CPU/gloo group, or the NCCL one: tensors are moved to the CPU first).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from arcfab_gym.errors import StateMismatchError
from arcfab_gym.models.base import ModelState

_SHARED_META = ("prompt", "seed", "current_start_frame", "window_start", "frames",
                "local_attn_size", "num_frame_per_block", "frame_seqlen", "weights")  # fmt: skip
_OWN_PREFIX = {0: "kv_cache1/", 1: "kv_cache_neg/"}


class RankMismatchError(StateMismatchError):
    """The two ranks do not hold the same world (or a state lacks one rank's share)."""


def _fingerprint(state: ModelState) -> dict[str, Any]:
    """What both ranks must agree on: the shared metadata and a hash of every tensor that
    is not one rank's own cache."""
    h = hashlib.sha256()
    for name in sorted(state.tensors):
        if name.startswith(tuple(_OWN_PREFIX.values())):
            continue
        t = state.tensors[name].contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    meta = {k: state.meta.get(k) for k in _SHARED_META}
    blocks = sum(n.startswith(_OWN_PREFIX[state.meta.get("rank", 0)]) for n in state.tensors)
    return {"meta": meta, "tensors": h.hexdigest(), "blocks": blocks}


def _check_split(model, group) -> None:
    if model.ranks != 2 or dist.get_world_size(group) != 2:
        raise ValueError("call model.parallelize(...) on both of two ranks first")


def gather_state(model, group=None) -> ModelState | None:
    """Both ranks' shares as one state on rank 0 (None on rank 1); collective."""
    _check_split(model, group)
    mine = model.extract_state()
    prints: list[Any] = [None, None]
    dist.all_gather_object(prints, _fingerprint(mine), group=group)
    if prints[0] != prints[1]:
        diff = {k: (prints[0][k], prints[1][k]) for k in prints[0] if prints[0][k] != prints[1][k]}
        raise RankMismatchError(f"the two ranks hold different worlds; nothing saved: {diff}")
    own = {n: t for n, t in mine.tensors.items() if n.startswith(_OWN_PREFIX[model.rank])}
    parts: list[Any] = [None, None]
    dist.all_gather_object(parts, own if model.rank == 1 else {}, group=group)
    if model.rank != 0:
        return None
    tensors = dict(mine.tensors)
    tensors.update(parts[1])
    meta = {k: v for k, v in mine.meta.items() if k not in ("rank", "ranks")}
    meta["gathered_from_ranks"] = 2
    return ModelState(tensors=tensors, meta=meta)


def scatter_state(model, state: ModelState | None, group=None, *, include_rng: bool = True) -> None:
    """Load ``state`` (given on rank 0; None elsewhere) on both ranks, or on neither;
    collective."""
    _check_split(model, group)
    verdict: list[Any] = [None]
    if model.rank == 0:
        problem = None
        if state is None:
            problem = "rank 0 was given no state"
        else:
            for r, prefix in _OWN_PREFIX.items():
                if not any(n.startswith(prefix) for n in state.tensors):
                    problem = f"the state has no {prefix.rstrip('/')} (rank {r}'s share)"
        verdict = [problem]
    dist.broadcast_object_list(verdict, src=0, group=group)
    if verdict[0] is not None:
        raise RankMismatchError(f"restore refused on both ranks: {verdict[0]}")
    payload: list[Any] = [None]
    if model.rank == 0:
        payload = [ModelState(
            tensors={n: t for n, t in state.tensors.items() if not n.startswith(_OWN_PREFIX[0])},
            meta=dict(state.meta))]  # fmt: skip
    dist.broadcast_object_list(payload, src=0, group=group)
    local = state if model.rank == 0 else payload[0]
    model.load_state(local, include_rng=include_rng)


def set_seed(model, seed: int | None, group=None) -> int:
    """Set rank 0's ``seed`` on both ranks (the value given on other ranks is ignored)."""
    _check_split(model, group)
    box = [int(seed) if model.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    model.set_seed(box[0])
    return box[0]
