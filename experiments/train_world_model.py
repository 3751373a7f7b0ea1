"""Train ``mini-dreamzero`` on collected Push-T episodes: the VAE, the state dynamics
(the state token), then the video dynamics conditioned on the state.

    python -m experiments.train_world_model stage=vae minutes=15
    python -m experiments.train_world_model stage=state minutes=10
    python -m experiments.train_world_model stage=renderer minutes=5
    python -m experiments.train_world_model stage=dynamics minutes=55
    python -m experiments.train_world_model stage=all tiny=true      # seconds, for CI

Logs go to TensorBoard under the run directory (losses, PSNR, reconstructions, predicted
vs. real rollouts as images); weights are saved as safetensors to ``out_dir`` (by default
the package's shipped weights folder is left alone: pass ``out_dir=`` to write there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from arcfab_gym.atomic import write_atomic
from arcfab_gym.models.mini_dreamzero.network import (
    DynamicsConfig,
    RendererConfig,
    StateDynamics,
    StateDynamicsConfig,
    StateRenderer,
    WorldTransformer,
)
from arcfab_gym.models.mini_dreamzero.vae import FrameVAE, VAEConfig, frames_to_tensor, psnr


@dataclass
class TrainConfig:
    """Arguments of world-model training."""

    stage: str = "all"
    """vae, state, renderer, dynamics, or all (the four in that order)."""
    train_data: Any = "data/pusht_train.npz"
    """Episodes from experiments.collect: one .npz, or a list of them (concatenated)."""
    test_data: str = "data/pusht_test.npz"
    """Held-out episodes (for the logged metrics)."""
    out_dir: str = "runs/weights"
    """Where vae.safetensors, dynamics.safetensors and config.json go."""
    minutes: float | None = 15.0
    """Wall-clock budget of the stage (each stage when stage=all). The learning-rate
    schedule follows the budget, so a timed run is seeded but not bit-reproducible;
    ``minutes=null`` bounds the stage by ``max_steps`` alone, and two such runs are
    bit-identical."""
    max_steps: int = 1_000_000
    """Step limit (whichever comes first)."""
    batch_size: int = 32
    """Frames (VAE) or clips (dynamics) per step."""
    clip_frames: int = 8
    """Frames per training clip (dynamics)."""
    lr: float = 2e-3
    """Peak learning rate (cosine decay to 5 % over the budget)."""
    seed: int = 0
    """Torch and sampling seed."""
    threads: int = 2
    """torch CPU threads."""
    log_every: int = 50
    """Steps between TensorBoard scalars."""
    image_every: int = 500
    """Steps between TensorBoard images."""
    tiny: bool = False
    """A few steps of tiny models on a slice of the data (tests, CI)."""
    action_repeat: int = 4
    """Control steps per frame in the data (experiments.collect's action_repeat)."""
    init_from: str | None = None
    """Continue training the dynamics (stage=dynamics) or the state dynamics (stage=state)
    from the weights in this folder (same VAE)."""
    residual: bool = True
    """Flow target: the change from the previous latent (True) or the next latent itself."""
    state_map: bool = True
    """Condition every frame's tokens on a picture of its task state (the state token)."""
    anchor: str = "render"
    """What the residual flow's change is measured from: ``render`` (the latent the
    renderer draws from the frame's state: needs stage=renderer first) or ``previous``
    (the previous latent)."""
    renderer_width: int = 64
    """Channels of the state renderer (stage=renderer)."""
    state_horizon: int = 8
    """Frames the state dynamics is unrolled over in training (its own predictions fed back)."""
    state_batch: int = 512
    """Windows per step of the state dynamics (per ensemble member)."""
    state_readout: str = "mean"
    """What the state follows with several members: their ``mean``, or the ``first``
    (e.g. the one kept from ``init_from`` when the new ones only measure the doubt)."""
    state_members: int = 1
    """Ensemble members of the state dynamics. With ``init_from`` holding fewer, those are
    kept as they are (frozen) and the new ones trained from scratch beside them, each on
    its own random windows."""


ConfigStore.instance().store(name="train_world_model_schema", node=TrainConfig)


def _lr(step_frac: float, peak: float) -> float:
    warm = min(1.0, step_frac / 0.03)
    return peak * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step_frac, 1.0))))


def _optimise(opt: torch.optim.Optimizer, params, loss: torch.Tensor) -> None:
    """One step of every stage: backward, gradients clipped to norm 1, update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _budget(cfg: TrainConfig, t0: float, step: int) -> float:
    """Fraction of the budget used (time or steps)."""
    if cfg.minutes is None:
        return step / cfg.max_steps
    return max((time.perf_counter() - t0) / (cfg.minutes * 60), step / cfg.max_steps)


#: Per-episode flags that older data files lack (see experiments.collect).
_OPTIONAL_FLAGS = ("near_goal",)


def load_npz(paths: str | Sequence[str], tiny: bool,
             keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Episodes from one .npz file, or from several concatenated along the episode axis;
    ``keys``: only these arrays (the state's phases skip the frames, nearly all of the
    bytes)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    parts = []
    for path in paths:
        with np.load(path, allow_pickle=False) as f:
            missing = sorted(set(keys or ()) - set(f.files) - set(_OPTIONAL_FLAGS))
            if missing:
                raise ValueError(f"{path} holds no {', '.join(missing)} (it has {sorted(f.files)})")
            parts.append({k: f[k] for k in f.files if keys is None or k in keys})
            n = len(f["actions"])
        # Files written before a per-episode flag existed did not have it: it is False.
        for key in _OPTIONAL_FLAGS:
            if keys is None or key in keys:
                parts[-1].setdefault(key, np.zeros(n, dtype=bool))
        if set(parts[-1]) != set(parts[0]):
            raise ValueError(f"{path} holds {sorted(parts[-1])}, {paths[0]} {sorted(parts[0])}")
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]
    if tiny:
        data = {k: v[:8] for k, v in data.items()}
    return data


def train_vae(cfg: TrainConfig, writer: SummaryWriter, out_dir: Path) -> FrameVAE:
    train = load_npz(cfg.train_data, cfg.tiny)["frames"]
    test = load_npz(cfg.test_data, cfg.tiny)["frames"]
    frames = train.reshape(-1, *train.shape[2:])  # [N, S, S, 3]
    held = frames_to_tensor(test[:, :: max(1, test.shape[1] // 8)].reshape(-1, *test.shape[2:])[:256])
    vae = FrameVAE(VAEConfig(frame_size=frames.shape[1], width=16 if cfg.tiny else 64))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=1e-4)
    rng = np.random.default_rng(cfg.seed)
    t0, step = time.perf_counter(), 0
    bar = tqdm(desc="vae", unit="step", total=None)
    while _budget(cfg, t0, step) < 1.0:
        for g in opt.param_groups:
            g["lr"] = _lr(_budget(cfg, t0, step), cfg.lr)
        batch = frames_to_tensor(frames[rng.integers(len(frames), size=cfg.batch_size * 2)])
        loss, parts = vae.loss(batch)
        _optimise(opt, vae.parameters(), loss)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            writer.add_scalar("vae/loss", loss.item(), step)
            writer.add_scalar("vae/recon", parts["recon"].item(), step)
            writer.add_scalar("vae/kl", parts["kl"].item(), step)
            writer.add_scalar("vae/lr", opt.param_groups[0]["lr"], step)
        if step % cfg.image_every == 0 or _budget(cfg, t0, step) >= 1.0:
            with torch.no_grad():
                recon = vae.decode(vae.encode(held))
                p = psnr(recon, held).mean().item()
            writer.add_scalar("vae/heldout_psnr", p, step)
            bar.set_postfix(psnr=f"{p:.2f}", loss=f"{loss.item():.4f}")
            writer.add_images("vae/real_top_recon_bottom", torch.cat([held[:8], recon[:8]]), step)
    bar.close()
    with torch.no_grad():
        sample = frames_to_tensor(frames[rng.integers(len(frames), size=2048)])
        std = torch.cat([vae.encode_dist(c)[0] for c in sample.split(256)]).std()
    vae.latent_scale.fill_(float(std))
    save_file(vae.state_dict(), str(out_dir / "vae.safetensors"))
    _update_config(out_dir, {"vae": asdict(vae.cfg), "vae_steps": step})
    return vae


#: What the state dynamics trains on.
_STATE_KEYS = ("agent_pos", "block_pose", "actions")


def _state_arrays(data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    from arcfab_gym.models.mini_dreamzero import features

    return {
        "state": torch.from_numpy(features.state_from_poses(data["agent_pos"], data["block_pose"])),
        "actions": torch.from_numpy(data["actions"].astype(np.float32)),
    }


@torch.no_grad()
def _open_loop_errors(model: StateDynamics, data: dict, horizons=(1, 4, 16)) -> dict[str, float]:
    """Open-loop errors on held-out episodes from frame 1 (two real states): block
    position (px), block angle (rad), pusher (px) at each horizon; copy-last beside."""
    from arcfab_gym.models.mini_dreamzero import features

    st, act = data["state"], data["actions"]
    horizons = [k for k in horizons if k + 1 < st.shape[1]]
    H = max(horizons, default=0)
    prev, now = st[:, 0], st[:, 1]
    out: dict[str, float] = {}
    for k in range(1, H + 1):
        prev, now = now, model(now, prev, act[:, k], act[:, k - 1])
        if k in horizons:
            real = st[:, k + 1]
            pa, pb = features.poses_from_state(now.numpy())
            ra, rb = features.poses_from_state(real.numpy())
            _, cb = features.poses_from_state(st[:, 1].numpy())
            out[f"block_px/k{k}"] = float(np.linalg.norm(pb[:, :2] - rb[:, :2], axis=-1).mean())
            out[f"block_rad/k{k}"] = float(np.mean(np.abs((pb[:, 2] - rb[:, 2] + np.pi) % (2 * np.pi) - np.pi)))
            out[f"pusher_px/k{k}"] = float(np.linalg.norm(pa - ra, axis=-1).mean())
            out[f"copy_last_block_px/k{k}"] = float(np.linalg.norm(cb[:, :2] - rb[:, :2], axis=-1).mean())
    return out


def train_state(cfg: TrainConfig, writer: SummaryWriter, out_dir: Path) -> StateDynamics:
    """The state token's dynamics: an MLP over (state now, state before, action) trained
    unrolled over ``state_horizon`` frames of its own predictions."""
    from arcfab_gym.models.mini_dreamzero.training import (
        measure_delta_scale,
        state_dynamics_loss,
        state_windows,
        with_rest_frame,
    )

    train = _state_arrays(load_npz(cfg.train_data, cfg.tiny, _STATE_KEYS))
    test = _state_arrays(load_npz(cfg.test_data, cfg.tiny, _STATE_KEYS))
    scfg = (StateDynamicsConfig(hidden=32, layers=2, members=cfg.state_members, readout=cfg.state_readout)
            if cfg.tiny else StateDynamicsConfig(members=cfg.state_members, readout=cfg.state_readout))
    windows = with_rest_frame(train)
    st, act = windows["state"], windows["actions"]
    init_id, frozen = None, 0
    if cfg.init_from is not None and (Path(cfg.init_from) / "state_dynamics.safetensors").exists():
        # Continue from trained weights: their scales and linear path stay as they are;
        # members beyond theirs start from scratch, theirs stay frozen.
        init_meta = json.loads((Path(cfg.init_from) / "config.json").read_text())
        init = StateDynamics.load(Path(cfg.init_from) / "state_dynamics.safetensors", init_meta["state_dynamics"])
        init_cfg = init.cfg
        init_id = init_meta.get("weights_id")
        if cfg.state_members <= init_cfg.members:
            scfg, model = init_cfg, init
        else:
            scfg = StateDynamicsConfig(hidden=init_cfg.hidden, layers=init_cfg.layers,
                                       members=cfg.state_members, readout=cfg.state_readout)
            model = StateDynamics(scfg)
            frozen = init_cfg.members
            with torch.no_grad():
                for dst, src in zip([*model.weight, *model.bias], [*init.weight, *init.bias]):
                    dst[:frozen] = src
                model.linear.load_state_dict(init.linear.state_dict())
                model.delta_scale.copy_(init.delta_scale)
    else:
        model = StateDynamics(scfg)
        model.delta_scale.copy_(measure_delta_scale(train))
        model.fit_linear(st[:, 1:-1].flatten(0, 1), st[:, :-2].flatten(0, 1), act[:, 1:].flatten(0, 1),
                         act[:, :-1].flatten(0, 1), st[:, 2:].flatten(0, 1))
    kept = [p[:frozen].clone() for p in [*model.weight, *model.bias]] if frozen else []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr * 0.5, weight_decay=1e-5)
    rng = np.random.default_rng(cfg.seed)
    horizon = min(cfg.state_horizon, train["state"].shape[1] - 2)
    t0, step = time.perf_counter(), 0
    bar = tqdm(desc="state", unit="step", total=None)
    history: list[float] = []
    first: list[float] = []
    while _budget(cfg, t0, step) < 1.0:
        frac = _budget(cfg, t0, step)
        for g in opt.param_groups:
            g["lr"] = _lr(frac, cfg.lr * 0.5)
        # The unroll grows from 2 frames to the full horizon over the first third.
        h = max(2, min(horizon, int(2 + (horizon - 2) * frac * 3)))
        E = scfg.members
        states, actions = state_windows(windows, h, cfg.state_batch * E, rng)
        loss, per_frame, err = state_dynamics_loss(
            model, states.unflatten(0, (E, cfg.state_batch)), actions.unflatten(0, (E, cfg.state_batch)))
        _optimise(opt, params, loss)
        if frozen:
            with torch.no_grad():  # the kept members, exactly as loaded (weight decay too)
                for p, k in zip([*model.weight, *model.bias], kept):
                    p[:frozen] = k
        step += 1
        bar.update(1)
        history.append(loss.item())
        first.append(per_frame[0].item())
        if step % cfg.log_every == 0:
            writer.add_scalar("state/loss", np.mean(history[-cfg.log_every:]), step)
            # The first unrolled frame's loss: comparable while the unroll grows.
            writer.add_scalar("state/loss_first_frame", np.mean(first[-cfg.log_every:]), step)
            writer.add_scalar("state/unroll_frames", h, step)
            writer.add_scalar("state/lr", opt.param_groups[0]["lr"], step)
            writer.add_scalar("state/train_block_px_last_frame", err[-1].item(), step)
        if step % (cfg.log_every * 10) == 0 or _budget(cfg, t0, step) >= 1.0:
            model.eval()
            errs = _open_loop_errors(model, test)
            model.train()
            for k, v in errs.items():
                writer.add_scalar(f"state_heldout/{k}", v, step)
            bar.set_postfix(loss=f"{np.mean(history[-cfg.log_every:]):.4f}",
                            **{k.split("/")[1]: f"{v:.1f}px" for k, v in errs.items()
                               if k.startswith("block_px/")})
    bar.close()
    model.eval()
    errs = _open_loop_errors(model, test)
    save_file(model.state_dict(), str(out_dir / "state_dynamics.safetensors"))
    _update_config(out_dir, {
        "weights_id": weights_id(out_dir),
        "state_dynamics": asdict(scfg),
        "state_dynamics_training": {
            "init_from": init_id, "steps": step, "minutes": round((time.perf_counter() - t0) / 60, 1),
            "episodes": int(train["state"].shape[0]), "horizon": horizon,
            "final_loss": float(np.mean(history[-50:])), "heldout": errs,
        },
    })  # fmt: skip
    return model


def _load_vae(out_dir: Path) -> FrameVAE:
    meta = json.loads((out_dir / "config.json").read_text())
    vae = FrameVAE(VAEConfig(**meta["vae"]))
    vae.load_state_dict(load_file(str(out_dir / "vae.safetensors")))
    return vae.eval()


def _load_renderer(out_dir: Path) -> StateRenderer:
    meta = json.loads((out_dir / "config.json").read_text())
    if "renderer" not in meta or not (out_dir / "renderer.safetensors").exists():
        raise FileNotFoundError(f"no state renderer in {out_dir}: run stage=renderer first "
                                "(or pass anchor=previous)")
    renderer = StateRenderer(RendererConfig(**meta["renderer"]))
    renderer.load_state_dict(load_file(str(out_dir / "renderer.safetensors")))
    return renderer.eval().requires_grad_(False)


@torch.no_grad()
def _renderer_metrics(renderer: StateRenderer, vae: FrameVAE, data: dict, n: int = 256) -> dict:
    """On held-out frames: latent MSE to the VAE's, the rendered frame's PSNR against the
    real one, and the IoU of the T found in it with the T at the true pose."""
    from experiments.evaluate_world_model import mask_iou, t_mask_at_pose, t_mask_from_frame

    from arcfab_gym.models.mini_dreamzero import features
    from arcfab_gym.models.mini_dreamzero.training import goal_maps
    from arcfab_gym.models.mini_dreamzero.vae import tensor_to_frames

    E, T = data["state"].shape[:2]
    idx = torch.linspace(0, E * T - 1, min(n, E * T)).long()
    state = data["state"].flatten(0, 1)[idx]
    z = data["z"].flatten(0, 1)[idx]
    pred = renderer(state, goal_maps(data["prompt_id"].repeat_interleave(T)[idx], renderer.cfg.map_size))
    frames = data["frames"].reshape(E * T, *data["frames"].shape[2:])[idx.numpy()]
    decoded = vae.decode(pred)
    _, poses = features.poses_from_state(state.numpy())
    drawn = tensor_to_frames(decoded)
    size = frames.shape[1]
    iou = [mask_iou(t_mask_from_frame(f), t_mask_at_pose(p, size)) for f, p in zip(drawn, poses)]
    return {
        "latent_mse": float(((pred - z) ** 2).mean()),
        "psnr": float(psnr(decoded, frames_to_tensor(frames)).mean()),
        "t_iou": float(np.mean(iou)),
        "strip": np.concatenate([np.concatenate(list(frames[:8]), 1), np.concatenate(list(drawn[:8]), 1)], 0),
    }


def train_renderer(cfg: TrainConfig, writer: SummaryWriter, out_dir: Path) -> StateRenderer:
    """The state renderer: task state + goal map -> the VAE's latent of that frame."""
    from arcfab_gym.models.mini_dreamzero.training import encode_episodes, goal_maps

    vae = _load_vae(out_dir)
    train = encode_episodes(vae, load_npz(cfg.train_data, cfg.tiny), coverage=False)
    test = encode_episodes(vae, load_npz(cfg.test_data, cfg.tiny), coverage=False)
    rcfg = RendererConfig(width=8 if cfg.tiny else cfg.renderer_width, blocks=1 if cfg.tiny else 2,
                          latent_channels=vae.cfg.latent_channels)  # fmt: skip
    renderer = StateRenderer(rcfg)
    opt = torch.optim.AdamW(renderer.parameters(), lr=cfg.lr, weight_decay=1e-5)
    E, T = train["state"].shape[:2]
    states, z = train["state"].flatten(0, 1), train["z"].flatten(0, 1)
    prompts = train["prompt_id"].repeat_interleave(T)  # each frame's prompt
    rng = np.random.default_rng(cfg.seed)
    t0, step = time.perf_counter(), 0
    bar = tqdm(desc="renderer", unit="step", total=None)
    history: list[float] = []
    while _budget(cfg, t0, step) < 1.0:
        for g in opt.param_groups:
            g["lr"] = _lr(_budget(cfg, t0, step), cfg.lr)
        i = torch.from_numpy(rng.integers(len(states), size=cfg.batch_size * 4))
        pred = renderer(states[i], goal_maps(prompts[i], rcfg.map_size))
        loss = torch.nn.functional.mse_loss(pred, z[i])
        _optimise(opt, renderer.parameters(), loss)
        step += 1
        bar.update(1)
        history.append(loss.item())
        if step % cfg.log_every == 0:
            writer.add_scalar("renderer/loss", np.mean(history[-cfg.log_every:]), step)
            writer.add_scalar("renderer/lr", opt.param_groups[0]["lr"], step)
        if step % cfg.image_every == 0 or _budget(cfg, t0, step) >= 1.0:
            renderer.eval()
            m = _renderer_metrics(renderer, vae, test)
            renderer.train()
            for k in ("latent_mse", "psnr", "t_iou"):
                writer.add_scalar(f"renderer_heldout/{k}", m[k], step)
            writer.add_image("renderer/real_top_rendered_bottom", m["strip"], step, dataformats="HWC")
            bar.set_postfix(loss=f"{np.mean(history[-cfg.log_every:]):.4f}", psnr=f"{m['psnr']:.1f}",
                            iou=f"{m['t_iou']:.2f}")
    bar.close()
    renderer.eval()
    m = _renderer_metrics(renderer, vae, test)
    save_file(renderer.state_dict(), str(out_dir / "renderer.safetensors"))
    _update_config(out_dir, {
        "renderer": asdict(rcfg), "weights_id": weights_id(out_dir),
        "renderer_training": {
            "steps": step, "minutes": round((time.perf_counter() - t0) / 60, 1),
            "threads": cfg.threads, "episodes": int(E),
            "heldout": {k: m[k] for k in ("latent_mse", "psnr", "t_iou")},
        },
    })  # fmt: skip
    return renderer


def train_dynamics(cfg: TrainConfig, writer: SummaryWriter, out_dir: Path) -> WorldTransformer:
    # Imported here (not at module top) so a VAE-only run needs none of it; imported
    # eagerly here so a long run is not affected by later edits of the backend module.
    import arcfab_gym.models.mini_dreamzero.backend  # noqa: F401
    from arcfab_gym.models.mini_dreamzero.training import (
        ClipSampler,
        dynamics_loss,
        encode_episodes,
        open_loop_rollout,
        render_anchors,
    )

    meta = json.loads((out_dir / "config.json").read_text())
    vae = _load_vae(out_dir)
    train = encode_episodes(vae, load_npz(cfg.train_data, cfg.tiny))
    test = encode_episodes(vae, load_npz(cfg.test_data, cfg.tiny))
    renderer = None
    if cfg.anchor == "render":
        renderer = _load_renderer(out_dir)
        train["anchor"], test["anchor"] = render_anchors(renderer, train), render_anchors(renderer, test)
    dcfg = DynamicsConfig(d_model=32, n_heads=2, n_layers=2) if cfg.tiny else DynamicsConfig()
    init_id = None
    if cfg.init_from is not None:
        init_meta = json.loads((Path(cfg.init_from) / "config.json").read_text())
        dcfg = DynamicsConfig(**init_meta["dynamics"])
        init_id = init_meta.get("weights_id")
    if cfg.state_map != dcfg.state_map:
        dcfg = dataclasses.replace(dcfg, state_map=cfg.state_map)
    new_target = cfg.residual != dcfg.residual or (cfg.residual and cfg.anchor != dcfg.anchor)
    if new_target:
        z = train["z"]
        if not cfg.residual:
            delta_scale = 1.0
        elif cfg.anchor == "render":
            delta_scale = float((z - train["anchor"]).std())
        else:
            delta_scale = float((z[:, 1:] - z[:, :-1]).std())
        dcfg = dataclasses.replace(dcfg, residual=cfg.residual, anchor=cfg.anchor, delta_scale=delta_scale)
    state_net = StateDynamics.load(out_dir / "state_dynamics.safetensors", meta["state_dynamics"])
    state_net.eval()
    net = WorldTransformer(dcfg)
    if cfg.init_from is not None:
        weights = load_file(str(Path(cfg.init_from) / "dynamics.safetensors"))
        old = weights["in_proj.weight"]
        if old.shape[1] < net.in_proj.weight.shape[1]:
            # Weights trained without the state map: its input columns start at zero, so
            # the network begins as the one it was and learns to read the map.
            grown = torch.zeros_like(net.in_proj.weight)
            grown[:, : old.shape[1]] = old
            weights["in_proj.weight"] = grown
        net.load_state_dict(weights)
        if new_target:
            # The flow's target changed: the velocity head starts again from zero.
            torch.nn.init.zeros_(net.velocity.weight)
            torch.nn.init.zeros_(net.velocity.bias)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr * 0.5, weight_decay=1e-4)
    sampler = ClipSampler(train, cfg.clip_frames, np.random.default_rng(cfg.seed))
    test_sampler = ClipSampler(test, cfg.clip_frames, np.random.default_rng(cfg.seed + 1))
    t0, step = time.perf_counter(), 0
    bar = tqdm(desc="dynamics", unit="step", total=None)
    history: list[float] = []
    while _budget(cfg, t0, step) < 1.0:
        for g in opt.param_groups:
            g["lr"] = _lr(_budget(cfg, t0, step), cfg.lr * 0.5)
        net.train()
        loss, parts = dynamics_loss(net, sampler.sample(cfg.batch_size))
        _optimise(opt, net.parameters(), loss)
        step += 1
        bar.update(1)
        history.append(loss.item())
        if step % cfg.log_every == 0:
            for k, v in parts.items():
                writer.add_scalar(f"dynamics/{k}", v, step)
            writer.add_scalar("dynamics/lr", opt.param_groups[0]["lr"], step)
            net.eval()
            with torch.no_grad():
                test_loss, test_parts = dynamics_loss(net, test_sampler.sample(cfg.batch_size))
            writer.add_scalar("dynamics/heldout_loss", test_loss.item(), step)
            bar.set_postfix(loss=f"{np.mean(history[-cfg.log_every:]):.4f}",
                            held=f"{test_loss.item():.4f}")
        if step % cfg.image_every == 0 or _budget(cfg, t0, step) >= 1.0:
            net.eval()
            strip = open_loop_rollout(net, vae, state_net, test, episode=0, start=4, horizon=12,
                                      renderer=renderer)
            writer.add_image("dynamics/real_top_predicted_bottom", strip, step, dataformats="HWC")
    bar.close()
    save_file(net.state_dict(), str(out_dir / "dynamics.safetensors"))
    _update_config(out_dir, {
        "dynamics": asdict(dcfg), "dynamics_steps": step,
        "dynamics_final_loss": float(np.mean(history[-50:])),
        "action_repeat": cfg.action_repeat, "weights_id": weights_id(out_dir),
        "dynamics_training": {
            "init_from": init_id, "steps": step, "threads": cfg.threads,
            "minutes": round((time.perf_counter() - t0) / 60, 1),
            "episodes": int(len(train["z"])), "lr_peak": cfg.lr * 0.5,
        },
    })  # fmt: skip
    return net


def weights_id(out_dir: Path) -> str:
    """The weights' identity: a digest of every weights file in ``out_dir`` (and of an
    ensemble's state-dynamics settings)."""
    digest = hashlib.sha256()
    for name in ("dynamics.safetensors", "vae.safetensors", "state_dynamics.safetensors",
                 "renderer.safetensors"):
        if (out_dir / name).exists():
            digest.update((out_dir / name).read_bytes())
    config = out_dir / "config.json"
    sd_cfg = json.loads(config.read_text()).get("state_dynamics", {}) if config.exists() else {}
    if sd_cfg.get("members", 1) > 1:  # an ensemble's readout changes the states it makes
        digest.update(json.dumps(sd_cfg, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file: never half written."""
    write_atomic(path, json.dumps(obj, indent=1))


def _update_config(out_dir: Path, values: dict) -> None:
    path = out_dir / "config.json"
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta.update(values)
    write_json(path, meta)


def train(cfg: TrainConfig, run_dir: Path) -> Path:
    stages = {"vae": train_vae, "state": train_state, "renderer": train_renderer,
              "dynamics": train_dynamics}  # fmt: skip
    if cfg.stage not in (*stages, "all"):
        raise ValueError(f"unknown stage {cfg.stage!r}: choose {', '.join(stages)} or all")
    if cfg.anchor not in ("render", "previous"):
        raise ValueError(f"anchor must be render or previous, got {cfg.anchor!r}")
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run_dir / "tb"))
    writer.add_text("config", "```\n" + json.dumps(asdict(cfg), indent=1) + "\n```")
    for i, (name, run) in enumerate(stages.items()):
        if cfg.stage in (name, "all"):
            torch.manual_seed(cfg.seed + i)  # each stage reproducible on its own
            run(cfg, writer, out_dir)
    writer.close()
    return out_dir


@hydra.main(version_base=None, config_path="../configs", config_name="train_world_model")
def main(cfg) -> None:
    tcfg = TrainConfig(**OmegaConf.to_container(cfg, resolve=True))
    out = train(tcfg, Path(HydraConfig.get().runtime.output_dir))
    print(f"weights in {out}")


if __name__ == "__main__":
    main()
