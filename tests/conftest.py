"""Shared fixtures: a tiny random-weight ``mini-dreamzero`` (no trained weights needed)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

TINY_WEIGHTS_ID = "tiny-random"


def make_tiny_weights(out: Path, *, seed: int = 0, weights_id: str = TINY_WEIGHTS_ID) -> Path:
    """Write a tiny random-weight mini-dreamzero (VAE width 16, 2 layers of width 32)."""
    from safetensors.torch import save_file

    from arcfab_gym.models.mini_dreamzero.network import (
        DynamicsConfig,
        RendererConfig,
        StateDynamics,
        StateDynamicsConfig,
        StateRenderer,
        WorldTransformer,
    )
    from arcfab_gym.models.mini_dreamzero.vae import FrameVAE, VAEConfig

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        vae = FrameVAE(VAEConfig(width=16))
        net = WorldTransformer(DynamicsConfig(d_model=32, n_heads=2, n_layers=2, residual=True,
                                              delta_scale=0.5, state_map=True, anchor="render"))
        renderer = StateRenderer(RendererConfig(width=8, blocks=1))
        # The state dynamics: small random changes of the state (a few px a frame).
        # Two members whose last layers differ, so the ensemble's disagreement is not zero.
        state_net = StateDynamics(StateDynamicsConfig(hidden=32, layers=2, members=2))
        state_net.delta_scale.copy_(torch.tensor([0.02, 0.02, 0.01, 0.01, 0.02]))
        torch.nn.init.normal_(state_net.weight[-1], std=0.05)
        # The velocity head starts at zero (good for training, useless here: every frame
        # would be pure noise whatever the cache, prompt or action). Make it random too.
        torch.nn.init.normal_(net.velocity.weight, std=0.3)
        torch.nn.init.normal_(net.velocity.bias, std=0.1)
    finally:
        torch.random.set_rng_state(state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(vae.state_dict(), str(out / "vae.safetensors"))
    save_file(net.state_dict(), str(out / "dynamics.safetensors"))
    save_file(state_net.state_dict(), str(out / "state_dynamics.safetensors"))
    save_file(renderer.state_dict(), str(out / "renderer.safetensors"))
    cfg = {"vae": asdict(vae.cfg), "dynamics": asdict(net.cfg), "action_repeat": 4,
           "state_dynamics": asdict(state_net.cfg), "renderer": asdict(renderer.cfg),
           "weights_id": weights_id}  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (and do not fight a busy machine for two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("tiny_mdz"))


@pytest.fixture
def tiny_model(tiny_weights_dir):
    from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero
    from arcfab_gym.tasks import pusht

    model = MiniDreamZero(weights_dir=tiny_weights_dir)
    model.start(pusht.DEFAULT_PROMPT, seed=0)
    yield model
    model.close()


def solo_steps_matching(model, states, actions, next_states, outs):
    """Step each of ``states`` alone (a spawned copy of ``model``) with its action and check
    that the batched result -- ``next_states``, ``outs`` of ``model.step_batch`` -- gives
    its last latent (within 1e-4) and reward; yields ``(state, next_state, solo)`` for the
    caller's further checks."""
    import numpy as np

    for state, action, ns, out in zip(states, actions, next_states, outs):
        solo = model.spawn()
        solo.load_state(state)
        want = solo.step(action)
        got = ns.tensors[sorted(k for k in ns.tensors if k.startswith("latent_video/"))[-1]][-1]
        np.testing.assert_allclose(got.numpy(), solo.latent(solo.frame_count - 1).numpy(), atol=1e-4)
        assert out.reward == pytest.approx(want.reward, abs=1e-4)
        yield state, ns, solo
