"""State-only steps of mini-dreamzero (``step_batch(render=False)``): the task state advances
at once, the frame's video is generated when read -- with the same bits as ``step()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arcfab_gym import StateMismatchError, WorldStateSnapshot
from arcfab_gym.models.base import ModelState
from planners.world import reward_objective, sequence_evaluator

pytestmark = pytest.mark.usefixtures("one_thread")


def _actions(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 2)).astype(np.float32)


def _assert_same_state(a: ModelState, b: ModelState) -> None:
    assert a.meta == b.meta
    assert sorted(a.tensors) == sorted(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]) or (
            # the coverage head's column is NaN in both or equal
            k == "frame_info" and np.array_equal(a.tensors[k].numpy(), b.tensors[k].numpy(), equal_nan=True)
        ), k


def _eager(model, root: ModelState, actions: np.ndarray):
    model.load_state(root)
    outs = [model.step(a) for a in actions]
    return model.extract_state(), outs


def _lazy(model, root: ModelState, actions: np.ndarray):
    state, outs = root, []
    for a in actions:
        (state,), (out,) = model.step_batch([state], a[None], render=False)
        outs.append(out)
    return state, outs


def test_state_only_steps_render_later_to_the_bits_of_step(tiny_model):
    m = tiny_model
    root = m.extract_state()
    # Past the attention window, so that pending frames also slide the window.
    actions = _actions(m.local_attn_size + 3)
    eager, eager_outs = _eager(m, root, actions)
    lazy, lazy_outs = _lazy(m, root, actions)
    assert lazy.meta["rendered_frames"] == 1 and lazy.meta["current_start_frame"] == len(actions) + 1
    for e, z in zip(eager_outs, lazy_outs):  # the state path is the same at once
        for key in e.observation:
            np.testing.assert_array_equal(e.observation[key], z.observation[key], strict=True)
        assert (e.reward, e.terminated) == (z.reward, z.terminated)
        assert np.isnan(z.info["coverage_head"]) and not np.isnan(e.info["coverage_head"])
    m.load_state(lazy)
    frame = m.decode_frame(m.frame_count - 1)  # reading a frame renders what is pending
    rendered = m.extract_state()
    _assert_same_state(rendered, eager)
    m.load_state(eager)
    np.testing.assert_array_equal(frame, m.decode_frame(m.frame_count - 1), strict=True)


def test_a_full_step_after_state_only_steps_renders_them_first(tiny_model):
    m = tiny_model
    root = m.extract_state()
    actions = _actions(4, seed=1)
    eager, _ = _eager(m, root, actions)
    lazy, _ = _lazy(m, root, actions[:3])
    m.load_state(lazy)
    m.step(actions[3])
    _assert_same_state(m.extract_state(), eager)


def test_a_pending_state_survives_a_snapshot_file(tiny_model, tmp_path):
    m = tiny_model
    root = m.extract_state()
    actions = _actions(3, seed=2)
    eager, _ = _eager(m, root, actions)
    lazy, _ = _lazy(m, root, actions)
    m.load_state(lazy)
    path = WorldStateSnapshot.from_model(m).save(tmp_path / "pending.safetensors")
    m.load_state(WorldStateSnapshot.load(path).model_state)
    assert m.extract_state().meta["rendered_frames"] == 1
    m.propose_actions(1)  # the proposal head reads the current frame: renders it
    _assert_same_state(m.extract_state(), eager)


def test_embed_renders_a_pending_state_on_a_copy(tiny_model):
    m = tiny_model
    root = m.extract_state()
    actions = _actions(2, seed=3)
    eager, _ = _eager(m, root, actions)
    lazy, _ = _lazy(m, root, actions)
    np.testing.assert_array_equal(m.embed(lazy), m.embed(eager), strict=True)
    assert lazy.meta["rendered_frames"] == 1  # the state handed in is left as it was


def test_a_state_whose_rendered_count_disagrees_with_its_video_is_refused(tiny_model):
    (lazy,), _ = tiny_model.step_batch([tiny_model.extract_state()], _actions(1), render=False)
    for bad in (0, 2, 5):
        with pytest.raises(StateMismatchError, match="rendered_frames"):
            tiny_model.load_state(ModelState(lazy.tensors, {**lazy.meta, "rendered_frames": bad}))


def test_planning_without_rendering_returns_the_same_values(tiny_model):
    m = tiny_model
    root = m.extract_state()
    seqs = _actions(5 * 3, seed=4).reshape(5, 3, 2)
    kwargs = dict(objective=reward_objective, discount=0.9)
    full = sequence_evaluator(m, root, render=True, **kwargs)(seqs)
    state_only = sequence_evaluator(m, root, render=False, **kwargs)(seqs)
    np.testing.assert_array_equal(full, state_only, strict=True)
