"""The README's main job: the demo episode writes a tree JSON, a D3 page and a TB run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from arcfab_gym import TrajectoryTree
from experiments.demo import DemoConfig, run

ROOT = Path(__file__).resolve().parents[1]


def test_demo_run_writes_tree_page_and_tensorboard(tmp_path):
    cfg = DemoConfig(steps_before_fork=10, branch_steps=10, rewind_steps=5, checkpoint_every=5)
    summary = run(cfg, tmp_path)
    tree = TrajectoryTree.from_json((tmp_path / "tree.json").read_text())
    assert len(tree) == summary["tree_nodes"] and len(tree.roots) == 1
    assert len(tree.get_fork_points()) >= 1
    assert len({n.session_id for n in tree}) == 3  # the main line and two forks
    page = (tmp_path / "tree.html").read_text()
    assert "d3" in page and "https://" not in page.split("<script")[0]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()
    assert "main/reward" in tags["scalars"] and "branch_a_new_prompt/coverage" in tags["scalars"]
    assert {"frames/last_frame_main_A_B", "tree/picture"} <= set(tags["images"])
    assert summary["frames"]["branch A (new prompt)"] == 20


def test_demo_hydra_app_runs_in_a_subprocess(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.demo", "steps_before_fork=5", "branch_steps=5",
         "rewind_steps=2", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["tree_nodes"] > 3
    assert (out / "tree.html").exists() and list((out / "tb").glob("events.out.tfevents.*"))
