"""Goal reaching (stable-worldmodel's Push-T protocol): the success test and one real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.goal_reaching import goal_errors, reached, run

ROOT = Path(__file__).resolve().parents[1]


def _info(agent, block):
    return {"agent_pos": np.asarray(agent, float), "block_pose": np.asarray(block, float)}


def test_success_needs_pusher_block_and_angle_within_tolerance():
    goal_agent, goal_block = np.array([100.0, 100.0]), np.array([300.0, 300.0, 0.1])
    assert reached(_info([110, 100], [300, 315, 0.1 + 0.3]), goal_agent, goal_block)
    assert not reached(_info([121, 100], [300, 300, 0.1]), goal_agent, goal_block)  # pusher
    assert not reached(_info([100, 100], [300, 321, 0.1]), goal_agent, goal_block)  # block
    # Together, as stable-worldmodel counts them: 15 px and 15 px are 21 px apart.
    assert not reached(_info([115, 100], [300, 315, 0.1]), goal_agent, goal_block)
    assert not reached(_info([100, 100], [300, 300, 0.1 + math.pi / 9 + 0.01]),
                       goal_agent, goal_block)  # angle
    # Angles wrap: 2 pi - 0.05 is 0.05 + 0.1 away from 0.1 ... the short way round.
    err = goal_errors(_info([100, 100], [300, 300, 2 * math.pi - 0.05]), goal_agent, goal_block)
    assert math.isclose(err["angle_err_rad"], 0.15, abs_tol=1e-9)


def test_goal_reaching_runs_the_protocol_and_records_errors(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="goal_reaching", overrides=[
            "episodes=2", "planner.num_samples=8", "planner.num_elites=2",
            "planner.iterations=1", "planner.horizon=2", "budget=8"]))  # fmt: skip
    doc = run(cfg, tmp_path)
    s = doc["summary"]
    assert s["backend"] == "pusht-sim" and s["episodes"] == 2
    assert s["goal_offset"] == 25 and s["budget"] == 8 and s["action_repeat"] == 4
    for ep in doc["episodes"]:
        assert ep["control_steps"] <= 8 and ep["control_steps"] % 4 == 0
        assert set(ep["final_errors"]) == {"agent_err_px", "block_err_px", "angle_err_rad"}
        # The goal is the expert's state 25 control steps later: the pusher moved.
        assert ep["start_errors"]["agent_err_px"] > 1.0
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == s

    for bad in ("budget=0", "episodes=0", "action_repeat=0"):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = OmegaConf.to_object(compose(config_name="goal_reaching", overrides=[bad]))
        with pytest.raises(ValueError, match=bad.split("=")[0] + " must be >= 1"):
            run(cfg, tmp_path / "bad")
