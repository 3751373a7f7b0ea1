"""The task's coverage for a batch of T poses: ``pusht.coverages`` (shapely's array calls)
against the scalar ``coverage(t_polygon(pose))`` per pose, in interleaved rounds, medians
reported, results checked equal bit for bit. The batch sizes are a planner's: one world,
64 forks, 320 (64 forks under five ensemble members).

    python benchmarks/coverage.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from arcfab_gym.tasks import pusht


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    goal = pusht.goal_pose(pusht.DEFAULT_PROMPT)
    # Poses around the goal, as a planner's rollouts near the end of an episode see them.
    poses = np.c_[goal[:2] + rng.normal(0, 60, (320, 2)), goal[2] + rng.normal(0, 0.8, 320)]
    print(f"{'poses':>6} {'scalar ms':>10} {'batched ms':>11} {'ratio':>6}")
    for n in (1, 64, 320):
        batch = poses[:n]
        scalar, batched = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            want = np.array([pusht.coverage(pusht.t_polygon(p), goal) for p in batch])
            t1 = time.perf_counter()
            got = pusht.coverages(batch, goal)
            t2 = time.perf_counter()
            scalar.append(t1 - t0)
            batched.append(t2 - t1)
            assert np.array_equal(got, want), "batched coverage differs from the scalar one"
        s, b = statistics.median(scalar) * 1e3, statistics.median(batched) * 1e3
        print(f"{n:>6} {s:>10.3f} {b:>11.3f} {s / b:>5.2f}x")


if __name__ == "__main__":
    main()
