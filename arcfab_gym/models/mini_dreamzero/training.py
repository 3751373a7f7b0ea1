"""Training pieces for mini-dreamzero: data encoding, clip sampling, the teacher-forced
flow-matching loss over a block-causal sequence, and the unrolled loss of the state
dynamics."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from arcfab_gym.models.mini_dreamzero import features
from arcfab_gym.models.mini_dreamzero.features import (
    flow_target,
    normalise_pos,
    pusher_features,
)
from arcfab_gym.models.mini_dreamzero.network import (
    StateDynamics,
    StateRenderer,
    WorldTransformer,
    patchify,
)
from arcfab_gym.models.mini_dreamzero.vae import FrameVAE, frames_to_tensor
from arcfab_gym.tasks import pusht

#: Std of the noise added to context latents in training, so that rollouts on the
#: model's own (imperfect) frames stay in distribution.
CONTEXT_NOISE = 0.1
#: Share of rows trained without text (the unconditional CFG branch).
TEXT_DROPOUT = 0.1


#: Jitter of the teacher-forced state maps in training (px, rad), so the video follows a
#: predicted state that is a little off.
STATE_MAP_JITTER = (4.0, 0.05)
#: Weights of the state dynamics' scaled change columns (``features.DELTA_NAMES``) in its
#: loss. The pusher's change has a large spread (it crosses the workspace in a frame), so
#: unit weight in scaled units left it several px off; the pusher must be within 3 px.
STATE_LOSS_WEIGHTS = (4.0, 4.0, 1.0, 1.0, 1.0)


def block_features(pose: np.ndarray) -> np.ndarray:
    """[..., 3] (x, y, angle) -> [..., 4] (x, y normalised, sin, cos)."""
    return np.concatenate(
        [normalise_pos(pose[..., :2]), np.sin(pose[..., 2:3]), np.cos(pose[..., 2:3])], axis=-1
    ).astype(np.float32)


@torch.no_grad()
def encode_episodes(vae: FrameVAE, data: dict[str, np.ndarray], chunk: int = 128, *,
                    coverage: bool = True) -> dict:
    """Episodes from ``experiments.collect`` -> tensors for training (latents, targets);
    ``coverage=False`` skips the coverage of every prompt (zeros: the slow part)."""
    frames = data["frames"]  # [E, T, S, S, 3]
    E, T = frames.shape[:2]
    flat = frames.reshape(E * T, *frames.shape[2:])
    z = torch.cat([vae.encode(frames_to_tensor(flat[i : i + chunk])) for i in range(0, len(flat), chunk)])
    poses = data["block_pose"].astype(np.float64)
    cov = np.zeros((E, T, len(pusht.PROMPTS)), np.float32)
    for k, p in enumerate(pusht.PROMPTS if coverage else ()):
        cov[..., k] = pusht.coverages(poses.reshape(E * T, 3), pusht.goal_pose(p)).reshape(E, T)
    return {
        "z": z.view(E, T, *z.shape[1:]),  # [E, T, C, S, S]
        "agent": torch.from_numpy(normalise_pos(data["agent_pos"]).astype(np.float32)),
        "actions": torch.from_numpy(data["actions"].astype(np.float32)),  # [E, T-1, 2]
        "block": torch.from_numpy(block_features(poses)),  # [E, T, 4]
        "state": torch.from_numpy(features.state_from_poses(data["agent_pos"], poses)),  # [E, T, 6]
        "coverage": torch.from_numpy(cov),  # [E, T, n_prompts]
        "prompt_id": torch.from_numpy(data["prompt_id"].astype(np.int64)),
        "frames": frames,
    }


@torch.no_grad()
def render_anchors(renderer: StateRenderer, data: dict, chunk: int = 256) -> torch.Tensor:
    """The latent ``renderer`` draws for every frame's true state ``[E, T, C, S, S]``: the
    anchor of a flow with ``anchor = "render"`` (frozen while the video trains)."""
    E, T = data["state"].shape[:2]
    state = data["state"].flatten(0, 1)
    prompt = data["prompt_id"].repeat_interleave(T)
    size = renderer.cfg.map_size
    out = torch.cat([renderer(state[i : i + chunk], goal_maps(prompt[i : i + chunk], size))
                     for i in range(0, len(state), chunk)])  # fmt: skip
    return out.view(E, T, *out.shape[1:])


def goal_maps(prompt_id: torch.Tensor, size: int) -> torch.Tensor:
    """Prompt indices ``[N]`` -> their goal maps ``[N, 1, size, size]``."""
    return features.goal_map(pusht.PROMPTS, size)[prompt_id]


class ClipSampler:
    """Random clips of ``T`` consecutive frames from encoded episodes."""

    def __init__(self, data: dict, clip_frames: int, rng: np.random.Generator):
        self.data, self.T, self.rng = data, clip_frames, rng
        self.E, self.L = data["z"].shape[:2]
        if self.L < clip_frames:
            raise ValueError(f"episodes have {self.L} frames, clips need {clip_frames}")

    def sample(self, batch: int) -> dict[str, torch.Tensor]:
        d, T = self.data, self.T
        e = torch.from_numpy(self.rng.integers(self.E, size=batch))
        s = torch.from_numpy(self.rng.integers(self.L - T + 1, size=batch))
        idx = s[:, None] + torch.arange(T)  # [B, T]
        prev = (idx - 1).clamp_min(0)
        ee = e[:, None]
        out = {
            "z": d["z"][ee, idx],  # [B, T, C, S, S]
            "ys": d["z"][e, 0],  # [B, C, S, S] first frame of the episode
            "agent": d["agent"][ee, idx],  # [B, T, 2]
            "agent_prev": d["agent"][ee, prev],  # [B, T, 2]
            "actions": d["actions"][ee, idx[:, :-1]],  # [B, T-1, 2]
            "block": d["block"][ee, idx],  # [B, T, 4]
            "state": d["state"][ee, idx],  # [B, T, 6]
            "coverage": d["coverage"][ee, idx],  # [B, T, P]
            "prompt_id": d["prompt_id"][e],  # [B]
            "start": s,  # [B]
        }
        if "anchor" in d:
            out["anchor"] = d["anchor"][ee, idx]  # [B, T, C, S, S] rendered from the state
        return out


@functools.lru_cache(maxsize=8)
def training_mask(n_blocks: int, tf: int) -> torch.Tensor:
    """Block-causal mask [L, L] over ``n_blocks`` clean blocks (``tf`` tokens each) then
    ``n_blocks`` noisy blocks (``tf + 2`` tokens: frame, action, state). Clean block i
    sees clean blocks <= i; noisy block j (predicting frame j+1) sees clean blocks <= j
    and itself -- what the KV cache gives at inference."""
    tn = tf + 2
    lc, ln = n_blocks * tf, n_blocks * tn
    clean_block = torch.arange(lc) // tf
    noisy_block = torch.arange(ln) // tn
    mask = torch.zeros(lc + ln, lc + ln, dtype=torch.bool)
    mask[:lc, :lc] = clean_block[:, None] >= clean_block[None, :]
    mask[lc:, :lc] = noisy_block[:, None] >= clean_block[None, :]
    mask[lc:, lc:] = noisy_block[:, None] == noisy_block[None, :]
    return mask


def dynamics_loss(net: WorldTransformer, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    cfg = net.cfg
    z, ys = batch["z"], batch["ys"]
    B, T = z.shape[:2]
    n, tf, d = T - 1, cfg.tokens_per_frame, cfg.d_model
    ids = net.tokenize([cfg.prompts[i] for i in batch["prompt_id"].tolist()])
    null = torch.rand(B) < TEXT_DROPOUT if net.training else torch.zeros(B, dtype=torch.bool)
    cross = net.cross_context(net.encode_text(ids, null), net.encode_image(ys))
    ys_rep = ys[:, None].expand(B, n, *ys.shape[1:]).flatten(0, 1)
    # Clean context blocks 0..T-2, slightly noised.
    sigma = torch.rand(B, 1, 1, 1, 1) * CONTEXT_NOISE if net.training else torch.zeros(B, 1, 1, 1, 1)
    zc = z[:, :n] + sigma * torch.randn_like(z[:, :n])
    smap_clean = smap_next = None
    if cfg.state_map:
        maps = net.map_tokens(jitter_states(batch["state"]).flatten(0, 1)).view(B, T, tf, -1)
        smap_clean, smap_next = maps[:, :n].flatten(0, 1), maps[:, 1:].flatten(0, 1)
    clean = net.frame_tokens(zc.flatten(0, 1), ys_rep, torch.ones(B * n), smap_clean).view(B, n * tf, d)
    # Noisy blocks 1..T-1 (flow matching: x_t = t x1 + (1 - t) eps, velocity x1 - eps).
    anchor = batch["anchor"][:, 1:] if cfg.anchor == "render" else z[:, :n]
    x1 = flow_target(cfg, z[:, 1:], anchor)
    eps = torch.randn_like(x1)
    # Noise levels: half logit-normal (most learning happens at middle t), half uniform,
    # so that t near 0 -- where sampling starts and the context must carry the frame --
    # is trained too.
    t = torch.where(torch.rand(B, n) < 0.5, torch.sigmoid(torch.randn(B, n) * 1.2 + 0.3),
                    torch.rand(B, n))
    xt = t[..., None, None, None] * x1 + (1 - t[..., None, None, None]) * eps
    noisy = net.frame_tokens(xt.flatten(0, 1), ys_rep, t.flatten(), smap_next).view(B, n, tf, d)
    state = pusher_features(batch["agent"][:, :n], batch["agent_prev"][:, :n])
    ctrl = net.control_tokens(batch["actions"].flatten(0, 1), state.flatten(0, 1)).view(B, n, 2, d)
    seq = torch.cat([clean, torch.cat([noisy, ctrl], dim=2).view(B, n * (tf + 2), d)], dim=1)
    offset = batch["start"].float()[:, None]
    pos = torch.cat(
        [
            (torch.arange(n).repeat_interleave(tf)[None] + offset),
            (torch.arange(1, T).repeat_interleave(tf + 2)[None] + offset),
        ],
        dim=1,
    )  # [B, L]
    hidden, _ = net.run(seq, pos, cross, mask=training_mask(n, tf))
    h_clean = hidden[:, : n * tf].view(B, n, tf, d)
    h_noisy = hidden[:, n * tf :].view(B, n, tf + 2, d)
    v_pred = net.velocity(h_noisy[:, :, :tf])
    v_true = patchify(x1 - eps, cfg.patch)
    loss_fm = F.mse_loss(v_pred, v_true)
    loss_agent = F.mse_loss(net.next_agent(h_noisy[:, :, tf + 1]), batch["agent"][:, 1:])
    # Heads on clean frames, asked about the episode's goal or another prompt's.
    goal = torch.where(torch.rand(B) < 0.5, batch["prompt_id"], torch.randint(len(cfg.prompts), (B,)))
    goal_text = net.encode_text(net.tokenize([cfg.prompts[i] for i in goal.tolist()]))
    heads = net.heads(h_clean, goal_text[:, None].expand(B, n, *goal_text.shape[1:]))
    cov = batch["coverage"][:, :n].gather(-1, goal[:, None, None].expand(B, n, 1)).squeeze(-1)
    loss_cov = F.mse_loss(heads["coverage"], cov)
    success = (cov > pusht.SUCCESS_THRESHOLD).float()
    loss_succ = F.binary_cross_entropy_with_logits(heads["success_logit"], success)
    loss_block = F.mse_loss(heads["block_pose"], batch["block"][:, :n])
    nll = mdn_nll(heads, batch["actions"])
    loss = loss_fm + 2.0 * loss_agent + 4.0 * loss_cov + 0.2 * loss_succ + loss_block + 0.02 * nll
    parts = {
        "flow": loss_fm.item(), "agent": loss_agent.item(), "coverage": loss_cov.item(),
        "success": loss_succ.item(), "block_pose": loss_block.item(), "action_nll": nll.item(),
    }  # fmt: skip
    return loss, parts


def jitter_states(state: torch.Tensor) -> torch.Tensor:
    """States ``[..., 6]`` moved by ``STATE_MAP_JITTER`` (positions px, angle rad)."""
    pos_px, ang = STATE_MAP_JITTER
    out = state.clone()
    out[..., 0:4] += torch.randn_like(out[..., 0:4]) * (pos_px / (pusht.WORLD_SIZE / 2))
    theta = torch.atan2(state[..., 4], state[..., 5]) + torch.randn_like(state[..., 4]) * ang
    out[..., 4], out[..., 5] = torch.sin(theta), torch.cos(theta)
    return out


def with_rest_frame(data: dict) -> dict:
    """States and actions of ``data`` with a frame -1 before each episode: the first
    state again, reached by the resting action (so windows can start the way a history
    starts, the pusher at rest, with no earlier frame)."""
    st, act = data["state"], data["actions"]
    rest = features.resting_action(st[:, :1])
    return {"state": torch.cat([st[:, :1], st], 1), "actions": torch.cat([rest, act], 1)}


def state_windows(data: dict, horizon: int, batch: int, rng: np.random.Generator):
    """Random windows of ``horizon + 2`` states ``[B, H+2, 6]`` and the ``horizon + 1``
    actions between them ``[B, H+1, 2]`` (action k leads from state k to k+1; the first
    is the one that led to the window's current state)."""
    states, actions = data["state"], data["actions"]
    E, T = states.shape[:2]
    e = torch.from_numpy(rng.integers(E, size=batch))[:, None]
    s = torch.from_numpy(rng.integers(T - horizon - 1, size=batch))[:, None]
    idx = s + torch.arange(horizon + 2)
    return states[e, idx], actions[e, idx[:, :-1]]


def state_dynamics_loss(model: StateDynamics, states: torch.Tensor, actions: torch.Tensor):
    """Unrolled loss over ``H`` frames: from the two real states at the start, the model
    feeds its own predictions back; at every frame its scaled change is compared with the
    change that would lead from *its* current state to the real next one (so it learns to
    correct its own drift). ``states`` ``[E, B, H+2, 6]`` and ``actions`` ``[E, B, H+1, 2]``
    give each ensemble member its own windows (``[B, ...]`` for one member), and each
    member unrolls its own predictions. Returns the loss (summed over members, so each
    member learns as it would alone), the per-frame losses and the per-frame block position
    errors (px), both averaged over members."""
    if states.dim() == 3:
        states, actions = states[None], actions[None]
    prev, now = states[:, :, 0], states[:, :, 1]
    weights = torch.tensor(STATE_LOSS_WEIGHTS) / (sum(STATE_LOSS_WEIGHTS) / len(STATE_LOSS_WEIGHTS))
    losses, err = [], []
    for k in range(actions.shape[2] - 1):
        target = features.delta_target(now, states[:, :, k + 2]) / model.delta_scale
        pred = model.member_deltas(now, prev, actions[:, :, k + 1], actions[:, :, k])
        losses.append((((pred - target) ** 2) * weights).mean(dim=(1, 2)).sum())
        prev, now = now, features.apply_delta(now, pred * model.delta_scale)
        err.append(((now[..., 2:4] - states[:, :, k + 2, 2:4]).norm(dim=-1) * (pusht.WORLD_SIZE / 2)).mean())
    per_frame = torch.stack(losses)
    return per_frame.mean(), per_frame.detach() / states.shape[0], torch.stack(err).detach()


@torch.no_grad()
def measure_delta_scale(data: dict) -> torch.Tensor:
    """Per-column std of the state change over the data ``[5]`` (floored)."""
    st = data["state"]
    d = features.delta_target(st[:, :-1], st[:, 1:]).reshape(-1, features.DELTA_DIM)
    return d.std(0).clamp_min(1e-4)


def mdn_nll(heads: dict, actions: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``actions`` [..., 2] under the proposal mixture."""
    logits, mean, log_std = heads["mdn_logits"], heads["mdn_mean"], heads["mdn_log_std"]
    a = actions[..., None, :]  # [..., 1, 2]
    comp = -0.5 * (((a - mean) / log_std.exp()) ** 2).sum(-1) - log_std.sum(-1)
    return -(torch.logsumexp(F.log_softmax(logits, -1) + comp, dim=-1)).mean()


@torch.no_grad()
def imagine(model, frames: np.ndarray, agent_pos: np.ndarray, block_pose: np.ndarray,
            actions: np.ndarray, prompt: str, *, context: int, horizon: int, seed: int = 0) -> list[int]:
    """Teacher-force ``context`` real frames (and their task states) into ``model`` (a
    MiniDreamZero), then roll out ``horizon`` frames open-loop under the recorded actions.
    Returns the indices of the imagined frames in the model's history (decode them with
    ``model.decode_frame``)."""
    model.start_from_frame(frames[0], agent_pos[0], block_pose[0], prompt=prompt, seed=seed)
    for t in range(1, context):
        model.step(actions[t - 1])
        model.resync(frames[t], agent_pos[t], block_pose[t])
    for t in range(context, context + horizon):
        model.step(actions[t - 1])
    return list(range(context, context + horizon))


@torch.no_grad()
def open_loop_rollout(net, vae, state_net, data: dict, *, episode: int, start: int,
                      horizon: int, renderer: StateRenderer | None = None) -> np.ndarray:
    """A picture for TensorBoard: real frames (top) and frames imagined open-loop from
    frame ``start`` under the recorded actions (bottom), uint8 ``[2S, horizon*S, 3]``."""
    from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero, Weights

    weights = Weights(vae=vae, net=net, state_net=state_net, meta={}, source="training",
                      renderer=renderer)
    model = MiniDreamZero(_weights=weights)
    frames = data["frames"][episode]
    agent, block = features.poses_from_state(data["state"][episode].numpy())
    prompt = pusht.PROMPTS[int(data["prompt_id"][episode])]
    horizon = min(horizon, len(frames) - start)
    idx = imagine(model, frames, agent, block, data["actions"][episode].numpy(), prompt,
                  context=start, horizon=horizon)
    real = np.concatenate(list(frames[start : start + horizon]), axis=1)
    pred = np.concatenate([model.decode_frame(i) for i in idx], axis=1)
    return np.concatenate([real, pred], axis=0)
