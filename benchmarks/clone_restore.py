"""clone_state / restore_state cost relative to one env.step, measured side by side.

ALE clones in ~30-80 us against a ~570 us step; the target here is clone + restore under
25 % of a step. Rounds interleave the three measurements so that load on this shared
machine hits them alike; medians over rounds are reported.

    python benchmarks/clone_restore.py [--rounds 15] [--n 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np

import arcfab_gym  # noqa: F401
from agents.scripted import ScriptedPusher


def per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--env", default="ArcFabric-PushTSim-v0")
    args = ap.parse_args()

    env = gym.make(args.env)
    u = env.unwrapped
    obs, _ = env.reset(seed=0)
    policy = ScriptedPusher(np.random.default_rng(0), waypoint_prob=0.0)
    # The free state (no contact) and a state pushing the T (cached contacts: the largest).
    free = u.clone_state()
    contact, most = None, 0
    for _ in range(300):
        obs, *_, info = env.step(policy(obs))
        n = len(u.clone_state().tensors["physics/arbiters_f"])
        if n > most:
            contact, most = u.clone_state(), n
    if contact is None:
        raise SystemExit("the scripted pusher never touched the T; try another seed")
    actions = np.random.default_rng(1).uniform(-1, 1, (args.n, 2)).astype(np.float32)
    print(f"{args.env}: {args.rounds} rounds x {args.n} calls, medians; ratio = cost / env.step")
    for label, state in (("free", free), ("in contact", contact)):
        arbiters = len(state.tensors["physics/arbiters_f"])
        rows = {"env.step": [], "clone_state": [], "restore_state": [], "clone+restore": []}
        for _ in range(args.rounds):
            u.restore_state(state)
            t0 = time.perf_counter()
            for a in actions:
                u.step(a)
            step_us = (time.perf_counter() - t0) / args.n * 1e6
            u.restore_state(state)
            clone_us = per_call_us(u.clone_state, args.n)
            restore_us = per_call_us(lambda: u.restore_state(state), args.n)
            rows["env.step"].append(step_us)
            rows["clone_state"].append(clone_us)
            rows["restore_state"].append(restore_us)
            rows["clone+restore"].append(clone_us + restore_us)
        step = statistics.median(rows["env.step"])
        print(f"\nstate: {label} ({arbiters} cached contacts, frame {state.frame_index})")
        print(f"{'operation':<15} {'median us':>10} {'ratio':>8}")
        for name, vals in rows.items():
            med = statistics.median(vals)
            print(f"{name:<15} {med:>10.1f} {med / step:>8.1%}")
    env.close()


if __name__ == "__main__":
    main()
