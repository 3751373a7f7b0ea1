"""The one-command world-model build (experiments.build_world_model), at CI scale: every
phase runs for real (collection on pusht-sim, the four training stages, DAgger inside the
weights just trained, the fidelity evaluation) on tiny networks and a few short episodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from experiments.build_world_model import BuildConfig, Episodes, Steps, build

PHASES = ["collect train", "collect jumps", "collect near_goal", "collect planner", "collect test",
          "train vae", "train state", "train renderer", "train dynamics", "collect dagger",
          "fine-tune state on dagger", "collect dagger2", "fine-tune state on dagger2", "evaluate"]  # fmt: skip


def _tiny(root, **kw) -> BuildConfig:
    return BuildConfig(root=str(root), tiny=True, frames=10, workers=1, threads=1,
                       episodes=Episodes(train=3, jumps=2, near_goal=2, planner=1, dagger=[1, 1], test=2),
                       steps=Steps(vae=6, state=6, renderer=6, dynamics=6, state_dagger=6),
                       dagger_samples=4, eval_episodes=2, eval_horizons=[1, 4], **kw)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        root = tmp_path_factory.mktemp("build")
        return root, build(_tiny(root))
    finally:
        torch.set_num_threads(threads)


def test_every_phase_runs_and_is_recorded(built):
    root, record = built
    assert [p["phase"] for p in record["phases"]] == PHASES
    assert json.loads((root / "build.json").read_text()) == json.loads(json.dumps(record))
    assert all(p["minutes"] >= 0 for p in record["phases"]) and record["minutes"] > 0
    by_name = {p["phase"]: p for p in record["phases"]}
    # Each DAgger round changed the state dynamics, and so the weights' identity; the
    # second round planned in (and continued) what the first one left.
    first, second = by_name["fine-tune state on dagger"], by_name["fine-tune state on dagger2"]
    assert len({by_name["train dynamics"]["weights_id"], first["weights_id"], second["weights_id"]}) == 3
    meta = json.loads((root / "weights" / "config.json").read_text())
    assert meta["weights_id"] == second["weights_id"]
    assert meta["state_dynamics_training"]["init_from"] == first["weights_id"]
    assert meta["state_dynamics_training"]["steps"] == 6 and meta["vae_steps"] == 6
    fid = by_name["evaluate"]["fidelity"]
    assert np.isfinite(fid["block_pos_err_px/k4"]["model"])
    assert (root / "eval" / "metrics.json").exists() and (root / "eval" / "strip.png").exists()
    assert (root / "tb" / "build").is_dir() and (root / "tb" / "state_dagger").is_dir()


def test_data_sets_hold_what_they_are_named_for(built):
    root, _ = built
    with np.load(root / "data" / "jumps.npz") as f:
        assert (f["policy_id"] == 3).all() and f["frames"].shape[:2] == (2, 10)
    with np.load(root / "data" / "near_goal.npz") as f:
        assert f["near_goal"].all()
    with np.load(root / "data" / "dagger.npz") as f, np.load(root / "data" / "dagger2.npz") as g:
        assert (f["policy_id"] == 4).all() and (g["policy_id"] == 4).all()
        assert not np.array_equal(f["block_pose"], g["block_pose"])  # seeds apart
    # Each DAgger set records which weights planned it.
    record = {p["phase"]: p for p in json.loads((root / "build.json").read_text())["phases"]}
    made_by = [json.loads((root / "data" / f"{n}.json").read_text())["made_by"] for n in ("dagger", "dagger2")]
    assert made_by == [record["train dynamics"]["weights_id"], record["fine-tune state on dagger"]["weights_id"]]
    assert json.loads((root / "data" / "dagger2.json").read_text())["seed"] == 8000


def test_the_weights_plan_in_the_env(built):
    import gymnasium as gym

    import arcfab_gym  # noqa: F401

    root, _ = built
    env = gym.make("ArcFabric-v0", backend_kwargs={"weights_dir": str(root / "weights")})
    obs, _ = env.reset(seed=0)
    obs, reward, *_ = env.step(env.action_space.sample())
    assert np.isfinite(reward) and env.observation_space.contains(obs)
    env.close()


def test_same_settings_same_bytes(built, tmp_path):
    """Bounded by steps and episodes, not the clock: a second build from nothing writes
    the same data and the same weights."""
    root, record = built
    threads = torch.get_num_threads()
    try:
        again = build(_tiny(tmp_path, reuse_data=False))
    finally:
        torch.set_num_threads(threads)
    assert again["phases"][-2]["weights_id"] == record["phases"][-2]["weights_id"]
    for name in ("train", "dagger2"):
        with np.load(root / "data" / f"{name}.npz") as a, np.load(tmp_path / "data" / f"{name}.npz") as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
    # And a build over finished data reuses it instead of collecting again.
    third = build(_tiny(tmp_path))
    assert all(p.get("reused") for p in third["phases"] if p["phase"].startswith("collect")
               and not p["phase"].startswith("collect dagger"))
    assert third["phases"][-2]["weights_id"] == record["phases"][-2]["weights_id"]


@pytest.mark.parametrize("change, message", [
    (dict(steps=Steps(vae=0)), "every phase a step"),
    (dict(eval_episodes=5), "more than the 2 held-out episodes"),
])  # fmt: skip
def test_bad_budgets_are_refused_by_name(tmp_path, change, message):
    cfg = _tiny(tmp_path)
    with pytest.raises(ValueError, match=message):
        build(BuildConfig(**{**cfg.__dict__, **change}))
