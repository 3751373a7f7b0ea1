"""The failure-recovery benchmark: scenarios, the detector, the agents and the app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agents.scripted import ScriptedPusher
from arcfab_gym.errors import UnknownPromptError
from arcfab_gym.models.pusht_sim import PushTSim
from arcfab_gym.tasks import pusht
from arcfab_gym.scenarios import (
    FORBIDDEN_ZONE,
    SUITE_NAME,
    SUITE_VERSION,
    DetectorConfig,
    FailureDetector,
    PredictedFrame,
    Rect,
    Scenario,
    ScenarioWorld,
    Shove,
    block_centre,
    edge_distance,
    make_scenario,
    place_block,
    scenario_names,
)
from experiments.failure_recovery import (
    CostConfig,
    FailureRecoveryConfig,
    Plan,
    check_config,
    measure_cost_ratio,
    run,
    run_episode,
)

ROOT = Path(__file__).resolve().parents[1]


def compose_fr(*overrides: str) -> FailureRecoveryConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="failure_recovery", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def play(scenario: Scenario, policy, steps: int | None = None):
    """Run ``policy(obs, t)`` in the scenario's real world; returns (world steps, poses)."""
    world = ScenarioWorld(scenario)
    obs, _ = world.reset()
    results = []
    for t in range(steps or scenario.max_steps):
        res = world.step(policy(obs, t))
        results.append(res)
        obs = res.observation
        if res.done:
            break
    poses = world.poses.copy()
    world.close()
    return results, poses


def seeded_pusher(obs, t):
    return ScriptedPusher(np.random.default_rng([0, t]), noise_px=8.0, waypoint_prob=0.0)(obs)


# --- scenarios -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", scenario_names())
def test_scenarios_are_reproducible_from_their_seed(name):
    a, b, other = make_scenario(name, 3), make_scenario(name, 3), make_scenario(name, 4)
    assert a == b and a.describe() == b.describe()
    assert a.describe()["suite"] == {"name": SUITE_NAME, "version": SUITE_VERSION}
    assert a.initial_state != other.initial_state
    # Same seed + same actions = the same real trajectory, bit for bit (events included).
    steps = 14 if name == "shove" else 6
    run_a, poses_a = play(a, seeded_pusher, steps)
    run_b, poses_b = play(b, seeded_pusher, steps)
    np.testing.assert_array_equal(poses_a, poses_b)
    assert [r.events for r in run_a] == [r.events for r in run_b]
    _, poses_other = play(other, seeded_pusher, steps)
    assert not np.array_equal(poses_a[:, 2:5], poses_other[:, 2:5])


def test_a_shove_displaces_the_block_between_two_steps():
    sc = make_scenario("shove", 0)
    (shove,) = sc.shoves
    results, poses = play(sc, lambda obs, t: pusht.target_to_action(np.array([30.0, 30.0])),
                          shove.after_step + 1)
    k = shove.after_step
    assert results[k - 1].events and results[k - 1].events[0].startswith("shove")
    jump = np.linalg.norm(block_centre(poses[k, 2:5]) - block_centre(poses[k - 1, 2:5]))
    assert jump > 40.0  # the pusher idles in a corner: only the shove moved the T
    # After the shove the T rests where it was put (damping 0, nothing pushes it).
    np.testing.assert_allclose(poses[k + 1, 2:5], poses[k, 2:5], atol=1e-6)


def test_place_block_puts_the_t_exactly_and_at_rest():
    sim = PushTSim(action_repeat=4)
    sim.start(pusht.DEFAULT_PROMPT, 0, np.array([40.0, 40.0, 300.0, 300.0, 0.3]))
    sim.step(pusht.target_to_action(np.array([40.0, 50.0])))
    pose = np.array([200.0, 250.0, 1.0])
    sim.load_state(place_block(sim.extract_state(), pose))
    np.testing.assert_allclose(sim.observe()["block_pose"], pose, atol=1e-4)
    out = sim.step(pusht.target_to_action(np.array([40.0, 60.0])))
    np.testing.assert_allclose(out.info["block_pose"], pose, atol=1e-9)
    cov = pusht.coverage(pusht.t_polygon(pose), pusht.goal_pose(pusht.DEFAULT_PROMPT))
    assert out.info["coverage"] == pytest.approx(cov)


def test_edge_failure_triggers_when_the_t_is_pushed_into_its_wall():
    sc = make_scenario("edge", 0)
    goal = pusht.goal_pose(sc.prompt)
    # Naive: push the T's centre to a point beyond the wall on the goal's side.
    centre0 = block_centre(pusht.pose_for_state(np.asarray(sc.initial_state)))
    wall_dir = np.sign(goal[:2] - 256.0) * (np.abs(goal[:2] - 256.0) > 1)
    beyond = np.array([*(centre0 + wall_dir * 600.0), 0.0])

    def pusher(obs, t):
        return ScriptedPusher(np.random.default_rng(t), noise_px=0.0, waypoint_prob=0.0)(
            {**obs, "goal_pose": beyond.astype(np.float32)})

    results, poses = play(sc, pusher)
    assert results[-1].failure == "edge" and results[-1].done
    assert edge_distance(poses[-1, 2:5]) < sc.edge_margin
    assert all(r.failure is None for r in results[:-1])


def test_forbidden_zone_failure_triggers_on_a_push_at_the_zone():
    sc = make_scenario("forbidden_zone", 1)  # seed 1: the scripted pusher happens to miss it
    z = FORBIDDEN_ZONE
    into_zone = np.array([(z.x0 + z.x1) / 2, (z.y0 + z.y1) / 2, 0.0], dtype=np.float32)

    def pusher(obs, t):  # naive: push the T's centre at the zone's centre
        return ScriptedPusher(np.random.default_rng(t), noise_px=8.0, waypoint_prob=0.0)(
            {**obs, "goal_pose": into_zone})

    assert play(sc, seeded_pusher)[0][-1].failure is None

    results, poses = play(sc, pusher)
    assert results[-1].failure == "forbidden_zone"
    assert FORBIDDEN_ZONE.contains(block_centre(poses[-1, 2:5]))


def test_stuck_failure_is_a_progress_timeout():
    sc = make_scenario("stuck", 1)
    results, _ = play(sc, lambda obs, t: pusht.target_to_action(obs["agent_pos"]))  # stand still
    assert len(results) == sc.stall_steps and results[-1].failure == "stalled"
    with pytest.raises(RuntimeError, match="episode is over"):
        world = ScenarioWorld(sc.with_max_steps(1))
        world.reset()
        world.step(np.zeros(2))
        world.step(np.zeros(2))


# --- the detector ------------------------------------------------------------------------
GOAL = pusht.goal_pose(pusht.DEFAULT_PROMPT)


def frames(poses, coverages):
    return [PredictedFrame(np.asarray(p, dtype=np.float64), c) for p, c in zip(poses, coverages)]


def test_detector_is_quiet_on_a_benign_future():
    det = FailureDetector(DetectorConfig(), forbidden_zone=Rect(400, 400, 480, 480))
    now = PredictedFrame(np.array([200.0, 220.0, 0.5]), 0.30)
    path = [[200 + 10 * k, 220 + 6 * k, 0.5 + 0.05 * k] for k in range(1, 7)]
    result = det.check(now, frames(path, [0.3, 0.35, 0.28, 0.4, 0.5, 0.55]))
    assert not result.flagged and result.kind is None and result.step is None


def test_detector_flags_each_failure_at_its_step():
    zone = Rect(250.0, 300.0, 330.0, 360.0)
    det = FailureDetector(DetectorConfig(coverage_drop=0.1, zone_margin=5.0), forbidden_zone=zone)
    now = PredictedFrame(np.array([256.0, 200.0, 0.0]), 0.5)
    # Coverage falls by 0.2 at the third imagined step.
    d = det.check(now, frames([now.block_pose] * 4, [0.5, 0.45, 0.3, 0.6]))
    assert (d.kind, d.step) == ("coverage_drop", 3) and "0.50 -> 0.30" in d.detail
    # The T's centre walks down into the zone (entering its 5 px margin counts).
    offset = block_centre(np.array([0.0, 0.0, 0.0]))
    path = [[290 - offset[0], y - offset[1], 0.0] for y in (240, 270, 296, 320)]
    d = det.check(now, frames(path, [0.5] * 4))
    assert (d.kind, d.step) == ("forbidden_zone", 3)
    # A corner reaches 10 px from the left border on step 2; the earliest failure wins.
    path = [[120.0, 200.0, 0.0], [70.0, 200.0, 0.0], [256.0, 330.0, 0.0]]
    d = det.check(now, frames(path, [0.5, 0.5, 0.0]))
    assert (d.kind, d.step) == ("edge", 2)


def test_detector_compares_with_now_and_its_checks_can_be_switched_off():
    det = FailureDetector(DetectorConfig(edge_margin=25.0))
    in_corner = np.array([70.0, 60.0, 0.0])  # a corner 10 px from the left border
    assert edge_distance(in_corner) == pytest.approx(10.0)
    now = PredictedFrame(in_corner, 0.0)
    # Already in the edge band: staying there is not a new failure, going deeper is.
    assert not det.check(now, frames([in_corner, in_corner + [1, 0, 0]], [0.0, 0.0])).flagged
    assert det.check(now, frames([in_corner - [6, 0, 0]], [0.0])).kind == "edge"
    off = FailureDetector(DetectorConfig(check_edge=False, check_coverage=False))
    assert not off.check(PredictedFrame(np.array([256.0, 256.0, 0.0]), 0.9),
                         frames([in_corner - [6, 0, 0]], [0.0])).flagged


def test_detector_flags_a_stall_only_when_the_pusher_is_at_a_t_that_does_not_move():
    det = FailureDetector(DetectorConfig(lookahead=4, check_edge=False))
    pose = np.array([256.0, 256.0, 0.3])
    centre = block_centre(pose)
    now = PredictedFrame(pose, 0.2)

    def future(poses, coverages, pusher):
        return [PredictedFrame(np.asarray(p, dtype=np.float64), c, np.asarray(pusher, float))
                for p, c in zip(poses, coverages)]

    jammed = [pose + [0.5 * k, 0.0, 0.01] for k in range(1, 5)]
    d = det.check(now, future(jammed, [0.2] * 4, centre + [30.0, 0.0]))
    assert (d.kind, d.step) == ("stalled", 4)
    # The pusher still travelling towards the T: no stall yet.
    assert not det.check(now, future(jammed, [0.2] * 4, centre + [150.0, 0.0])).flagged
    # The T moving, turning, or the coverage rising: progress, not a stall.
    moving = [pose + [3.0 * k, 0.0, 0.0] for k in range(1, 5)]
    assert not det.check(now, future(moving, [0.2] * 4, centre)).flagged
    turning = [pose + [0.0, 0.0, 0.03 * k] for k in range(1, 5)]
    assert not det.check(now, future(turning, [0.2] * 4, centre)).flagged
    assert not det.check(now, future(jammed, [0.2, 0.2, 0.2, 0.22], centre)).flagged
    # A future shorter than the lookahead cannot show a stall; nor can one without a pusher.
    assert not det.check(now, future(jammed[:3], [0.2] * 3, centre)).flagged
    assert not det.check(now, frames(jammed, [0.2] * 4)).flagged
    off = FailureDetector(DetectorConfig(lookahead=4, check_stall=False))
    assert not off.check(now, future(jammed, [0.2] * 4, centre)).flagged


def test_bad_values_raise_errors_that_name_them():
    with pytest.raises(ValueError, match="lookahead must be an int >= 1, got 0"):
        FailureDetector(DetectorConfig(lookahead=0))
    with pytest.raises(ValueError, match="coverage_drop must be in \\(0, 1\\], got 1.5"):
        DetectorConfig(coverage_drop=1.5).validate()
    with pytest.raises(ValueError, match="edge_margin"):
        DetectorConfig(edge_margin=-1.0).validate()
    with pytest.raises(ValueError, match="stall_angle"):
        DetectorConfig(stall_angle=4.0).validate()
    with pytest.raises(ValueError, match="stall_progress"):
        DetectorConfig(stall_progress=-0.1).validate()
    with pytest.raises(ValueError, match="x0 < x1"):
        Rect(10.0, 10.0, 5.0, 20.0)
    with pytest.raises(ValueError, match="unknown scenario 'nope'.*shove, edge"):
        make_scenario("nope", 0)
    with pytest.raises(ValueError, match="non-negative int, got -1"):
        make_scenario("edge", -1)
    with pytest.raises(ValueError, match="after_step must be >= 1"):
        Shove(after_step=0, distance=10.0)
    with pytest.raises(UnknownPromptError):
        Scenario(name="x", seed=0, prompt="fly", initial_state=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="agents must be distinct names .* got \\['bogus'\\]"):
        check_config(FailureRecoveryConfig(agents=["bogus"]))
    with pytest.raises(ValueError, match="exceed cost.rewind_steps=4, got \\[2\\]"):
        check_config(FailureRecoveryConfig(cost=CostConfig(history_lengths=[2, 16])))
    with pytest.raises(ValueError, match="scenario.names .* got \\['shove', 'lava'\\]"):
        check_config(compose_fr("scenario.names=[shove,lava]"))


# --- agents ------------------------------------------------------------------------------
def test_plan_runs_prefix_then_subgoal_then_policy():
    plan = Plan([np.zeros(2, np.float32)], np.array([100.0, 100.0]), hold=2)
    assert plan.advanced() == Plan([], plan.subgoal, 2)
    assert plan.advanced().advanced() == Plan([], plan.subgoal, 1)
    assert plan.advanced().advanced().advanced() is None
    assert Plan().advanced() is None


def test_rewind_and_regenerate_decide_alike_and_avoid_the_zone():
    cfg = compose_fr("scenario.max_steps=6")
    sc = make_scenario("forbidden_zone", 0).with_max_steps(6)
    model = PushTSim(action_repeat=4, frame_size=64)
    none, rewind, regen = (run_episode(cfg, kind, sc, model)
                           for kind in ("none", "rewind", "regenerate"))
    assert none["failure"] == "forbidden_zone" and none["recoveries_attempted"] == 0
    assert none["failures_detected"] >= 1  # the baseline saw it coming and did nothing
    assert rewind["failure"] is None and rewind["recoveries_succeeded"] >= 1
    # Same search, same decisions; regenerating the branch points costs more frames.
    assert rewind["trajectory_sha256"] == regen["trajectory_sha256"]
    assert rewind["alternatives_tried"] == regen["alternatives_tried"]
    assert regen["frames_generated"] > rewind["frames_generated"]


def test_cost_ratio_rewind_and_replay_agree():
    rows = measure_cost_ratio(PushTSim(action_repeat=4, frame_size=64),
                              CostConfig(history_lengths=[8, 64], rewind_steps=4, repeats=1))
    assert [r["history_frames"] for r in rows] == [8, 64]
    assert all(r["same_observation"] for r in rows)
    assert rows[1]["regenerate_frames"] == 61 and rows[1]["rewind_frames"] == 1
    assert rows[1]["ratio"] > 2.0  # 61 frames against 1: a margin for a noisy machine


# --- the app -----------------------------------------------------------------------------
def test_app_composes_and_writes_results_with_the_suite_version(tmp_path):
    cfg = compose_fr("scenario.names=[edge,stuck]", "scenario.episodes=1", "scenario.max_steps=3",
                     "agents=[none,rewind,mcts]", "mcts.num_simulations=4", "mcts.max_depth=2",
                     "cost.history_lengths=[8,16]", "cost.repeats=1")
    assert cfg.backend.name == "pusht-sim" and cfg.detector.lookahead == 6
    doc = run(cfg, tmp_path, command="python -m experiments.failure_recovery test")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["suite"] == {"name": SUITE_NAME, "version": SUITE_VERSION}
    assert saved["table"] == doc["table"] and len(saved["table"]) == 2 * 3
    assert {s["name"] for s in saved["scenarios"]} == {"edge", "stuck"}
    assert all(s["suite"]["version"] == SUITE_VERSION for s in saved["scenarios"])
    assert [c["history_frames"] for c in saved["cost_ratio"]] == [8, 16]
    for row in saved["table"]:
        assert 0.0 <= row["final_coverage"] <= 1.0 and row["frames_generated"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "python -m experiments.failure_recovery test" in md and "| stuck | mcts |" in md
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert (tmp_path / "cost_ratio.png").stat().st_size > 0
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
