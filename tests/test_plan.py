"""The planning app: Hydra compose API, one real subprocess run, and a joblib multirun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agents.mpc import relative_moves
from arcfab_gym.tasks import pusht
from experiments.plan import run
from experiments.summarize import summarize

ROOT = Path(__file__).resolve().parents[1]


def compose_plan(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return OmegaConf.to_object(compose(config_name="plan", overrides=list(overrides)))


def test_config_groups_compose_into_a_structured_config():
    cfg = compose_plan("backend=pusht_sim", "planner=cem", "experiment=full")
    assert cfg.backend.name == "pusht-sim" and cfg.planner.planner == "cem"
    assert cfg.experiment.episodes == 50 and cfg.experiment.max_steps == 75
    default = compose_plan()
    # make plan: iCEM 64x8x3 on the pose objective inside mini-dreamzero, 2 x 75 actions.
    assert default.backend.name == "mini-dreamzero" and default.planner.planner == "icem"
    assert (default.planner.num_samples, default.planner.horizon, default.planner.iterations) == (64, 8, 3)
    assert default.objective == "pose" and default.experiment.max_steps == 75
    mpc = default.planner.mpc(objective=default.objective)
    assert mpc.icem.num_samples == 64 and mpc.icem.noise_beta == 2.0
    # planner=icem keeps the smaller budget of the README's tables.
    assert compose_plan("planner=icem").planner.num_samples == 16


def test_the_app_config_offers_every_agent_setting_with_its_default():
    """PlannerConfig is the flat Hydra face of MPCConfig: every setting of the agent can
    be set from the command line, with the same default, and reaches the agent."""
    import dataclasses

    from agents.mpc import MPCConfig
    from experiments.plan import PlannerConfig
    from planners.icem import ICEMConfig

    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}  # fmt: skip

    app, agent = defaults(PlannerConfig), defaults(MPCConfig)
    missing = set(agent) - set(app) - {"objective", "record_tree"}
    assert not missing, f"MPCConfig settings the plan app cannot set: {sorted(missing)}"
    assert {k: app[k] for k in agent if k in app} == {k: agent[k] for k in agent if k in app}
    mpc = PlannerConfig(relative_px=20.0, keep_elites=0.5, temperature=2.0,
                        execute="mean").mpc(objective="pose")
    assert (mpc.relative_px, mpc.icem.keep_elites, mpc.mppi.temperature) == (20.0, 0.5, 2.0)
    assert mpc.icem.execute == "mean" and PlannerConfig().execute == ICEMConfig().execute


def test_mcts_in_the_simulator_records_trees_and_results(tmp_path):
    cfg = compose_plan("backend=pusht_sim", "planner=mcts", "experiment.episodes=1",
                       "experiment.max_steps=3", "planner.num_simulations=8")
    doc = run(cfg, tmp_path)
    ep = doc["episodes"][0]
    assert ep["steps"] == 3 and ep["tree_nodes"] == 3 * 9  # root + 8 expansions per action
    assert ep["mean_root_visits"] == 9 and 1 <= ep["mean_depth"] <= 4
    assert (tmp_path / "trees" / "episode_0.html").exists()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_auditing_plans_changes_nothing_the_agent_does(tmp_path, tiny_weights_dir):
    """The plan audit steps the model along each chosen plan and puts it back: the run
    (actions, rewards, predictions) must be the same with and without it."""
    common = ("backend=mini_dreamzero", f"+backend.kwargs.weights_dir={tiny_weights_dir}",
              "planner=mcts", "planner.num_simulations=6", "experiment.episodes=1",
              "experiment.max_steps=3", "tree_pages=false")  # fmt: skip
    with_audit = run(compose_plan(*common), tmp_path / "a")["episodes"][0]
    without = run(compose_plan(*common, "audit_plans=false"), tmp_path / "b")["episodes"][0]
    for key in ("rewards", "predicted_rewards", "return"):
        assert with_audit[key] == without[key]
    assert len(with_audit["plan_promised_returns"]) == 3 and "plan_return_gap" not in without


def test_the_agent_exposes_the_plan_behind_its_action():
    from agents.mpc import MPCAgent, MPCConfig
    from arcfab_gym.models.pusht_sim import PushTSim
    from planners.cem import CEMConfig

    model = PushTSim(action_repeat=4, frame_size=64)
    model.start(pusht.DEFAULT_PROMPT, 0)
    mcts = MPCAgent(model, MPCConfig(planner="mcts", num_simulations=12, max_depth=3,
                                     objective="shaped", record_tree=False),
                    np.random.default_rng(0))
    action = mcts.act()
    assert 2 <= len(mcts.plan) <= 3  # the principal variation, within the depth limit
    np.testing.assert_array_equal(mcts.plan[0], action)
    cem = MPCAgent(model, MPCConfig(planner="cem", cem=CEMConfig(horizon=4, num_samples=8,
                                                                 num_elites=2, iterations=1)),
                   np.random.default_rng(0))
    action = cem.act()
    assert cem.plan.shape == (4, 2)
    np.testing.assert_array_equal(cem.plan[0], action)
    model.close()


def test_too_small_an_experiment_is_a_clear_error(tmp_path):
    for bad in ("experiment.max_steps=0", "experiment.episodes=0"):
        with pytest.raises(ValueError, match=bad.split("=")[0] + " must be >= 1"):
            run(compose_plan("backend=pusht_sim", bad), tmp_path)


def test_relative_moves_are_valid_actions_around_the_pusher():
    cands = relative_moves(40.0)({"agent_pos": np.array([10.0, 500.0], np.float32)})
    assert cands.shape == (17, 2) and cands.dtype == np.float32
    assert np.all(np.abs(cands) <= 1.0)
    np.testing.assert_allclose(cands[0], [10 / 256 - 1, 500 / 256 - 1], atol=1e-6)


def test_plan_app_runs_in_a_subprocess_and_as_a_joblib_multirun(tmp_path):
    base = [sys.executable, "-m", "experiments.plan", "backend=pusht_sim",
            "experiment.episodes=1", "experiment.max_steps=2", "tree_pages=false"]
    out = tmp_path / "single"
    proc = subprocess.run(base + ["planner=random", f"hydra.run.dir={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["summary"]["planner"] == "random"
    sweep = tmp_path / "sweep"
    proc = subprocess.run(base[:3] + ["-m"] + base[3:] + ["planner=random,cem", "planner.num_samples=8",
                                  "planner.num_elites=2", "planner.iterations=1",
                                  "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                  f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    planners = sorted(json.loads(p.read_text())["summary"]["planner"]
                      for p in sweep.rglob("results.json"))
    assert planners == ["cem", "random"]

    # The sweep and the single run gather into one table, a row per run.
    table = summarize([str(sweep), str(out / "results.json")]).splitlines()
    assert table[0].startswith("| planner | budget | objective | model |")
    rows = sorted(line.split(" | ")[0].strip("| ") for line in table[2:])
    assert rows == ["cem", "random", "random"]
    assert all("pusht-sim" in line and "/1)" in line for line in table[2:])


def test_summarize_names_the_budget_with_widening_and_members():
    from experiments.summarize import _budget

    assert _budget("mcts", {"num_simulations": 32, "max_depth": 4}) == "32 sims, depth 4"
    assert _budget("mcts", {"num_simulations": 128, "max_depth": 8, "widening_c": 2.0,
                            "widening_alpha": 0.5}) == "128 sims, depth 8, widening 2N^0.5"
    icem = {"num_samples": 64, "horizon": 8, "iterations": 3}
    assert _budget("icem", icem) == "64x8x3"
    assert _budget("icem", {**icem, "hypotheses": 5, "risk": 0.5}) == "64x8x3, 5 members, risk 0.5"


def test_summarize_names_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run"):
        summarize([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no results.json"):
        summarize([str(tmp_path / "empty")])
    (tmp_path / "results.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a results file"):
        summarize([str(tmp_path)])


def test_audit_finds_no_gap_in_the_exact_simulator_and_a_gap_in_a_wrong_model(tmp_path,
                                                                                tiny_weights_dir):
    from experiments.audit import audit, format_audit, load_run

    common = ("experiment.episodes=1", "experiment.max_steps=4", "planner=random", "tree_pages=false")
    exact = run(compose_plan("backend=pusht_sim", *common), tmp_path / "sim")
    ep = exact["episodes"][0]
    # pusht-sim as the model is an exact copy of the real world: same rewards, bit for bit,
    # and every chosen plan is paid exactly what it promised.
    assert ep["predicted_rewards"] == ep["rewards"] and ep["return_gap"] == 0.0
    assert ep["plan_promised_returns"] == ep["plan_real_returns"] and ep["plan_return_gap"] == 0.0
    assert ep["plan_promised_final_coverage"] == ep["plan_real_final_coverage"]
    assert ep["plan_final_coverage_gap"] == 0.0
    report = audit(load_run(tmp_path / "sim"), margin=0.0)
    assert report["flagged"] == 0 and report["mean_gap"] == 0.0 and report["mean_plan_gap"] == 0.0

    # Untrained tiny weights: a model known to be wrong about the reward.
    wrong = run(compose_plan("backend=mini_dreamzero", f"+backend.kwargs.weights_dir={tiny_weights_dir}",
                             *common), tmp_path / "tiny")  # fmt: skip
    ep = wrong["episodes"][0]
    assert ep["predicted_rewards"] != ep["rewards"]
    gap = sum(ep["predicted_rewards"]) - sum(ep["rewards"])
    assert abs(ep["return_gap"] - gap) < 1e-9 and gap != 0.0
    report = audit(load_run(tmp_path / "tiny"), margin=abs(gap) / 2)
    assert report["flagged"] == int(gap > 0)
    text = format_audit(report)
    assert "mini-dreamzero" in text and f"{gap:+.3f}" in text
    assert ep["plan_promised_returns"] != ep["plan_real_returns"]
    assert report["mean_plan_gap"] == pytest.approx(ep["plan_return_gap"])
    assert "plan gap (mean)" in text and f"{ep['plan_return_gap']:+.3f}" in text
    # The coverage at each plan's end: the model's against the real world's.
    cov_gap = np.mean(np.subtract(ep["plan_promised_final_coverage"], ep["plan_real_final_coverage"]))
    assert ep["plan_final_coverage_gap"] == pytest.approx(cov_gap)
    assert report["mean_plan_final_coverage_gap"] == pytest.approx(cov_gap)
    assert "plan-end coverage gap" in text and f"{cov_gap:+.3f}" in text

    with pytest.raises(FileNotFoundError, match="no results.json or audit.json"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="margins must be"):
        audit(load_run(tmp_path / "sim"), margin=-1.0)
