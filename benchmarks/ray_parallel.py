"""The same CEM search in one process, on 1 Ray actor and on 2, and what one remote call costs.

One CEM planning call (``planners.cem`` over ``planners.parallel.WorkerPool``'s
``sequence_evaluator``) from the same root with the same seed: in this process
(``actors=0``), then with the sampled sequences split over 1 and 2 Ray actors (one torch
thread each) on a local Ray instance. Rounds interleave the three so that load on this
shared machine hits them alike; medians are reported, with the 1-actor / 2-actor ratio
measured in this one run. Then the overhead of one remote model call: the round trip of
the cheapest call (``frame_count``) and a remote ``step`` against a local one.

    python benchmarks/ray_parallel.py [--backend mini-dreamzero] [--samples 64] [--rounds 5]

Needs the ray extra (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from arcfab_gym.models import create_world_model
from arcfab_gym.models.remote import RemoteWorldModel, init_local_ray
from planners.cem import CEMConfig, CEMPlanner
from planners.parallel import WorkerPool


def plan_once(pool: WorkerPool, model, cfg: CEMConfig, seed: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    pool.set_root(model)
    res = CEMPlanner([-1.0, -1.0], [1.0, 1.0], cfg).plan(
        pool.sequence_evaluator(discount=0.9), np.random.default_rng(seed))
    return time.perf_counter() - t0, res.action


def call_overhead(backend: str, n: int) -> dict[str, float]:
    local = create_world_model(backend)
    remote = RemoteWorldModel(backend)
    for m in (local, remote):
        m.start(m.prompts[0], seed=0)
    action = np.zeros(2, np.float32)
    out = {}
    for name, fn in (("frame_count", lambda m: m.frame_count),
                     ("step", lambda m: m.step(action))):  # fmt: skip
        times = {}
        for label, m in (("local", local), ("remote", remote)):
            fn(m)
            t0 = time.perf_counter()
            for _ in range(n):
                fn(m)
            times[label] = (time.perf_counter() - t0) / n
        out[name] = times
    remote.close()
    local.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="mini-dreamzero")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--horizon", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the in-process reference uses one thread, as each actor does
    t0 = time.perf_counter()
    init_local_ray(num_cpus=2)
    print(f"ray.init (local, 2 CPUs): {time.perf_counter() - t0:.1f} s; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine)")
    model = create_world_model(args.backend)
    model.start(model.prompts[0], seed=0)
    for a in np.random.default_rng(0).uniform(-1, 1, (3, 2)):
        model.step(a)
    cfg = CEMConfig(horizon=args.horizon, num_samples=args.samples,
                    num_elites=max(1, args.samples // 8), iterations=args.iterations)
    print(f"CEM in {args.backend}: {args.samples} samples x horizon {args.horizon} x "
          f"{args.iterations} iterations = {args.samples * args.horizon * args.iterations} "
          "model steps per plan")
    t0 = time.perf_counter()
    pools = {0: WorkerPool(args.backend, actors=0)}
    for n in (1, 2):
        # 0.5 CPU each (a logical reservation: each actor runs one torch thread), so the
        # 1-actor and 2-actor pools fit the 2-CPU instance together and rounds interleave.
        pools[n] = WorkerPool(args.backend, actors=n, torch_threads=1, num_cpus=0.5)
    print(f"actors started: {time.perf_counter() - t0:.1f} s")
    times: dict[int, list[float]] = {k: [] for k in pools}
    actions = {}
    for k, pool in pools.items():  # warm-up (first calls import and allocate)
        _, actions[k] = plan_once(pool, model, cfg, seed=1)
    for r in range(args.rounds):
        for k, pool in pools.items():
            dt, act = plan_once(pool, model, cfg, seed=100 + r)
            times[k].append(dt)
    # Where the time goes: one evaluation of the whole batch and of half of it, in this
    # process (what each of 2 actors runs per iteration, minus the remote call).
    from planners.world import sequence_evaluator

    seqs = np.random.default_rng(5).uniform(-1, 1, (args.samples, args.horizon, 2))
    evaluate = sequence_evaluator(model, model.extract_state(), discount=0.9)
    batch_s = {}
    for n in (args.samples, args.samples // 2):
        evaluate(seqs[:n])
        t0 = time.perf_counter()
        for _ in range(3):
            evaluate(seqs[:n])
        batch_s[n] = (time.perf_counter() - t0) / 3
    same = all(np.array_equal(actions[0], a) for a in actions.values())
    med = {k: statistics.median(v) for k, v in times.items()}
    root_kb = pools[2].stats.root_bytes[-1] / 1024
    print(f"\n| workers | s per plan (median of {args.rounds}) | vs one process |")
    print("|---|---|---|")
    labels = {0: "one process", 1: "1 Ray actor", 2: "2 Ray actors"}
    for k in pools:
        print(f"| {labels[k]} | {med[k]:.3f} | {med[0] / med[k]:.2f}x |")
    print(f"\n1 actor / 2 actors: {med[1] / med[2]:.2f}x faster with 2 (same action from "
          f"every pool: {same}); root snapshot sent per plan call: {root_kb:.0f} KiB per actor")
    full, half = args.samples, args.samples // 2
    print(f"one evaluation in this process: {full} sequences {batch_s[full]:.3f} s, {half} "
          f"sequences {batch_s[half]:.3f} s (half the batch costs "
          f"{batch_s[half] / batch_s[full]:.0%} of the time: the best 2 actors can do is "
          f"{batch_s[full] / batch_s[half]:.2f}x)")
    print(f"load average now {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for pool in pools.values():
        pool.close()
    oh = call_overhead("pusht-sim", args.calls)
    print("\nper remote call (pusht-sim, mean of", args.calls, "calls):")
    for name, t in oh.items():
        print(f"  {name:<12} local {t['local'] * 1e3:7.3f} ms   remote {t['remote'] * 1e3:7.3f} ms"
              f"   overhead {(t['remote'] - t['local']) * 1e3:6.3f} ms")


if __name__ == "__main__":
    main()
