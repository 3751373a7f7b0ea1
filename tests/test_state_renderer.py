"""The state renderer: the video flow of mini-dreamzero measures its change from the latent
drawn for the frame's own (predicted) task state, so a rollout's frames cannot drift
from its state."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from arcfab_gym.models.mini_dreamzero import features
from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero, Weights
from arcfab_gym.models.mini_dreamzero.network import RendererConfig, StateRenderer
from arcfab_gym.tasks import pusht

P0 = pusht.DEFAULT_PROMPT

pytestmark = pytest.mark.usefixtures("one_thread")


def _rollout(weights_dir, n: int = 5):
    m = MiniDreamZero(weights_dir=weights_dir)
    m.start(P0, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(n):
        m.step(rng.uniform(-0.5, 0.5, 2).astype(np.float32))
    return m


def test_generated_latents_are_the_renderers_drawing_plus_the_flow(tiny_weights_dir, tmp_path):
    """Swap only the renderer's weights: the first generated latent moves by exactly the
    difference of the two renderers' drawings of its predicted state (the flow, the
    cache and the state are the same); later frames also see the changed frames in
    their caches, so there the drawing's difference dominates but is not all. Fails if
    the anchor is the previous latent or is ignored."""
    other = tmp_path / "other_renderer"
    shutil.copytree(tiny_weights_dir, other)
    weights = load_file(str(other / "renderer.safetensors"))
    torch.manual_seed(7)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()},
              str(other / "renderer.safetensors"))
    a, b = _rollout(tiny_weights_dir), _rollout(other)
    ra, rb = a.weights.renderer, b.weights.renderer
    goal = ra.goal_maps([P0])
    moved = 0
    for f in range(1, a.frame_count):
        state = torch.from_numpy(a._w.task[f][None])
        np.testing.assert_array_equal(state.numpy(), b._w.task[f][None])
        want = (rb(state, goal) - ra(state, goal))[0]
        got = b.latent(f) - a.latent(f)
        if f == 1:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        else:
            assert (got - want).norm() < 0.5 * want.norm()
        moved += int(want.abs().max() > 1e-3)
    assert moved == a.frame_count - 1


def test_renderer_reads_the_goal_and_the_state():
    """Each input changes the drawing: the T's pose, the pusher, the goal region."""
    torch.manual_seed(0)
    r = StateRenderer(RendererConfig(width=16, blocks=1)).eval()
    s = torch.from_numpy(features.state_from_poses([[100.0, 100.0]], [[256.0, 300.0, 0.3]]))
    moved_t = torch.from_numpy(features.state_from_poses([[100.0, 100.0]], [[300.0, 300.0, 0.3]]))
    moved_pusher = torch.from_numpy(features.state_from_poses([[400.0, 100.0]], [[256.0, 300.0, 0.3]]))
    with torch.no_grad():
        base = r(s, r.goal_maps([P0]))
        assert r.goal_maps([P0]).shape == (1, 1, 64, 64)
        for other in (r(moved_t, r.goal_maps([P0])), r(moved_pusher, r.goal_maps([P0])),
                      r(s, r.goal_maps([pusht.PROMPTS[3]]))):
            assert (other - base).abs().max() > 1e-3


def test_anchored_weights_without_a_renderer_get_a_clear_error(tiny_weights_dir, tmp_path):
    broken = tmp_path / "no_renderer"
    shutil.copytree(tiny_weights_dir, broken)
    (broken / "renderer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="stage=renderer"):
        Weights.load(broken)
    meta = json.loads((tiny_weights_dir / "config.json").read_text())
    assert meta["dynamics"]["anchor"] == "render"


def test_unknown_anchor_is_refused():
    from arcfab_gym.models.mini_dreamzero.network import DynamicsConfig

    with pytest.raises(ValueError, match="anchor"):
        DynamicsConfig(anchor="last")


@pytest.mark.slow
def test_shipped_video_shows_the_t_where_the_state_says():
    """Shipped weights, fresh pokes far from the training seeds: 4 frames open loop, the T
    found in the decoded frame overlaps the T drawn at the predicted pose (the issue's
    target: IoU 0.7 at k = 4)."""
    from experiments.collect import CollectConfig, collect_episode
    from experiments.evaluate_world_model import mask_iou, t_mask_at_pose, t_mask_from_frame
    from arcfab_gym.models.mini_dreamzero.training import imagine

    cfg = CollectConfig(frames=12, random_policy_fraction=0.0, poke_policy_fraction=1.0, seed=5_100_000)
    model = MiniDreamZero()
    ious = []
    for i in range(6):
        ep = collect_episode(cfg, i)
        idx = imagine(model, ep["frames"], ep["agent_pos"], ep["block_pose"], ep["actions"], P0,
                      context=4, horizon=4)
        frame = model.decode_frame(idx[-1])
        _, pose = features.poses_from_state(model._w.task[idx[-1]])
        ious.append(mask_iou(t_mask_from_frame(frame), t_mask_at_pose(pose, frame.shape[0])))
    assert np.mean(ious) >= 0.7, ious
