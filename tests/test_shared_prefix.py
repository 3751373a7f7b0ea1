"""Batched steps of forks attend to their shared cached frames once (``SharedPrefixCache``),
and give what stepping each fork alone gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arcfab_gym.models.mini_dreamzero import backend as mdz
from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero
from arcfab_gym.models.mini_dreamzero.network import SharedPrefixCache, shared_prefix_attention
from arcfab_gym.tasks import pusht
from conftest import solo_steps_matching

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("with_rest", [False, True])
def test_shared_prefix_attention_is_attention_over_all_keys(with_rest):
    g = torch.Generator().manual_seed(0)
    B, H, n, hd, lp, lr = 5, 2, 3, 8, 7, 4
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(2 * B, H, n, hd), r(2 * B, H, n, hd), r(2 * B, H, n, hd)
    pk, pv = r(2, H, lp, hd), r(2, H, lp, hd)
    rk, rv = (r(2 * B, H, lr, hd), r(2 * B, H, lr, hd)) if with_rest else (None, None)
    mask = None
    if with_rest:  # world 1 has one own frame fewer (left-padded)
        valid = torch.ones(B, lr + n, dtype=torch.bool)
        valid[1, :2] = False
        mask = valid.repeat_interleave(2, 0)[:, None, None, :]
    got = shared_prefix_attention(q, k, v, SharedPrefixCache(pk, pv, rk, rv), mask)
    # The reference: every world's prefix copied out (rows 2b, 2b + 1 = its branches).
    keys = [pk.repeat(B, 1, 1, 1)] + ([rk] if with_rest else []) + [k]
    values = [pv.repeat(B, 1, 1, 1)] + ([rv] if with_rest else []) + [v]
    full_mask = None if mask is None else torch.cat([torch.ones(2 * B, 1, 1, lp, dtype=torch.bool), mask], -1)
    want = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=full_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_forks_sharing_frames_step_as_they_would_alone(tiny_weights_dir):
    """States of one rollout at frames 2, 3 and 5 share their first two cache blocks (the
    very same tensors) and differ after: the batch takes the shared path (checked), with
    the worlds' own frames padded and masked, and matches single steps."""
    m = MiniDreamZero(weights_dir=tiny_weights_dir, local_attn_size=16)
    m.start(pusht.PROMPTS[0], seed=0)
    rng = np.random.default_rng(3)
    states = []
    for k in range(5):
        m.step(rng.uniform(-1, 1, 2).astype(np.float32))
        if k in (1, 2, 4):
            states.append(m.extract_state())
    states += [states[0]] * 2  # and plain forks of one state
    worlds = [m._world_from_state(s, include_rng=True) for s in states]
    assert mdz._common_prefix([w.blocks for w in worlds]) == 3  # the start frame and two steps
    actions = rng.uniform(-1, 1, (len(states), 2)).astype(np.float32)
    next_states, outs = m.step_batch(states, actions)
    for _, ns, solo in solo_steps_matching(m, states, actions, next_states, outs):
        for key in ns.tensors:
            if key.startswith("kv_cache/"):
                solo_block = solo.extract_state().tensors[key]
                np.testing.assert_allclose(ns.tensors[key].numpy(), solo_block.numpy(), atol=1e-4)


def test_the_copied_layout_gives_the_same_futures(tiny_weights_dir, monkeypatch):
    """``share_prefix = False`` (what benchmarks/model_step.py compares against) stacks
    every fork's cache; the futures match the shared path, which is the one taken."""
    m = MiniDreamZero(weights_dir=tiny_weights_dir)
    m.start(pusht.PROMPTS[0], seed=0)
    rng = np.random.default_rng(4)
    for _ in range(4):
        m.step(rng.uniform(-1, 1, 2).astype(np.float32))
    states = [m.extract_state()] * 6
    actions = rng.uniform(-1, 1, (6, 2)).astype(np.float32)
    taken = []
    real = mdz._common_prefix
    monkeypatch.setattr(mdz, "_common_prefix", lambda blocks: taken.append(real(blocks)) or taken[-1])
    shared, _ = m.step_batch(states, actions)
    assert taken and set(taken) == {5}  # the shared path: the start frame and four steps
    calls = len(taken)
    m.share_prefix = False
    copied, _ = m.step_batch(states, actions)
    assert len(taken) == calls  # not looked for at all
    for a, b in zip(shared, copied):
        for key in a.tensors:
            if key.startswith(("kv_cache/", "latent_video/", "task_state")):
                np.testing.assert_allclose(a.tensors[key].numpy(), b.tensors[key].numpy(), atol=1e-4)
