"""Model-exploitation audit of a planning run: what the model promised vs what was paid.

``experiments.plan`` records, for every executed action, the reward the planning model
predicted for it (one step ahead, from the state re-synced to the real world) next to the
reward the real Push-T gave. A planner that exploits its model's errors picks actions the
model over-rates, so its predicted return exceeds the real one. This prints, per episode,
the predicted and real return, the gap, the share of steps over-rated by more than
``--step-margin``, and flags episodes whose gap exceeds ``--margin``. Planning runs also
audit each chosen *plan*: the return the model promised for the whole planned sequence
against what the real Push-T paid for the same sequence from the same state (the plan
gap, and the share of plans over-promised by more than ``--step-margin``).

    python -m experiments.audit runs/plan/<run>            # or its results.json
    python -m experiments.audit runs/train_sb3/<run>       # a trained policy's audit.json
    python -m experiments.audit docs/results/mcts_model.json --margin 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load_run(path: str | Path) -> dict[str, Any]:
    """A run's audit document: a planning run's ``results.json``, or the ``audit.json``
    of ``experiments.train_sb3`` (a directory holding either, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in ("audit.json", "results.json")
                     if (path / name).is_file()), path / "results.json")
    if not path.is_file():
        raise FileNotFoundError(f"no results.json or audit.json at {path}")
    doc = json.loads(path.read_text())
    episodes = doc.get("episodes")
    if not episodes or "predicted_rewards" not in episodes[0]:
        raise ValueError(f"{path} has no predicted rewards: a run of experiments.plan "
                         "from before the audit, or not a planning or train_sb3 run")
    return doc


def audit(doc: dict[str, Any], *, margin: float = 1.0, step_margin: float = 0.05) -> dict[str, Any]:
    """Per-episode predicted vs real return; ``flagged`` = episodes with gap > margin."""
    if margin < 0 or step_margin < 0:
        raise ValueError(f"margins must be >= 0, got margin={margin}, step_margin={step_margin}")
    rows = []
    for ep in doc["episodes"]:
        real, pred = ep["rewards"], ep["predicted_rewards"]
        over = sum(p - r > step_margin for p, r in zip(pred, real))
        gap = sum(pred) - sum(real)
        row = {"episode": ep["episode"], "seed": ep["seed"], "real_return": sum(real),
               "predicted_return": sum(pred), "gap": gap,
               "over_rated_steps": over / max(1, len(real)), "flagged": gap > margin}
        if ep.get("plan_promised_returns"):  # a planning run's whole-plan audit
            plan_gaps = [a - b for a, b in zip(ep["plan_promised_returns"], ep["plan_real_returns"])]
            row["plan_gap"] = sum(plan_gaps) / len(plan_gaps)
            row["over_promised_plans"] = sum(g > step_margin for g in plan_gaps) / len(plan_gaps)
        if ep.get("plan_promised_final_coverage"):  # and in coverage, at each plan's end
            cov_gaps = [a - b for a, b in zip(ep["plan_promised_final_coverage"],
                                              ep["plan_real_final_coverage"])]
            row["plan_final_coverage_gap"] = sum(cov_gaps) / len(cov_gaps)
        rows.append(row)
    n = len(rows)
    report = {
        "backend": doc["summary"]["backend"], "planner": doc["summary"]["planner"],
        "episodes": rows, "margin": margin, "step_margin": step_margin,
        "mean_gap": sum(r["gap"] for r in rows) / n,
        "flagged": sum(r["flagged"] for r in rows),
    }  # fmt: skip
    if all("plan_gap" in r for r in rows):
        report["mean_plan_gap"] = sum(r["plan_gap"] for r in rows) / n
    if all("plan_final_coverage_gap" in r for r in rows):
        report["mean_plan_final_coverage_gap"] = sum(r["plan_final_coverage_gap"] for r in rows) / n
    return report


def format_audit(report: dict[str, Any]) -> str:
    plans = "mean_plan_gap" in report
    head = ["episode", "seed", "real return", "predicted return", "gap", "steps over-rated"]
    head += ["plan gap (mean)", "plans over-promised"] if plans else []
    cov = "mean_plan_final_coverage_gap" in report
    head += ["plan-end coverage gap"] if cov else []
    lines = [f"audit: {report['planner']} in {report['backend']}, {len(report['episodes'])} "
             f"episodes; flag = predicted - real return > {report['margin']}",
             "| " + " | ".join(head + ["flag"]) + " |", "|" + "---:|" * len(head) + "---|"]
    for r in report["episodes"]:
        cells = [str(r["episode"]), str(r["seed"]), f"{r['real_return']:.3f}",
                 f"{r['predicted_return']:.3f}", f"{r['gap']:+.3f}",
                 f"{100 * r['over_rated_steps']:.0f} %"]
        if plans:
            cells += [f"{r['plan_gap']:+.3f}", f"{100 * r['over_promised_plans']:.0f} %"]
        if cov:
            cells += [f"{r['plan_final_coverage_gap']:+.3f}"]
        lines.append("| " + " | ".join(cells + ["FLAG" if r["flagged"] else ""]) + " |")
    tail = f"mean gap {report['mean_gap']:+.3f}; flagged {report['flagged']} of {len(report['episodes'])}"
    if plans:
        tail += (f"; each chosen plan promised {report['mean_plan_gap']:+.3f} more than the "
                 "real Push-T paid for it, on average")
    if cov:
        tail += (f"; the coverage it promised at its end was {report['mean_plan_final_coverage_gap']:+.3f} "
                 "above the real one")
    lines.append(tail)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory of experiments.plan or its results.json")
    parser.add_argument("--margin", type=float, default=1.0,
                        help="flag episodes whose predicted return exceeds the real by more")
    parser.add_argument("--step-margin", type=float, default=0.05,
                        help="a step is over-rated when its predicted reward exceeds the real by more")
    args = parser.parse_args(argv)
    print(format_audit(audit(load_run(args.run), margin=args.margin, step_margin=args.step_margin)))


if __name__ == "__main__":
    main()
