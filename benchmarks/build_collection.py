"""The world-model build's data collection, an earlier commit against this checkout, side
by side: for each of the build's data sets, the same episodes collected by both trees in
alternating subprocesses (one torch thread each, as the build's workers), median seconds
per episode, the episodes' sha256 asserted equal.

    python -m benchmarks.build_collection --base 7a66eb0 [--rounds 2] [--scale 1.0]

Also prints what the ratios make of a recorded build's collection phases
(``--record docs/results/build_r20/build.json``): each phase's recorded minutes times
this run's new / old ratio for its data set. That projection assumes each phase's time
is its episodes' (multiprocessing start-up and saving are left out), so it is an
estimate, not a measurement of the build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.build_world_model import _DATA, BuildConfig

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "arcfab_gym" / "models" / "mini_dreamzero" / "weights"

#: Episodes of each of the build's data sets (experiments.build_world_model's _DATA, the
#: same settings) collected per round; "dagger" plans inside the shipped weights (the
#: build uses the weights it has made so far, the same networks).
EPISODES = {"train": 40, "jumps": 24, "near_goal": 24, "planner": 2, "dagger": 2}
SETS = {name: (dict(_DATA[name]), n) for name, n in EPISODES.items()}
SETS["dagger"][0].update(planner_samples=BuildConfig.dagger_samples, planner_model=str(WEIGHTS))
#: Which recorded build phase each data set's ratio applies to.
PHASES = {"collect train": "train", "collect jumps": "jumps", "collect near_goal": "near_goal",
          "collect planner": "planner", "collect test": "train", "collect dagger": "dagger",
          "collect dagger2": "dagger"}  # fmt: skip

_CHILD = """
import hashlib, json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
import arcfab_gym
from experiments.collect import CollectConfig, collect_episode
settings, n = json.loads(sys.argv[1]), int(sys.argv[2])
cfg = CollectConfig(workers=1, **settings)
collect_episode(cfg, n)  # warm: imports, first renderer, weights
h = hashlib.sha256()
t = time.perf_counter()
for i in range(n):
    ep = collect_episode(cfg, i)
    for k in sorted(ep):
        h.update(np.ascontiguousarray(ep[k]).tobytes())
print(json.dumps({"seconds": time.perf_counter() - t, "sha256": h.hexdigest(),
                  "package": arcfab_gym.__file__}))
"""


def _run(tree: Path, settings: dict, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(settings), str(n)],
                         cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True, check=True)  # fmt: skip
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["package"].startswith(str(tree)):
        raise RuntimeError(f"{tree} imported arcfab_gym from {res['package']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the earlier commit to compare with")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0, help="episodes per set, scaled")
    ap.add_argument("--record", default=str(ROOT / "docs/results/build_r20/build.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base],
                                 capture_output=True, check=True).stdout  # fmt: skip
        base.mkdir()
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        times: dict[str, dict[str, list[float]]] = {k: {"old": [], "new": []} for k in SETS}
        for r in range(args.rounds):
            for name, (settings, n) in SETS.items():
                n = max(1, round(n * args.scale))
                old, new = _run(base, settings, n), _run(ROOT, settings, n)
                if old["sha256"] != new["sha256"]:
                    raise AssertionError(f"{name}: the two trees collected different episodes")
                times[name]["old"].append(old["seconds"] / n)
                times[name]["new"].append(new["seconds"] / n)
                print(f"round {r + 1} {name:<10} {n:>3} episodes  old {old['seconds']:7.2f} s"
                      f"  new {new['seconds']:7.2f} s  (same sha256)", flush=True)
    print(f"\nper episode (median of {args.rounds}), {args.base} -> this checkout")
    ratio = {}
    for name, t in times.items():
        o, n = statistics.median(t["old"]), statistics.median(t["new"])
        ratio[name] = n / o
        print(f"  {name:<10} {o:7.3f} s -> {n:7.3f} s   {o / n:5.2f}x")
    record = Path(args.record)
    if record.exists():
        recorded = json.loads(record.read_text())
        phases, total = recorded["phases"], recorded["minutes"]
        saved = 0.0
        print(f"\nprojected onto {record.relative_to(ROOT)} (recorded {total:.1f} min):")
        for p in phases:
            if p["phase"] in PHASES:
                new = p["minutes"] * ratio[PHASES[p["phase"]]]
                saved += p["minutes"] - new
                print(f"  {p['phase']:<18} {p['minutes']:6.2f} -> {new:6.2f} min")
        print(f"  the build: {total:.1f} -> {total - saved:.1f} min (estimate)")


if __name__ == "__main__":
    main()
