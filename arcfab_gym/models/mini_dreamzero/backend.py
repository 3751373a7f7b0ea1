"""``mini-dreamzero``: a DreamZero-shaped world-action model of Push-T, as a backend.

Its working state has DreamZero's shape (``WANPolicyHead.lazy_joint_video_action``):

* ``kv_cache``: per layer, self-attention keys/values ``[2, B, L, heads, head_dim]`` for the
  conditional and the unconditional (CFG) branch, appended one frame block at a time
  (``num_frame_per_block = 1``) and truncated to ``local_attn_size`` frames; only
  observation tokens are cached, never the action and state tokens;
* ``crossattn_cache``: per layer, keys/values over the prompt tokens and ``clip_feas``;
* ``clip_feas`` (first-frame image tokens) and ``ys`` (first-frame VAE latent);
* the accumulated latent video, the language token ids (the reset key),
  ``current_start_frame``, the seed and the torch RNG state.

**Checkpoints share their prefix.** Every cache block and every latent chunk is a tensor
that is never written again once made (copy-on-write by construction: the live model
appends new tensors and drops references, it never edits one). ``extract_state`` hands out
references, so a checkpoint costs O(new frames), and a tree of checkpoints holds each
frame's bytes once; the store counts unique storage.

Per call (``step``): the frozen cache is gathered once; the next frame's latent is
denoised by few-step flow matching from seeded noise, with CFG over the two branches,
conditioned on the action and the pusher state; then the new frame block is written into
both caches, which also runs the heads (coverage, success, block pose, action proposals).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from arcfab_gym.errors import StateMismatchError
from arcfab_gym.models.base import ModelState, StepOutput, WorldModel
from arcfab_gym.models.mini_dreamzero.network import (
    DynamicsConfig,
    WorldTransformer,
    patchify,
    unpatchify,
)
from arcfab_gym.models.mini_dreamzero.training import normalise_pos, state_features
from arcfab_gym.models.mini_dreamzero.vae import FrameVAE, VAEConfig, frames_to_tensor
from arcfab_gym.tasks import pusht

#: Frames per latent-video chunk: full chunks are shared between checkpoints, the last
#: partial one is copied (at most LATENT_CHUNK - 1 frames).
LATENT_CHUNK = 8
#: Columns of the per-frame record: agent x, y; block x, y, angle; coverage; success
#: probability; 1 if the frame came from the real world (encoded) rather than generated.
FRAME_INFO_COLUMNS = 8
STATE_VERSION = 1


def default_weights_dir() -> Path:
    return Path(str(resources.files("arcfab_gym.models.mini_dreamzero") / "weights"))


@dataclass
class Weights:
    """The trained networks (shared, read-only, between spawned instances)."""

    vae: FrameVAE
    net: WorldTransformer
    meta: dict[str, Any]
    source: str

    @classmethod
    def load(cls, weights_dir: str | Path | None = None) -> Weights:
        root = Path(weights_dir) if weights_dir is not None else default_weights_dir()
        cfg_path = root / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(
                f"no mini-dreamzero weights in {root} (config.json missing); train them with "
                "`python -m experiments.train_world_model out_dir=...` or pass weights_dir="
            )
        meta = json.loads(cfg_path.read_text())
        vae = FrameVAE(VAEConfig(**meta["vae"]))
        vae.load_state_dict(load_file(str(root / "vae.safetensors")))
        net = WorldTransformer(DynamicsConfig(**meta["dynamics"]))
        net.load_state_dict(load_file(str(root / "dynamics.safetensors")))
        for m in (vae, net):
            m.eval()
            m.requires_grad_(False)
        return cls(vae=vae, net=net, meta=meta, source=str(root))


class MiniDreamZero(WorldModel):
    """The learned Push-T world model behind the backend contract.

    Args:
        weights_dir: folder with ``config.json``, ``vae.safetensors``,
            ``dynamics.safetensors`` (default: the weights shipped in the package).
        cfg_scale: classifier-free guidance scale over the prompt (1 = conditional only;
            both caches are kept either way).
        num_denoise_steps: Euler steps of flow matching per frame.
        local_attn_size: frames the self-attention cache keeps (default: the trained one).
        action_repeat: control steps per frame the model was trained with (fixed by the
            data; stated so pusht-sim can be set to match).
    """

    name = "mini-dreamzero"
    prompts = pusht.PROMPTS

    def __init__(
        self,
        *,
        weights_dir: str | Path | None = None,
        cfg_scale: float = 1.5,
        num_denoise_steps: int = 4,
        local_attn_size: int | None = None,
        _weights: Weights | None = None,
    ):
        self.weights = _weights if _weights is not None else Weights.load(weights_dir)
        self.weights_dir = None if weights_dir is None else str(weights_dir)
        self.net, self.vae = self.weights.net, self.weights.vae
        c = self.net.cfg
        self.cfg_scale = float(cfg_scale)
        if int(num_denoise_steps) < 1:
            raise ValueError(f"num_denoise_steps must be >= 1, got {num_denoise_steps}")
        self.num_denoise_steps = int(num_denoise_steps)
        self.local_attn_size = int(local_attn_size or c.local_attn_size)
        self.action_repeat = int(self.weights.meta.get("action_repeat", 4))
        self.frame_size = int(self.vae.cfg.frame_size)
        self._renderer: pusht.FrameRenderer | None = None
        self._gen = torch.Generator()
        self._clear()

    def _clear(self) -> None:
        self._language: torch.Tensor | None = None  # [Lt] int64, the reset key
        self._prompt = pusht.DEFAULT_PROMPT
        self._seed = 0
        self._text: torch.Tensor | None = None  # [1, Lt, d] conditional prompt tokens
        self._ys: torch.Tensor | None = None  # [1, C, S, S] first-frame latent
        self._clip_feas: torch.Tensor | None = None  # [1, n_img, d]
        self._cross: list | None = None  # per layer (k, v) [2, H, Lc, hd]; row 0 cond
        self._blocks: list[torch.Tensor] = []  # per cached frame [layers, 2, 2, H, T_F, hd]
        self._cache_start = 0  # frame index of self._blocks[0]
        self._chunks: list[torch.Tensor] = []  # latent video, [<=LATENT_CHUNK, C, S, S] each
        self._info: list[np.ndarray] = []  # per frame [FRAME_INFO_COLUMNS]
        self._proposal: torch.Tensor | None = None  # [n_mixture, 5] of the current frame
        self.last_reset_reason: str | None = None

    # --- life cycle -------------------------------------------------------------------------
    def start(self, prompt, seed, initial_state=None):
        self.check_prompt(prompt)
        if initial_state is None:
            initial_state = pusht.sample_initial_state(np.random.default_rng(seed))
        initial_state = np.asarray(initial_state, dtype=np.float64)
        if initial_state.shape != (5,) or not np.all(np.isfinite(initial_state)):
            raise ValueError(f"initial_state must be 5 finite numbers, got {initial_state!r}")
        if self._renderer is None:
            self._renderer = pusht.FrameRenderer(self.frame_size)
        # Render the real first frame the way gym-pusht would show it.
        block = _legacy_block_pose(initial_state)
        frame = self._renderer.render(initial_state[:2], block, pusht.goal_pose(prompt))
        return self.start_from_frame(frame, initial_state[:2], prompt=prompt, seed=seed)

    @torch.no_grad()
    def start_from_frame(self, frame: np.ndarray, agent_pos, *, prompt: str, seed: int):
        """Begin a history from a real RGB frame ``[S, S, 3]`` and the pusher position."""
        self.check_prompt(prompt)
        frame = self._check_frame(frame)
        latent = self.vae.encode(frames_to_tensor(frame)[None])  # [1, C, S, S]
        agent = _check_agent_pos(agent_pos)
        reason = self._reset_reason(self.net.tokenize([prompt])[0], n_input_frames=1)
        self._reset(prompt, seed, latent, reason)
        self._write(latent[0], agent, agent, real=True)
        return self.observe(), self._frame_record_info()

    def step(self, action) -> StepOutput:
        self._require_started()
        a = self.check_action(action)
        with torch.no_grad():
            latent, agent = self._generate(torch.tensor(a, dtype=torch.float32)[None])
            prev = self._info[-1][0:2]
            self._write(latent, agent, prev, real=False)
        info = self._frame_record_info()
        return StepOutput(
            observation=self.observe(),
            reward=pusht.reward_from_coverage(info["coverage"]),
            terminated=bool(info["success_prob"] > 0.5),
            info=info,
        )

    # --- DreamZero's reset rules ------------------------------------------------------------
    def _reset_reason(self, language: torch.Tensor, n_input_frames: int) -> str | None:
        """Why the caches must be rebuilt before this call, or None to keep them."""
        if self._language is None:
            return "no stored language"
        if n_input_frames == 1:
            return "1-frame input"
        if not torch.equal(self._language, language):
            return "language changed"
        return None

    def _reset(self, prompt: str, seed: int, first_latent: torch.Tensor, reason: str | None) -> None:
        self._clear()
        self.last_reset_reason = reason
        self._prompt, self._seed = prompt, int(seed)
        self._gen.manual_seed(int(seed))
        self._ys = first_latent
        self._clip_feas = self.net.encode_image(first_latent)
        self._set_text(prompt)

    def _set_text(self, prompt: str) -> None:
        net = self.net
        self._language = net.tokenize([prompt])[0]
        ids = self._language[None].expand(2, -1)
        text = net.encode_text(ids, null=torch.tensor([False, True]))  # [2, Lt, d]
        self._text = text[:1]
        self._cross = net.cross_context(text, self._clip_feas.expand(2, -1, -1))

    # --- generation ---------------------------------------------------------------------------
    def _cache_kv(
        self, max_frames: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer (K, V) [2 branches, H, L, hd] over the cached window (its last
        ``max_frames`` frames if given), or None."""
        blocks = self._blocks
        if max_frames is not None:
            blocks = blocks[max(0, len(blocks) - max_frames) :]
        if not blocks:
            return None
        kv = torch.stack(blocks, dim=0)  # [F, layers, 2, 2, H, T_F, hd]
        kv = kv.permute(1, 2, 3, 4, 0, 5, 6).flatten(4, 5)  # [layers, 2, 2, H, F*T_F, hd]
        return [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]

    def _branches(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.expand(2, *tokens.shape[1:])

    def _generate(self, action: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Denoise the next frame (cache frozen): latent [C, S, S], next pusher pos (px)."""
        net, c = self.net, self.net.cfg
        caches = self._cache_kv()
        frame_index = self.frame_count  # the frame being generated
        cur, prev = self._info[-1][0:2], self._info[-2][0:2] if len(self._info) > 1 else self._info[-1][0:2]
        state = state_features(
            torch.tensor(normalise_pos(cur), dtype=torch.float32)[None],
            torch.tensor(normalise_pos(prev), dtype=torch.float32)[None],
        )
        ctrl = self._branches(net.control_tokens(action, state))  # [2, 2, d]
        ys = self._branches(self._ys)
        pos = torch.full((c.tokens_per_frame + 2,), float(frame_index))
        x = torch.randn(1, c.latent_channels, c.latent_size, c.latent_size, generator=self._gen)
        n = self.num_denoise_steps
        agent = None
        for i in range(n):
            t = torch.full((2,), i / n)
            tokens = net.frame_tokens(self._branches(x), ys, t)
            hidden, _ = net.run(torch.cat([tokens, ctrl], dim=1), pos, self._cross, caches)
            v = net.velocity(hidden[:, : c.tokens_per_frame])  # [2, T_F, P]
            v = v[1] + self.cfg_scale * (v[0] - v[1]) if self.cfg_scale != 1.0 else v[0]
            x = x + unpatchify(v, c.latent_channels, c.latent_size, c.latent_size, c.patch)[None] / n
            agent = net.next_agent(hidden[0, c.tokens_per_frame + 1])
        agent_px = (agent.numpy().astype(np.float64) + 1.0) * (pusht.WORLD_SIZE / 2)
        return x[0], agent_px

    def _write(self, latent: torch.Tensor, agent: np.ndarray, agent_prev: np.ndarray, *, real: bool) -> None:
        """Write frame ``latent`` [C, S, S] into both caches; run the heads; append it."""
        net, c = self.net, self.net.cfg
        frame_index = self.frame_count
        # The frame sees at most local_attn_size - 1 earlier frames (with itself: the
        # window). Rewriting the current frame (resync, set_prompt) after the window has
        # slid then sees exactly the context the original write saw.
        caches = self._cache_kv(max_frames=self.local_attn_size - 1)
        tokens = net.frame_tokens(
            self._branches(latent[None]), self._branches(self._ys), torch.ones(2)
        )
        pos = torch.full((c.tokens_per_frame,), float(frame_index))
        hidden, kvs = net.run(tokens, pos, self._cross, caches)
        # [layers, 2 (k, v), 2 (branch), H, T_F, hd]: one immutable block per frame.
        block = torch.stack([torch.stack([k, v]) for k, v in kvs]).contiguous()
        self._blocks = self._blocks + [block]
        if len(self._blocks) > self.local_attn_size:  # window full: slide
            drop = len(self._blocks) - self.local_attn_size
            self._blocks = self._blocks[drop:]
            self._cache_start += drop
        heads = net.heads(hidden[0], self._text[0])
        self._proposal = torch.cat(
            [heads["mdn_logits"][:, None], heads["mdn_mean"], heads["mdn_log_std"]], dim=-1
        ).clone()
        bp = heads["block_pose"].numpy().astype(np.float64)
        angle = math.atan2(bp[2], bp[3]) % (2 * math.pi)
        # Predicted positions are kept inside the workspace, where the real ones are.
        agent = np.clip(agent, 0.0, pusht.WORLD_SIZE)
        bx, by = np.clip((bp[:2] + 1) * (pusht.WORLD_SIZE / 2), 0.0, pusht.WORLD_SIZE)
        info = np.array(
            [agent[0], agent[1], bx, by, angle,
             float(heads["coverage"]), float(torch.sigmoid(heads["success_logit"])), float(real)],
            dtype=np.float64,
        )  # fmt: skip
        self._info.append(info)
        self._append_latent(latent)

    def _append_latent(self, latent: torch.Tensor) -> None:
        lat = latent[None].clone()
        if self._chunks and len(self._chunks[-1]) < LATENT_CHUNK:
            # A new tensor for the grown chunk: earlier states keep the old one.
            self._chunks = self._chunks[:-1] + [torch.cat([self._chunks[-1], lat])]
        else:
            self._chunks = self._chunks + [lat]

    # --- real-world synchronisation ---------------------------------------------------------
    @torch.no_grad()
    def resync(self, frame: np.ndarray | None = None, agent_pos=None, *, latent: torch.Tensor | None = None) -> None:
        """Replace the current frame with a real one (an RGB frame, encoded) or a given
        latent ``[C, S, S]`` (latent injection), and rewrite it into the caches."""
        self._require_started()
        if (frame is None) == (latent is None):
            raise ValueError("resync needs exactly one of frame= or latent=")
        if latent is None:
            latent = self.vae.encode(frames_to_tensor(self._check_frame(frame))[None])[0]
        latent = torch.as_tensor(latent, dtype=torch.float32)
        c = self.net.cfg
        if latent.shape != (c.latent_channels, c.latent_size, c.latent_size):
            raise ValueError(f"latent must have shape ({c.latent_channels}, {c.latent_size}, {c.latent_size}), got {tuple(latent.shape)}")
        last = self._info[-1]
        agent = last[0:2] if agent_pos is None else _check_agent_pos(agent_pos)
        self._rewrite_current(latent, agent, real=frame is not None)

    def _rewrite_current(self, latent: torch.Tensor, agent: np.ndarray, real: bool) -> None:
        """Drop the current frame's block, latent and record; write ``latent`` instead."""
        self._info = self._info[:-1]
        prev = self._info[-1][0:2] if self._info else agent
        self._blocks = self._blocks[:-1]
        tail = self._chunks[-1][:-1]
        self._chunks = self._chunks[:-1] + ([tail] if len(tail) else [])
        self._write(latent, agent, prev, real=real)

    # --- state -------------------------------------------------------------------------------
    def extract_state(self) -> ModelState:
        self._require_started()
        c = self.net.cfg
        tensors: dict[str, torch.Tensor] = {
            "language_ids": self._language,  # [Lt] int64
            "ys": self._ys,  # [1, C, S, S]
            "clip_feas": self._clip_feas,  # [1, n_img, d]
            "rng_state": self._gen.get_state(),  # uint8
            "frame_info": torch.from_numpy(np.stack(self._info)),  # [T, 8] float64
            "proposal": self._proposal,  # [n_mixture, 5]
        }
        for k, block in enumerate(self._blocks):
            tensors[f"kv_cache/{self._cache_start + k:06d}"] = block
        for k, chunk in enumerate(self._chunks):
            tensors[f"latent_video/{k:05d}"] = chunk
        meta = {
            "state_version": STATE_VERSION,
            "prompt": self._prompt,
            "seed": self._seed,
            "current_start_frame": self.frame_count,
            "cache_start_frame": self._cache_start,
            "local_attn_size": self.local_attn_size,
            "num_frame_per_block": c.num_frame_per_block,
            "weights": self.weights.meta.get("weights_id", ""),
        }
        return ModelState(tensors=tensors, meta=meta)

    def load_state(self, state: ModelState, *, include_rng: bool = True) -> None:
        t, meta = state.tensors, state.meta
        if meta.get("state_version") != STATE_VERSION or "language_ids" not in t:
            raise StateMismatchError(f"not a {self.name} state (version {meta.get('state_version')})")
        if meta.get("weights", "") != self.weights.meta.get("weights_id", ""):
            raise StateMismatchError(
                f"state was made by weights {meta.get('weights')!r}, this model has "
                f"{self.weights.meta.get('weights_id')!r}"
            )
        self.check_prompt(meta["prompt"])
        # Check before touching anything: a refused state leaves the model as it was.
        if len(t["frame_info"]) != int(meta["current_start_frame"]):
            raise StateMismatchError("frame_info and current_start_frame disagree")
        self._clear()
        # Set the language key explicitly: a restored state must never trip the reset check.
        self._language = t["language_ids"]
        self._prompt, self._seed = meta["prompt"], int(meta["seed"])
        self._ys, self._clip_feas = t["ys"], t["clip_feas"]
        self._set_text(self._prompt)
        self._blocks = [t[k] for k in sorted(k for k in t if k.startswith("kv_cache/"))]
        self._cache_start = int(meta["cache_start_frame"])
        self._chunks = [t[k] for k in sorted(k for k in t if k.startswith("latent_video/"))]
        self._info = list(t["frame_info"].numpy().copy())
        self._proposal = t["proposal"]
        if include_rng:
            self._gen.set_state(t["rng_state"].clone())

    def set_prompt(self, prompt: str) -> None:
        self._require_started()
        self.check_prompt(prompt)
        # Re-encode the text conditioning and move the reset key with it: the history
        # (self-attention cache, latent video) continues under the new prompt.
        self._prompt = prompt
        with torch.no_grad():
            self._set_text(prompt)
            # Rewrite the current frame under the new prompt: its cache block and its head
            # outputs (coverage is about the new goal) follow the new conditioning.
            row = self._info[-1]
            self._rewrite_current(self.latent(self.frame_count - 1), row[0:2], bool(row[7]))

    def set_seed(self, seed: int) -> None:
        self._seed = int(seed)
        self._gen.manual_seed(int(seed))

    # --- reading -------------------------------------------------------------------------------
    @property
    def frame_count(self) -> int:
        return len(self._info)

    @property
    def prompt(self) -> str:
        return self._prompt

    @property
    def seed(self) -> int:
        return self._seed

    def observe(self) -> dict[str, np.ndarray]:
        self._require_started()
        row = self._info[-1]
        return {
            "agent_pos": row[0:2].astype(np.float32),
            "block_pose": row[2:5].astype(np.float32),
            "goal_pose": pusht.goal_pose(self._prompt).astype(np.float32),
        }

    def latent(self, frame_index: int) -> torch.Tensor:
        """The latent of frame ``frame_index``, [C, S, S]."""
        i = self.check_frame_index(frame_index)
        return self._chunks[i // LATENT_CHUNK][i % LATENT_CHUNK]

    @torch.no_grad()
    def decode_frame(self, frame_index: int) -> np.ndarray:
        self._require_started()
        img = self.vae.decode(self.latent(frame_index)[None])[0]
        return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def propose_actions(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``n`` actions ``[n, 2]`` sampled from the model's action-proposal head for the
        current frame (a mixture of Gaussians), clipped to the action box."""
        self._require_started()
        rng = rng or np.random.default_rng()
        p = self._proposal.numpy().astype(np.float64)
        w = np.exp(p[:, 0] - p[:, 0].max())
        comp = rng.choice(len(p), size=n, p=w / w.sum())
        a = p[comp, 1:3] + np.exp(p[comp, 3:5]) * rng.standard_normal((n, 2))
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def kv_cache(self, layer: int, branch: str = "cond") -> torch.Tensor:
        """DreamZero's per-layer cache view ``[2, B=1, L, heads, head_dim]`` (k, v)."""
        b = {"cond": 0, "uncond": 1}[branch]
        kv = torch.stack([blk[layer, :, b] for blk in self._blocks], dim=0)  # [F, 2, H, T_F, hd]
        return kv.permute(1, 0, 3, 2, 4).flatten(1, 2)[:, None]

    def spawn(self) -> MiniDreamZero:
        return MiniDreamZero(
            weights_dir=self.weights_dir, cfg_scale=self.cfg_scale,
            num_denoise_steps=self.num_denoise_steps, local_attn_size=self.local_attn_size,
            _weights=self.weights,
        )  # fmt: skip

    def config(self) -> dict[str, Any]:
        cfg = {"cfg_scale": self.cfg_scale, "num_denoise_steps": self.num_denoise_steps,
               "local_attn_size": self.local_attn_size}  # fmt: skip
        if self.weights_dir is not None:
            cfg["weights_dir"] = self.weights_dir
        return cfg

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # --- helpers ---------------------------------------------------------------------------
    def _require_started(self) -> None:
        if self._language is None:
            raise RuntimeError(f"{self.name}: call start() (or load_state()) first")

    def _check_frame(self, frame) -> np.ndarray:
        frame = np.asarray(frame)
        want = (self.frame_size, self.frame_size, 3)
        if frame.shape != want or frame.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 {want}, got {frame.dtype} {frame.shape}")
        return frame

    def _frame_record_info(self) -> dict[str, Any]:
        row = self._info[-1]
        return {
            "coverage": float(np.clip(row[5], 0.0, 1.0)),
            "is_success": bool(row[6] > 0.5),
            "success_prob": float(row[6]),
            "agent_pos": row[0:2].copy(),
            "block_pose": row[2:5].copy(),
            "goal_pose": pusht.goal_pose(self._prompt),
            "real_frame": bool(row[7]),
        }


def _check_agent_pos(agent_pos) -> np.ndarray:
    try:
        agent = np.asarray(agent_pos, dtype=np.float64)
    except (TypeError, ValueError):
        agent = np.full(0, np.nan)
    if agent.shape != (2,) or not np.all(np.isfinite(agent)):
        raise ValueError(f"agent_pos must be 2 finite numbers (px), got {agent_pos!r}")
    return agent


def _legacy_block_pose(state: np.ndarray) -> np.ndarray:
    """Where gym-pusht's ``reset_to_state`` really puts the T (it sets the position, then
    rotates about the centre of gravity), so the first frame matches pusht-sim's."""
    from arcfab_gym.tasks.pusht import PushTEnv

    env = PushTEnv(obs_type="state")
    env._setup()
    env.block.position = list(state[2:4])
    env.block.angle = state[4]
    return np.array([*env.block.position, env.block.angle], dtype=np.float64)
