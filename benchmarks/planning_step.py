"""One iCEM planning call inside mini-dreamzero, with and without rendering the video of
its rollouts (``render=False``: the state token alone, what the MPC agent uses when its
objective reads only the state).

Both variants plan from the same state with the same seed, in interleaved rounds (this
machine is shared and noisy); medians and their ratio are printed, and the returns of the
two are checked to be identical.

    python benchmarks/planning_step.py [--rounds 5] [--samples 16] [--horizon 6] [--iterations 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from agents.objectives import pose_objective
from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero
from planners.icem import ICEMConfig, ICEMPlanner
from planners.world import sequence_evaluator


def plan_once(model, root, cfg: ICEMConfig, render: bool) -> tuple[float, float]:
    """Seconds and best return of one fresh iCEM call from ``root``."""
    planner = ICEMPlanner([-1.0, -1.0], [1.0, 1.0], cfg)
    evaluate = sequence_evaluator(model, root, objective=pose_objective, discount=0.9,
                                  render=render)  # fmt: skip
    t0 = time.perf_counter()
    res = planner.plan(evaluate, np.random.default_rng(0))
    seconds = time.perf_counter() - t0
    model.load_state(root)
    return seconds, float(evaluate(res.sequence[None])[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--horizon", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ICEMConfig(horizon=args.horizon, num_samples=args.samples, num_elites=4,
                     iterations=args.iterations)  # fmt: skip
    model = MiniDreamZero()
    model.start(model.prompts[0], seed=0)
    for a in np.random.default_rng(0).uniform(-0.5, 0.5, (6, 2)).astype(np.float32):
        model.step(a)
    root = model.extract_state()
    plan_once(model, root, cfg, render=False)  # warm up
    times: dict[bool, list[float]] = {True: [], False: []}
    returns: dict[bool, float] = {}
    for _ in range(args.rounds):
        for render in (True, False):
            seconds, ret = plan_once(model, root, cfg, render)
            times[render].append(seconds)
            returns[render] = ret
    full, state_only = statistics.median(times[True]), statistics.median(times[False])
    print(f"iCEM {args.samples}x{args.horizon}x{args.iterations} in mini-dreamzero, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds (medians)")
    print(f"rollouts rendered (video):     {full:8.3f} s per planning call")
    print(f"state token only (render=False): {state_only:6.3f} s per planning call  "
          f"= {full / state_only:.0f}x faster")
    print(f"same best return both ways: {returns[True] == returns[False]}")


if __name__ == "__main__":
    main()
