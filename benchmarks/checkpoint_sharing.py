"""Checkpoints that share their prefix vs full deep copies, for ``mini-dreamzero``.

``MiniDreamZero.extract_state`` hands out references to immutable per-frame KV-cache
blocks and latent chunks, and the StateManager counts each tensor storage once. This
measures, side by side in one run:

1. checkpoint and restore time at history 4, 16 and 64 frames: (a) this store
   (``StateManager.checkpoint(model=...)`` / ``restore``: references) vs (b) what the
   public Arc Fabric does, a ``copy.deepcopy`` of every state tensor on checkpoint and
   again on restore. With a window (``local_attn_size``) of 64 the cache really grows
   with the history; the model's default window is reported too. Measurements are
   interleaved in rounds (so load on this shared machine hits all alike); medians.
2. the bytes a 1,000-node search tree holds: built by random forking (restore a random
   node, step 1-3 frames with random actions, checkpoint as a child node of a
   ``TrajectoryTree`` on the store). Reports the store's unique ``memory_bytes``, the
   sum of full copies (``logical_bytes``), and the bytes of the distinct frames made
   (frames x (cache block + latent)); the target is memory within 1.5x of those. The
   tree is built with one denoising step per frame (``--tree-denoise-steps``): the
   bytes do not depend on it, the build time does.

Default run: ~30 s with tiny weights, ~50 s with full-size (d_model 128, 4 layers) ones
on a loaded 2-core machine; ``--quick`` (3 rounds, 200 nodes) takes a third of that.

    python benchmarks/checkpoint_sharing.py [--weights-dir DIR] [--quick]
        [--rounds 9] [--calls 10] [--nodes 1000] [--seed 0]

Without ``--weights-dir`` the weights shipped in the package are used. For development
with tiny random weights: ``python -c "from tests.conftest import make_tiny_weights as m;
m('/tmp/tiny')"`` then ``--weights-dir /tmp/tiny``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from arcfab_gym.fabric.store import StateManager
from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.models.base import ModelState
from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero
from arcfab_gym.tasks import pusht

HISTORIES = (4, 16, 64)
LARGE_WINDOW = 64


# --- 1. checkpoint / restore time --------------------------------------------------------
def _advance(model: MiniDreamZero, frames: int, rng: np.random.Generator) -> None:
    """Step ``model`` until it holds ``frames`` frames."""
    while model.frame_count < frames:
        model.step(rng.uniform(-1, 1, 2).astype(np.float32))


def deepcopy_checkpoint(model: MiniDreamZero) -> ModelState:
    """The public Arc Fabric's checkpoint: every tensor of the state deep-copied."""
    return copy.deepcopy(model.extract_state())


def deepcopy_restore(model: MiniDreamZero, saved: ModelState) -> None:
    """... and its restore: a deep copy back into the model."""
    model.load_state(copy.deepcopy(saved))


def state_bytes(model: MiniDreamZero) -> int:
    return sum(t.numel() * t.element_size() for t in model.extract_state().tensors.values())


def time_checkpoints(
    model: MiniDreamZero,
    histories: tuple[int, ...] = HISTORIES,
    rounds: int = 9,
    calls: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Median microseconds of one checkpoint and one restore, per method and history.

    Returns ``{"store": {h: {"checkpoint": us, "restore": us}}, "deepcopy": {...},
    "state_bytes": {h: bytes}}``. Every round measures every (history, method) pair once
    (``calls`` checkpoints, then ``calls`` restores of them), in a shuffled order; the
    median is over all ``rounds * calls`` single calls.
    """
    rng = np.random.default_rng(seed)
    model.start(pusht.DEFAULT_PROMPT, seed=seed)
    bases: dict[int, ModelState] = {}  # the model at each history (references)
    sizes: dict[int, int] = {}
    for h in sorted(histories):
        _advance(model, h, rng)
        bases[h] = model.extract_state()
        sizes[h] = state_bytes(model)
    samples: dict[str, dict[int, dict[str, list[float]]]] = {
        m: {h: {"checkpoint": [], "restore": []} for h in histories}
        for m in ("store", "deepcopy")
    }
    order = random.Random(seed)
    with StateManager() as sm:
        for _ in range(rounds):
            pairs = [(h, m) for h in histories for m in ("store", "deepcopy")]
            order.shuffle(pairs)
            for h, method in pairs:
                model.load_state(bases[h])
                ck, rs = samples[method][h]["checkpoint"], samples[method][h]["restore"]
                # Each call is timed alone: a call is far shorter than a scheduler time
                # slice, so on a loaded machine most calls run uninterrupted and the median
                # ignores the ones that were not (timing a batch would charge preemptions
                # to the slow methods more often than to the fast ones).
                if method == "store":
                    ids = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        ids.append(sm.checkpoint("bench", model=model))
                        ck.append(time.perf_counter() - t0)
                    for cid in ids:
                        t0 = time.perf_counter()
                        sm.restore(cid, model=model)
                        rs.append(time.perf_counter() - t0)
                    for cid in ids:
                        sm.release(cid)
                else:
                    saved = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        saved.append(deepcopy_checkpoint(model))
                        ck.append(time.perf_counter() - t0)
                    for state in saved:
                        t0 = time.perf_counter()
                        deepcopy_restore(model, state)
                        rs.append(time.perf_counter() - t0)
                    del saved
    out: dict[str, Any] = {
        m: {h: {op: statistics.median(v) * 1e6 for op, v in ops.items()} for h, ops in hs.items()}
        for m, hs in samples.items()
    }
    out["state_bytes"] = sizes
    return out


def print_timing(res: dict[str, Any], title: str) -> None:
    hs = sorted(res["state_bytes"])
    print(f"\n{title}")
    print(
        f"{'history':>7} {'state KiB':>10} | {'store ck':>9} {'restore':>9} | "
        f"{'deepcopy ck':>11} {'restore':>9} | {'ck deep/store':>13} {'rs deep/store':>13}"
    )
    for h in hs:
        st, dc = res["store"][h], res["deepcopy"][h]
        print(
            f"{h:>7} {res['state_bytes'][h] / 1024:>10.1f} | {st['checkpoint']:>9.1f} "
            f"{st['restore']:>9.1f} | {dc['checkpoint']:>11.1f} {dc['restore']:>9.1f} | "
            f"{dc['checkpoint'] / st['checkpoint']:>12.1f}x {dc['restore'] / st['restore']:>12.1f}x"
        )
    lo, hi = hs[0], hs[-1]
    for method in ("store", "deepcopy"):
        ck = res[method][hi]["checkpoint"] / res[method][lo]["checkpoint"]
        rs = res[method][hi]["restore"] / res[method][lo]["restore"]
        print(f"  {method:<8} history {hi}/{lo}: checkpoint {ck:.2f}x, restore {rs:.2f}x")


# --- 2. memory of a search tree ----------------------------------------------------------
@dataclass
class TreeMemory:
    nodes: int
    frames: int  # distinct frames created (the root's first frame + every step)
    frame_bytes: int  # one cache block + one latent
    memory_bytes: int  # the store's unique bytes
    logical_bytes: int  # sum over nodes of all their tensor bytes + headers
    header_bytes: int  # sum of the snapshots' JSON headers
    by_kind: dict[str, int]  # unique tensor bytes per kind of tensor
    max_depth_frames: int
    seconds: float

    @property
    def unique_frame_bytes(self) -> int:
        return self.frames * self.frame_bytes


def _kind(name: str) -> str:
    if name.startswith("kv_cache/"):
        return "kv_cache"
    if name.startswith("latent_video/"):
        return "latent_video"
    return "other"  # rng_state, frame_info, proposal, ys, clip_feas, language_ids


def build_tree(
    model: MiniDreamZero, nodes: int = 1000, seed: int = 0, max_steps: int = 3
) -> TreeMemory:
    """Random forking until the tree (on a fresh store) has ``nodes`` checkpoints."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    model.start(pusht.DEFAULT_PROMPT, seed=seed)
    frames = 1
    with StateManager(model) as sm:
        tree = TrajectoryTree(sm)
        root = sm.checkpoint("tree")
        tree.add_node(root, "tree", model.frame_count - 1)
        sm.release(root)  # the tree's reference keeps it
        ids = [root]
        while len(ids) < nodes:
            parent = ids[int(rng.integers(len(ids)))]
            sm.restore(parent)
            k = int(rng.integers(1, max_steps + 1))
            for _ in range(k):
                model.step(rng.uniform(-1, 1, 2).astype(np.float32))
            frames += k
            cid = sm.checkpoint("tree", parent_id=parent)
            tree.add_node(cid, "tree", model.frame_count - 1, parent)
            sm.release(cid)
            ids.append(cid)
        # Break the unique bytes down by kind of tensor (same keying as the store).
        seen: set[tuple[str, int]] = set()
        by_kind = {"kv_cache": 0, "latent_video": 0, "other": 0}
        headers = 0
        depth = 0
        for cid in ids:
            snap = sm.get_snapshot(cid)
            headers += len(snap.header_json())
            depth = max(depth, snap.frame_index + 1)
            for name, t in snap.tensors.items():
                st = t.untyped_storage()
                key = (str(st.device), st.data_ptr())
                if key not in seen:
                    seen.add(key)
                    by_kind[_kind(name)] += st.nbytes()
        snap = sm.get_snapshot(ids[-1])
        block = next(t for n, t in snap.tensors.items() if n.startswith("kv_cache/"))
        latent = model.latent(0)
        frame_bytes = block.nbytes + latent.numel() * latent.element_size()
        result = TreeMemory(
            nodes=len(ids),
            frames=frames,
            frame_bytes=frame_bytes,
            memory_bytes=sm.memory_bytes,
            logical_bytes=sm.logical_bytes,
            header_bytes=headers,
            by_kind=by_kind,
            max_depth_frames=depth,
            seconds=time.perf_counter() - t0,
        )
        assert sum(by_kind.values()) + headers == sm.memory_bytes, "accounting mismatch"
        tree.clear()
    return result


def print_tree(r: TreeMemory, window: int) -> None:
    mib = 2**20
    uf = r.unique_frame_bytes
    print(
        f"\nsearch tree: {r.nodes} nodes, {r.frames} distinct frames, deepest {r.max_depth_frames}"
        f" frames, window {window} ({r.seconds:.0f} s to build)"
    )
    print(f"  store memory_bytes (unique)      {r.memory_bytes / mib:10.2f} MiB")
    print(
        f"  full copies (logical_bytes)      {r.logical_bytes / mib:10.2f} MiB  "
        f"= {r.logical_bytes / r.memory_bytes:.1f}x the store"
    )
    print(
        f"  unique frames x {r.frame_bytes} B          {uf / mib:10.2f} MiB  "
        f"memory / unique frames = {r.memory_bytes / uf:.2f}x (target <= 1.5x)"
    )
    print(
        "  memory by kind: "
        + ", ".join(f"{k} {v / mib:.2f} MiB" for k, v in r.by_kind.items())
        + f", headers {r.header_bytes / mib:.2f} MiB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights-dir", default=None, help="default: the shipped weights")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=10, help="calls per measurement")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument(
        "--tree-denoise-steps", type=int, default=1,
        help="flow-matching steps while building the tree (memory does not depend on it)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 rounds, 200 nodes")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.nodes = min(args.rounds, 3), min(args.nodes, 200)
    torch.set_num_threads(args.threads)

    big = MiniDreamZero(weights_dir=args.weights_dir, local_attn_size=LARGE_WINDOW)
    default = MiniDreamZero(weights_dir=args.weights_dir, _weights=big.weights)
    print(
        f"mini-dreamzero ({big.weights.source}, weights {big.weights.meta.get('weights_id')!r});"
        f" {args.rounds} rounds x {args.calls} calls, median us of one call"
    )
    for model in (big, default):
        res = time_checkpoints(model, rounds=args.rounds, calls=args.calls, seed=args.seed)
        print_timing(res, f"local_attn_size={model.local_attn_size}")

    tree_model = MiniDreamZero(
        weights_dir=args.weights_dir, local_attn_size=LARGE_WINDOW,
        num_denoise_steps=args.tree_denoise_steps, _weights=big.weights,
    )  # fmt: skip
    r = build_tree(tree_model, nodes=args.nodes, seed=args.seed)
    print_tree(r, tree_model.local_attn_size)
    for m in (big, default, tree_model):
        m.close()


if __name__ == "__main__":
    main()
