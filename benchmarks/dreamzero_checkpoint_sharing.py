"""Checkpoints that share their prefix vs full deep copies, for the ``dreamzero`` backend.

DreamZero's head rebuilds its KV caches by concatenation on every call; the backend keeps
them as one tensor per frame block that is never written again, and ``extract_state``
hands out references, so a checkpoint costs one new frame block. This script measures it
on DreamZero's own classes at the tiny CPU size and computes what it means at 14B:

1. checkpoint / restore time and bytes at 1..4 frame blocks in the window (the whole
   window of the DROID config: ``max_chunk_size`` 4 blocks, then DreamZero resets): the
   StateManager (references) vs a ``copy.deepcopy`` of the state (the public Arc Fabric
   layer's checkpoint) -- medians of single calls, interleaved rounds;
2. a 1,000-node search tree built by random forking (restore a random node, step one
   block -- an MCTS expansion -- or 1-3 blocks, checkpoint as a child): the store's unique
   ``memory_bytes`` vs the sum of full copies (``logical_bytes``);
   Both with ``kv_storage="blocks"`` (the cache in the snapshot, one shared tensor per
   block) and ``"recompute"`` (no cache bytes: a restore re-runs DreamZero's cache-writing
   pass per block, timed here against one model call);
3. the same at the **full 14B config's shapes** (40 layers x 40 heads x 128, 880 tokens per
   latent frame, bf16), computed from the block layout measured in 1 and the tree shape of
   2: bytes of one checkpoint and of the 1,000-node tree, ours vs a full deep copy that
   also copies the cross-attention caches (the public layer copies them; they are dead).

    python benchmarks/dreamzero_checkpoint_sharing.py [--quick] [--nodes 1000] [--rounds 7]

Needs the ``dreamzero`` extra and DreamZero's source (see the README). ~9 minutes on a
loaded 2-core machine (four 1,000-node trees); ``--quick`` (3 rounds, 200 nodes) ~1 min.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from typing import Any

import numpy as np
import torch

from arcfab_gym.fabric.store import StateManager
from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.models.dreamzero.backend import DreamZero
from arcfab_gym.models.dreamzero.tiny import FULL_14B

GB = 1e9


def _act(model: DreamZero, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1, 1, model.action_dim).astype(np.float32)


def unique_new_bytes(state, parent) -> int:
    """Bytes of ``state``'s tensor storages that ``parent`` does not hold."""
    have = {t.untyped_storage().data_ptr() for t in parent.tensors.values()}
    return sum(t.untyped_storage().nbytes() for t in state.tensors.values()
               if t.untyped_storage().data_ptr() not in have)  # fmt: skip


# --- 1. one checkpoint -----------------------------------------------------------------------
def time_checkpoints(model: DreamZero, rounds: int, calls: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    model.start(model.prompts[0], seed=seed)
    bases, sizes, new = {1: model.extract_state()}, {}, {}
    for blocks in range(2, 5):
        prev = model.extract_state()
        model.step(_act(model, rng))
        bases[blocks] = model.extract_state()
        new[blocks] = unique_new_bytes(bases[blocks], prev)
    for b, s in bases.items():
        sizes[b] = s.nbytes()
    samples = {
        m: {b: {"checkpoint": [], "restore": []} for b in bases} for m in ("store", "deepcopy")
    }
    order = random.Random(seed)
    with StateManager() as sm:
        for _ in range(rounds):
            pairs = [(b, m) for b in bases for m in samples]
            order.shuffle(pairs)
            for b, method in pairs:
                model.load_state(bases[b])
                ck, rs = samples[method][b]["checkpoint"], samples[method][b]["restore"]
                if method == "store":
                    ids = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        ids.append(sm.checkpoint("bench", model=model))
                        ck.append(time.perf_counter() - t0)
                    for cid in ids:
                        t0 = time.perf_counter()
                        sm.restore(cid, model=model)
                        model._install(model._w)  # the restore is complete once the head has it
                        rs.append(time.perf_counter() - t0)
                        sm.release(cid)
                else:
                    saved = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        saved.append(copy.deepcopy(model.extract_state()))
                        ck.append(time.perf_counter() - t0)
                    for st in saved:
                        t0 = time.perf_counter()
                        model.load_state(copy.deepcopy(st))
                        model._install(model._w)
                        rs.append(time.perf_counter() - t0)
    med = {m: {b: {op: statistics.median(v) * 1e6 for op, v in ops.items()} for b, ops in bs.items()}
           for m, bs in samples.items()}  # fmt: skip
    step = []
    for _ in range(rounds):
        model.load_state(bases[4 if 4 in bases else max(bases)])
        model._install(model._w)  # a restore's rebuild is timed above, not here
        t0 = time.perf_counter()
        model.step(_act(model, rng))
        step.append(time.perf_counter() - t0)
    return {
        "us": med,
        "state_bytes": sizes,
        "new_bytes": new,
        "step_us": statistics.median(step) * 1e6,
    }


def print_timing(res: dict[str, Any]) -> None:
    print(f"{'blocks':>6} {'state KiB':>9} {'new KiB':>8} | {'store ck':>8} {'restore':>8} | "
          f"{'deep ck':>8} {'restore':>8} | {'ck deep/store':>13}")  # fmt: skip
    for b, size in res["state_bytes"].items():
        st, dc = res["us"]["store"][b], res["us"]["deepcopy"][b]
        new = res["new_bytes"].get(b, size)
        print(f"{b:>6} {size / 1024:>9.1f} {new / 1024:>8.1f} | {st['checkpoint']:>8.1f} "
              f"{st['restore']:>8.1f} | {dc['checkpoint']:>8.1f} {dc['restore']:>8.1f} | "
              f"{dc['checkpoint'] / st['checkpoint']:>12.1f}x")  # fmt: skip
    print(
        f"  one model call (16 -> {res.get('steps', '?')} denoising steps): {res['step_us']:.0f} us"
    )


# --- 2. a search tree ------------------------------------------------------------------------
def build_tree(model: DreamZero, nodes: int, seed: int, max_steps: int = 3) -> dict[str, Any]:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    model.start(model.prompts[0], seed=seed)
    steps, fills, windows = 0, [], 1
    with StateManager(model) as sm:
        tree = TrajectoryTree(sm)
        root = sm.checkpoint("tree")
        tree.add_node(root, "tree", 0)
        sm.release(root)
        ids = [root]
        fills.append(1)
        while len(ids) < nodes:
            parent = ids[int(rng.integers(len(ids)))]
            sm.restore(parent)
            for _ in range(int(rng.integers(1, max_steps + 1))):
                out = model.step(_act(model, rng))
                steps += 1
                windows += out.info["reset"] is not None
            cid = sm.checkpoint("tree", parent_id=parent)
            w = model._w
            fills.append(len(w["kv1"]))  # frame blocks in the window at this node
            tree.add_node(cid, "tree", model.frame_count - 1, parent)
            sm.release(cid)
            ids.append(cid)
        res = {"nodes": len(ids), "steps": steps, "windows": windows, "fills": fills,
               "memory_bytes": sm.memory_bytes, "logical_bytes": sm.logical_bytes,
               "seconds": time.perf_counter() - t0}  # fmt: skip
        tree.clear()
    return res


# --- 3. the 14B shapes ---------------------------------------------------------------------
def full_config_bytes(c: dict[str, Any] = FULL_14B) -> dict[str, int]:
    """Bytes of each piece of DreamZero's state at the full config (bf16 unless noted)."""
    b = c["dtype_bytes"]
    hd = c["dim"] // c["num_heads"]
    per_frame_branch = c["num_layers"] * 2 * c["frame_seqlen"] * c["num_heads"] * hd * b
    return {
        "kv_per_latent_frame_per_branch": per_frame_branch,
        # One frame block: num_frame_per_block latent frames, both CFG branches.
        "kv_block": 2 * c["num_frame_per_block"] * per_frame_branch,
        "kv_first_frame": 2 * per_frame_branch,
        "crossattn_both": 2 * c["num_layers"] * 2 * c["text_len"] * c["num_heads"] * hd * b,
        "latent_block": c["latent_channels"] * c["num_frame_per_block"] * c["latent_h"] * c["latent_w"] * b,
        "clip_feas": c["clip_tokens"] * c["clip_dim"] * b,
        "ys": 20 * (1 + (c["num_frames"] - 1) // 4) * c["latent_h"] * c["latent_w"] * b,
        # What the public layer also copies: the encoded prompt of both branches (T5 4096).
        "prompt_embs": 2 * c["text_len"] * 4096 * b,
        "per_frame_records": c["action_horizon"] * c["action_dim"] * 4 * 2,
    }  # fmt: skip


def state_bytes_at(fill: int, frames: int, p: dict[str, int], *, deep: bool) -> int:
    """A whole state with ``fill`` frame blocks of cache in its window and ``frames``
    frames of latent history; ``deep`` adds what a full deep copy of the public layer holds
    on top (cross-attention caches, prompt embeddings)."""
    kv = p["kv_first_frame"] + (fill - 1) * p["kv_block"]
    out = (
        kv + frames * p["latent_block"] + p["clip_feas"] + p["ys"] + frames * p["per_frame_records"]
    )
    return out + (p["crossattn_both"] + p["prompt_embs"] if deep else 0)


def report_14b(tree: dict[str, Any], kv_storage: str = "blocks") -> dict[str, Any]:
    p = full_config_bytes()
    c = FULL_14B
    text_row = c["text_len"] * 8  # the int64 token ids each block was written under
    if kv_storage == "recompute":
        p = {**p, "kv_block": 0, "kv_first_frame": 0}
    one_new = p["kv_block"] + p["latent_block"] + p["per_frame_records"] + text_row
    full_window = c["max_chunk_size"]  # blocks held just before DreamZero resets
    deep_max = state_bytes_at(full_window, full_window, p, deep=True)
    # The tree: ours = every distinct frame block once + each window's first frame and
    # clip_feas / ys once; deep copy = every node's whole state.
    ours = (tree["steps"] * one_new
            + tree["windows"] * (p["kv_first_frame"] + p["clip_feas"] + p["ys"] + p["latent_block"]))  # fmt: skip
    full = full_config_bytes()
    deep = sum(state_bytes_at(f, f, full, deep=True) for f in tree["fills"])
    deep_max = state_bytes_at(full_window, full_window, full, deep=True)
    return {"kv_storage": kv_storage, "pieces": full, "checkpoint_ours": one_new, "checkpoint_deep_full_window": deep_max,
            "checkpoint_deep_mean": deep / len(tree["fills"]),
            "tree_nodes": tree["nodes"], "tree_ours": ours, "tree_deep": deep}  # fmt: skip


def print_14b(r: dict[str, Any]) -> None:
    p = r["pieces"]
    print("\nDreamZero 14B (DROID config: 40 layers, 40 heads x 128, 880 tokens/latent frame, "
          "2 latent frames/block, window 4 blocks + first frame, bf16)")  # fmt: skip
    print(
        f"  KV cache, one latent frame, one CFG branch   {p['kv_per_latent_frame_per_branch'] / GB:8.3f} GB"
    )
    print(
        f"  one frame block, both branches (kv_cache1 + kv_cache_neg) {p['kv_block'] / GB:8.3f} GB"
    )
    print(f"  cross-attention caches, both (dead: not stored) {p['crossattn_both'] / GB:8.3f} GB")
    what = (
        "one new block + latents + records"
        if r["kv_storage"] == "blocks"
        else "latents + records, no cache"
    )
    print(f"  one checkpoint, ours ({what}) {r['checkpoint_ours'] / GB:10.6f} GB")
    print(
        f"  one checkpoint, full deep copy at a full window          {r['checkpoint_deep_full_window'] / GB:8.3f} GB"
    )
    print(
        f"  one checkpoint, full deep copy, mean over the tree       {r['checkpoint_deep_mean'] / GB:8.3f} GB"
    )
    print(
        f"  {r['tree_nodes']}-node tree, ours ({r['kv_storage']})  {r['tree_ours'] / GB:10.3f} GB"
    )
    print(f"  {r['tree_nodes']}-node tree, deep copy {r['tree_deep'] / GB:10.1f} GB "
          f"= {r['tree_deep'] / r['tree_ours']:.2f}x ours")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 200 nodes")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.nodes = min(args.rounds, 3), min(args.nodes, 200)
    torch.set_num_threads(args.threads)
    model = DreamZero(num_inference_steps=4)
    print(f"dreamzero, tiny CPU head ({model.num_layers} layers, dim {model.num_heads * model.head_dim}, "
          f"{model.frame_seqlen} tokens/latent frame); {args.rounds} rounds x {args.calls} calls, "
          "median us of one call")  # fmt: skip
    rmodel = DreamZero(num_inference_steps=4, kv_storage="recompute", _head=model.head)
    timing = {}
    for m in (model, rmodel):
        print(f"\nkv_storage={m.kv_storage!r}")
        timing[m.kv_storage] = time_checkpoints(m, args.rounds, args.calls, args.seed)
        timing[m.kv_storage]["steps"] = m.num_inference_steps
        print_timing(timing[m.kv_storage])
    trees, reports = {}, {}
    mib = 2**20
    for kv in ("blocks", "recompute"):
        tree_model = DreamZero(num_inference_steps=1, kv_storage=kv, _head=model.head)
        # one denoising step: the bytes do not depend on it, the build time does
        for max_steps in (1, 3):
            key = f"{kv}, 1-{max_steps} blocks per node"
            tree = trees[key] = build_tree(tree_model, args.nodes, args.seed, max_steps=max_steps)
            print(f"\nsearch tree (tiny, kv_storage={kv!r}), 1-{max_steps} blocks per node: "
                  f"{tree['nodes']} nodes, {tree['steps']} frame blocks made, {tree['windows']} "
                  f"windows ({tree['seconds']:.0f} s)")  # fmt: skip
            print(f"  store memory_bytes (unique) {tree['memory_bytes'] / mib:8.2f} MiB")
            print(f"  full copies (logical_bytes) {tree['logical_bytes'] / mib:8.2f} MiB "
                  f"= {tree['logical_bytes'] / tree['memory_bytes']:.2f}x")  # fmt: skip
            reports[key] = report_14b(tree, kv)
            print_14b(reports[key])
    if args.json:
        out = {"timing": timing,
               "trees": {m: {k: v for k, v in t.items() if k != "fills"} for m, t in trees.items()},
               "full_14b": reports}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
