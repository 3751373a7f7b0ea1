"""The world-model evaluation app: on tiny random weights and a tiny collected dataset it
writes every metric for every horizon, the pictures and a TensorBoard run. Only facts that
hold for any model are checked (the data's own copy-last baseline, shapes, keys, files)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.collect import CollectConfig, collect_episode
from experiments.evaluate_world_model import (
    HORIZON_METRICS,
    SOURCES,
    STRIP_FRAMES,
    EvalConfig,
    changed_mask,
    evaluate,
    rank_auc,
    start_points,
    wrap_angle,
)

ROOT = Path(__file__).resolve().parents[1]
HORIZONS = [1, 4, 16]
FRAMES = 24


@pytest.fixture(scope="module")
def tiny_test_data(tmp_path_factory) -> Path:
    """3 collected episodes of 24 frames in experiments.collect's format."""
    cfg = CollectConfig(frames=FRAMES, frame_size=64, seed=100)
    eps = [collect_episode(cfg, i) for i in range(3)]
    path = tmp_path_factory.mktemp("eval_data") / "test.npz"
    np.savez(path, **{k: np.stack([ep[k] for ep in eps]) for k in eps[0]})
    return path


@pytest.fixture(scope="module")
def evaluated(tiny_weights_dir, tiny_test_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    cfg = EvalConfig(weights_dir=str(tiny_weights_dir), test_data=str(tiny_test_data),
                     episodes=3, horizons=HORIZONS, starts_per_episode=2, threads=1,
                     out_dir=str(out))  # fmt: skip
    return evaluate(cfg), out


def test_every_metric_for_every_horizon(evaluated):
    metrics, out = evaluated
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["n_episodes"] == 3 and metrics["n_rollouts"] == 3 * 2
    assert set(metrics["horizons"]) == {str(k) for k in HORIZONS}
    for k, (key, _, _) in itertools.product(HORIZONS, HORIZON_METRICS):
        entry = metrics["horizons"][str(k)][key]
        assert set(SOURCES) <= set(entry), (k, key)
        for src in SOURCES:
            v = entry[src]
            assert v is None or math.isfinite(v), (k, key, src, v)
        if key != "changed_mse":  # the others are defined for every rollout
            assert entry["n"] == metrics["n_rollouts"]
            assert entry["model"] is not None and entry["copy_last"] is not None
    assert math.isfinite(metrics["vae"]["psnr"])
    assert metrics["vae"]["n_frames"] == 3 * FRAMES


def test_copy_last_baseline_is_sane(evaluated):
    """The baseline is the data's own: errors >= 0, zero-free at k >= 1 only if the scene
    moved, and on average a frame is closer to the next one than to one 16 frames on."""
    metrics, _ = evaluated
    h = metrics["horizons"]
    for k, (key, _, _) in itertools.product(HORIZONS, HORIZON_METRICS):
        if key != "psnr" and h[str(k)][key]["copy_last"] is not None:
            assert h[str(k)][key]["copy_last"] >= 0.0
            assert h[str(k)][key]["model"] >= 0.0
    p1, p16 = h["1"]["psnr"]["copy_last"], h["16"]["psnr"]["copy_last"]
    assert math.isfinite(p1) and p1 > p16
    assert h["1"]["agent_pos_err_px"]["copy_last"] <= h["16"]["agent_pos_err_px"]["copy_last"]
    # Pixels do change over 16 frames, so the changed-pixel MSE is defined there.
    assert h["16"]["changed_mse"]["copy_last"] is not None
    assert h["16"]["changed_mse"]["copy_last"] > 0.05**2 / 3  # by the mask's definition


def test_reward_head_metrics(evaluated):
    metrics, _ = evaluated
    rh = metrics["reward_head"]
    assert 0.0 <= rh["coverage_mae"] <= 1.0
    assert rh["n_frames"] == metrics["n_rollouts"] * metrics["config"]["context"]
    auc = rh["success_auc"]
    assert auc == "n/a" if rh["n_success_frames"] in (0, rh["n_frames"]) else 0.0 <= auc <= 1.0


def test_files_pictures_and_tensorboard(evaluated):
    metrics, out = evaluated
    table = (out / "metrics.md").read_text()
    for k in HORIZONS:
        assert f"k={k} model" in table and f"k={k} copy-last" in table
    assert "PSNR (dB)" in table and "success AUC" in table
    strip = imread(out / "strip.png")
    # Two episodes x (real row, imagined row) of 64 px frames, 16 frames a row.
    assert strip.shape[0] == 2 * (64 + 1 + 64) + 4 and strip.shape[1] == STRIP_FRAMES * 65 - 1
    assert imread(out / "fidelity.png").ndim == 3
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()
    assert {"psnr/model", "psnr/copy_last", "block_pos_err_px/model", "vae/psnr"} <= set(
        tags["scalars"]
    )
    assert [e.step for e in events.Scalars("psnr/copy_last")] == HORIZONS
    assert {"rollouts/real_vs_imagined", "fidelity/vs_horizon"} <= set(tags["images"])


def test_rank_auc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        scores = rng.integers(0, 5, size=n).astype(float)  # many ties
        labels = rng.random(n) < 0.4
        pos, neg = scores[labels], scores[~labels]
        if len(pos) == 0 or len(neg) == 0:
            assert rank_auc(scores, labels) is None
            continue
        pairs = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
        assert rank_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert rank_auc([0.1, 0.9], [False, True]) == 1.0
    assert rank_auc([0.9, 0.1], [False, True]) == 0.0
    assert rank_auc([0.3, 0.5], [True, True]) is None


def test_small_helpers():
    assert wrap_angle(2 * math.pi - 0.1) == pytest.approx(0.1)
    assert wrap_angle(-3 * math.pi) == pytest.approx(math.pi)
    last = np.zeros((2, 2, 3), np.float32)
    target = last.copy()
    target[0, 0, 1] = 0.2
    target[1, 1, 2] = 0.01
    assert changed_mask(last, target).tolist() == [[True, False], [False, False]]
    assert start_points(64, 4, 16, 4) == [0, 15, 29, 44]
    assert start_points(20, 4, 16, 3) == [0]
    with pytest.raises(ValueError, match="too few"):
        start_points(19, 4, 16, 1)


def test_hydra_app_runs_in_a_subprocess(tiny_weights_dir, tiny_test_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate_world_model",
         f"weights_dir={tiny_weights_dir}", f"test_data={tiny_test_data}", "episodes=1",
         "horizons=[1,2]", "starts_per_episode=1", "threads=1", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| PSNR (dB)" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["horizons"]) == {"1", "2"} and metrics["n_rollouts"] == 1
    assert (out / "strip.png").exists() and list((out / "tb").glob("events.out.tfevents.*"))
