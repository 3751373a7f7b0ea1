"""Gather ``results.json`` files of planning runs into one markdown table.

    python -m experiments.summarize runs/plan-sweep/20261122-*/ runs/plan/*_random_*
    python -m experiments.summarize runs/goal_reaching/*

Arguments are run directories or ``results.json`` files (shell globs welcome; directories
are searched recursively for ``results.json``, or else give their ``*.json`` files, such
as ``docs/results``). Runs of ``experiments.plan`` and of
``experiments.goal_reaching`` and ``experiments.train_sb3`` go to separate tables. Means
carry their standard error.

    python -m experiments.summarize runs/train_sb3-sweep/*

``--plot budget.png`` also draws the planning runs' budget sweep: success rate and final
coverage against model steps per action (and seconds per action), one line per planner
and model.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any


def find_results(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():  # run directories, or a folder of collected result files
            found.extend(sorted(p.rglob("results.json")) or sorted(p.glob("*.json")))
        else:
            raise FileNotFoundError(f"no such run directory or results file: {p}")
    return found


def mean_se(values: list[float]) -> str:
    m = statistics.mean(values)
    if len(values) < 2:
        return f"{m:.3f}"
    return f"{m:.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def _rate(flags: list[bool]) -> str:
    return f"{100 * sum(flags) / len(flags):.0f} % ({sum(flags)}/{len(flags)})"


def _budget(planner_name: str, planner: dict[str, Any]) -> str:
    """The search budget of a run's planner config, e.g. '32 sims, depth 4' or '16x4x1'."""
    if not planner:
        return ""
    if planner_name in ("mcts", "gumbel"):
        budget = f"{planner.get('num_simulations')} sims, depth {planner.get('max_depth')}"
        if planner.get("widening_c", 0) > 0:  # configs/planner/mcts_pw.yaml
            budget += f", widening {planner['widening_c']:g}N^{planner.get('widening_alpha', 0.5):g}"
        return budget
    if planner_name in ("cem", "icem", "mppi"):
        budget = f"{planner.get('num_samples')}x{planner.get('horizon')}x{planner.get('iterations')}"
        if planner.get("hypotheses", 1) > 1:
            budget += f", {planner['hypotheses']} members"
            if planner.get("risk", 0) > 0:
                budget += f", risk {planner['risk']:g}"
        return budget
    return ""


def plan_row(doc: dict[str, Any]) -> list[str]:
    s, c, eps = doc["summary"], doc.get("config", {}), doc["episodes"]
    detail = _budget(s["planner"], c.get("planner", {}))
    return [s["planner"], detail, c.get("objective", "reward"), s["backend"], str(len(eps)),
            str(c.get("experiment", {}).get("max_steps", "")),
            _rate([e["success"] for e in eps]), mean_se([e["final_coverage"] for e in eps]),
            f"{s['seconds_per_action']:.3f}"]  # fmt: skip


def goal_row(doc: dict[str, Any]) -> list[str]:
    s, eps = doc["summary"], doc["episodes"]
    return [s["planner"], _budget(s["planner"], doc.get("config", {}).get("planner", {})), s["backend"], str(len(eps)), _rate([e["success"] for e in eps]),
            f"{s['goal_offset']} / {s['budget']}", f"{s['seconds_per_action']:.3f}"]


def sb3_row(doc: dict[str, Any]) -> list[str]:
    s, evals = doc["summary"], doc["evaluations"]
    best = max(evals, key=lambda e: e["final_coverage"]) if evals else {}
    audit = (f"{s['audit_mean_gap']:+.2f} ({s['audit_flagged']}/{s['audit_episodes']})"
             if "audit_mean_gap" in s else "")
    return [s["algo"], s["world"], s["reward"], f"{s['total_timesteps']:,}",
            f"{s.get('real_final_coverage_before_training', float('nan')):.3f}",
            f"{s.get('real_final_coverage', float('nan')):.3f}",
            f"{best.get('final_coverage', float('nan')):.3f} @ {best.get('timesteps', 0):,}",
            f"{100 * s.get('real_success_rate', 0):.0f} %",
            audit, f"{s['steps_per_second']:.0f}"]  # fmt: skip


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summarize(paths: list[str]) -> str:
    plans, goals, agents = [], [], []
    for path in find_results(paths):
        doc = json.loads(path.read_text())
        if "summary" in doc and "evaluations" in doc:
            agents.append(doc)
            continue
        if "summary" not in doc or "episodes" not in doc:
            raise ValueError(f"{path} is not a results file of experiments.plan / "
                             "goal_reaching / train_sb3")
        (goals if "goal_offset" in doc["summary"] else plans).append(doc)
    out = []
    if plans:
        out.append(table(["planner", "budget", "objective", "model", "episodes", "actions",
                          "success", "final coverage", "s / action"],
                         [plan_row(d) for d in plans]))  # fmt: skip
    if goals:
        out.append(table(["planner", "budget", "model", "episodes", "success", "offset / budget (steps)",
                          "s / action"], [goal_row(d) for d in goals]))  # fmt: skip
    if agents:
        out.append(table(["agent", "trained in", "reward", "steps", "real coverage before",
                          "real coverage after", "best (at step)", "real success",
                          "audit gap (flagged)", "steps / s"],
                         [sb3_row(d) for d in agents]))  # fmt: skip
    if not out:
        raise ValueError(f"no results.json under {paths}")
    return "\n\n".join(out)


def sweep_points(paths: list[str]) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Planning runs grouped by (planner, model), each a point of the budget sweep, sorted
    by model steps per action."""
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for path in find_results(paths):
        doc = json.loads(path.read_text())
        if "episodes" not in doc or "goal_offset" in doc.get("summary", {}) or "evaluations" in doc:
            continue
        s, eps = doc["summary"], doc["episodes"]
        groups.setdefault((s["planner"], s["backend"]), []).append({
            "model_steps": statistics.mean(e["model_steps_per_action"] for e in eps),
            "seconds": s["seconds_per_action"],
            "success": statistics.mean(float(e["success"]) for e in eps),
            "coverage": statistics.mean(e["final_coverage"] for e in eps),
            "episodes": len(eps)})  # fmt: skip
    for pts in groups.values():
        pts.sort(key=lambda p: p["model_steps"])
    return groups


def plot_sweep(paths: list[str], out: Path) -> Path:
    """Success rate and final coverage against model steps per action and seconds per
    action, one line per (planner, model); written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sweep_points(paths)
    if not groups:
        raise ValueError(f"no planning runs under {paths}")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (planner, backend), pts in sorted(groups.items()):
        style = "-" if backend == "pusht-sim" else "--"
        label = f"{planner} in {backend}"
        x = [p["model_steps"] for p in pts]
        axes[0].plot(x, [p["success"] for p in pts], style, marker="o", label=label)
        axes[1].plot(x, [p["coverage"] for p in pts], style, marker="o", label=label)
        axes[2].plot([p["seconds"] for p in pts], [p["success"] for p in pts], style,
                     marker="o", label=label)
    for ax, (xl, yl) in zip(axes, [("model steps per action", "success rate"),
                                   ("model steps per action", "final coverage"),
                                   ("seconds per action", "success rate")]):
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.95, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    fig.suptitle("Push-T planning budget sweep (solid: simulator as the model; dashed: "
                 "mini-dreamzero)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run directories or results.json files")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also draw the budget sweep of the planning runs to this PNG")
    args = parser.parse_args(argv)
    print(summarize(args.paths))
    if args.plot is not None:
        print(f"budget sweep: {plot_sweep(args.paths, args.plot)}")


if __name__ == "__main__":
    main()
