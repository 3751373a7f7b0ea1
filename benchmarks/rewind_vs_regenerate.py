"""Rewind + one step vs regenerating the state by replaying the history, side by side.

What Arc Fabric's state handling saves an agent that sees its predicted future go wrong:
``Session.rewind(n)`` + one step, against a fresh start + replay of the whole history +
the same step (what a world model without saved state must do). The two alternate within
each round, medians are reported, and both must give the same observation. The timing is
``experiments.failure_recovery.measure_cost_ratio``, the one the benchmark suite records.

    python -m benchmarks.rewind_vs_regenerate [--backend pusht-sim] [--lengths 16 64 256]

(Run as a module from the repository root: it imports ``experiments``.)
"""

from __future__ import annotations

import argparse

import torch

from arcfab_gym.models import create_world_model, list_world_models
from experiments.failure_recovery import CostConfig, measure_cost_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", nargs="+", default=["pusht-sim", "mini-dreamzero"],
                    choices=list_world_models())
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 64, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rewind", type=int, default=4, help="frames undone before the new step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = CostConfig(history_lengths=args.lengths, rewind_steps=args.rewind, repeats=args.repeats)
    print("backend          history | rewind+step (ms) | regenerate (ms) | ratio | same obs")
    for name in args.backend:
        model = create_world_model(name)
        for row in measure_cost_ratio(model, cfg):
            print(f"{name:16s} {row['history_frames']:7d} | {1e3 * row['rewind_seconds']:16.2f} | "
                  f"{1e3 * row['regenerate_seconds']:15.1f} | {row['ratio']:5.1f}x | "
                  f"{row['same_observation']}")
        model.close()


if __name__ == "__main__":
    main()
