"""``mini-dreamzero``: a DreamZero-shaped world-action model of Push-T, as a backend.

Its working state has DreamZero's shape (``WANPolicyHead.lazy_joint_video_action``):

* ``kv_cache``: per layer, self-attention keys/values ``[2, B, L, heads, head_dim]`` for the
  conditional and the unconditional (CFG) branch, appended one frame block at a time
  (``num_frame_per_block = 1``) and truncated to ``local_attn_size`` frames; only
  observation tokens are cached, never the action and state tokens;
* ``crossattn_cache``: per layer, keys/values over the prompt tokens and ``clip_feas``;
* ``clip_feas`` (first-frame image tokens) and ``ys`` (first-frame VAE latent);
* the accumulated latent video, the language token ids (the reset key),
  ``current_start_frame``, the seed and the torch RNG state;
* the **task state token** of every frame (``task_state``: pusher x, y and the T's x, y,
  sin, cos; ``features`` has the layout), which DreamZero's state tokens stand for, and
  the action that led to each frame (``task_action``).

Each frame the model first predicts the next task state (:class:`StateDynamics`, from the
last two states, the last action and the action), then generates the next video latent *conditioned on
that state* (a rasterised picture of it enters every frame token), and feeds the
predicted state back as the next frame's input. Observation, reward and termination read
the predicted state through the task's own geometry (``pusht.coverage``, the function
pusht-sim uses), so a planner cannot exploit a learned reward head; the coverage head is
kept as a diagnostic (``info["coverage_head"]``).

**Checkpoints share their prefix.** Every cache block and every latent chunk is a tensor
that is never written again once made (copy-on-write by construction: the live model
appends new tensors and drops references, it never edits one). ``extract_state`` hands out
references, so a checkpoint costs O(new frames), and a tree of checkpoints holds each
frame's bytes once; the store counts unique storage.

Per call (``step``): the next task state is predicted; the frozen cache is gathered once;
the next frame's latent is denoised by few-step flow matching from seeded noise, with CFG
over the two branches, conditioned on the action, the pusher and the predicted state; then
the new frame block is written into both caches, which also runs the heads (action
proposals; coverage as a diagnostic).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from arcfab_gym.errors import InvalidActionError, StateMismatchError
from arcfab_gym.models.base import ModelState, StepOutput, WorldModel
from arcfab_gym.models.mini_dreamzero import features
from arcfab_gym.models.mini_dreamzero.features import (
    flow_target,
    latent_from_flow,
    pusher_features,
)
from arcfab_gym.models.mini_dreamzero.network import (
    DynamicsConfig,
    RendererConfig,
    SharedPrefixCache,
    StateDynamics,
    StateRenderer,
    WorldTransformer,
    unpatchify,
)
from arcfab_gym.models.mini_dreamzero.vae import FrameVAE, VAEConfig, frames_to_tensor
from arcfab_gym.tasks import pusht

#: Frames per latent-video chunk: full chunks are shared between checkpoints, the last
#: partial one is copied (at most LATENT_CHUNK - 1 frames).
LATENT_CHUNK = 4
#: Columns of the per-frame record: agent x, y; block x, y, angle (read from the task
#: state); coverage of the goal by that pose; 1 if successful; 1 if the frame came from the
#: real world (encoded) rather than generated; the coverage head's reading (diagnostic);
#: the state-dynamics ensemble's disagreement about the frame's state (px; 0 for a real
#: frame or a one-member ensemble).
FRAME_INFO_COLUMNS = 10
#: Sampling settings for weights whose config.json recommends none.
SAMPLING_DEFAULTS = {"cfg_scale": 1.5, "num_denoise_steps": 2, "warm_start": 0.0}
#: Version of the model state. 3: the task-state token (``task_state``) and the
#: state-conditioned video; 4: the ensemble's disagreement in ``frame_info``. States of
#: version 3 are read with a disagreement of 0; version 2 (no task state) cannot be read.
STATE_VERSION = 4
READABLE_STATE_VERSIONS = (3, 4)


def default_weights_dir() -> Path:
    return Path(str(resources.files("arcfab_gym.models.mini_dreamzero") / "weights"))


@dataclass
class Weights:
    """The trained networks (shared, read-only, between spawned instances)."""

    vae: FrameVAE
    net: WorldTransformer
    state_net: StateDynamics
    meta: dict[str, Any]
    source: str
    renderer: StateRenderer | None = None  # weights whose flow is anchored on the state

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
        if "state_dynamics" not in meta or not net.cfg.state_map:
            raise FileNotFoundError(
                f"the mini-dreamzero weights in {root} predate the task-state token (no "
                "state_dynamics in config.json, or frames not conditioned on the state); "
                "train them with `python -m experiments.train_world_model stage=state` and "
                "`stage=dynamics state_map=true`"
            )
        state_net = StateDynamics.load(root / "state_dynamics.safetensors", meta["state_dynamics"])
        renderer = None
        if net.cfg.anchor == "render":
            if "renderer" not in meta or not (root / "renderer.safetensors").exists():
                raise FileNotFoundError(
                    f"the mini-dreamzero weights in {root} anchor the video on the state but "
                    "renderer.safetensors (or its config) is missing; train it with "
                    "`python -m experiments.train_world_model stage=renderer`"
                )
            renderer = StateRenderer(RendererConfig(**meta["renderer"]))
            renderer.load_state_dict(load_file(str(root / "renderer.safetensors")))
        for m in (vae, net, state_net, renderer):
            if m is not None:
                m.eval()
                m.requires_grad_(False)
        return cls(vae=vae, net=net, state_net=state_net, meta=meta, source=str(root),
                   renderer=renderer)


class MiniDreamZero(WorldModel):
    """The learned Push-T world model behind the backend contract.

    Args:
        weights_dir: folder with ``config.json``, ``vae.safetensors``,
            ``dynamics.safetensors`` (default: the weights shipped in the package).
        cfg_scale: classifier-free guidance scale over the prompt (1 = conditional only;
            both caches are kept either way).
        num_denoise_steps: Euler steps of flow matching per frame.
        local_attn_size: frames the self-attention cache keeps (default: the trained one).
        warm_start: start each frame's flow at this ``t`` from "no change" (the previous
            latent, or a zero change for a residual flow), noised, SDEdit-style, instead of
            from pure noise at ``t = 0`` (plain flow matching).

    Sampling arguments left at None take the values the weights recommend (``sampling``
    in their ``config.json``, chosen on held-out episodes), else ``SAMPLING_DEFAULTS``.
    """

    name = "mini-dreamzero"
    prompts = pusht.PROMPTS

    def __init__(
        self,
        *,
        weights_dir: str | Path | None = None,
        cfg_scale: float | None = None,
        num_denoise_steps: int | None = None,
        local_attn_size: int | None = None,
        warm_start: float | None = None,
        _weights: Weights | None = None,
    ):
        self.weights = _weights if _weights is not None else Weights.load(weights_dir)
        self.weights_dir = None if weights_dir is None else str(weights_dir)
        self.net, self.vae = self.weights.net, self.weights.vae
        c = self.net.cfg
        recommended = {**SAMPLING_DEFAULTS, **self.weights.meta.get("sampling", {})}
        cfg_scale = recommended["cfg_scale"] if cfg_scale is None else cfg_scale
        if num_denoise_steps is None:
            num_denoise_steps = recommended["num_denoise_steps"]
        warm_start = recommended["warm_start"] if warm_start is None else warm_start
        self.cfg_scale = float(cfg_scale)
        if int(num_denoise_steps) < 1:
            raise ValueError(f"num_denoise_steps must be >= 1, got {num_denoise_steps}")
        self.num_denoise_steps = int(num_denoise_steps)
        if not 0.0 <= float(warm_start) < 1.0:
            raise ValueError(f"warm_start must be in [0, 1), got {warm_start}")
        self.warm_start = float(warm_start)
        self.local_attn_size = int(local_attn_size or c.local_attn_size)
        if self.local_attn_size < 2:
            raise ValueError(f"local_attn_size must be >= 2 frames, got {self.local_attn_size}")
        self.action_repeat = int(self.weights.meta.get("action_repeat", 4))
        self.frame_size = int(self.vae.cfg.frame_size)
        self._renderer: pusht.FrameRenderer | None = None
        self._w: _World | None = None  # the working state
        self.last_reset_reason: str | None = None
        #: Forks of one state attend to the cache frames they share stored once
        #: (:class:`SharedPrefixCache`); False stacks every fork's own copy, the layout
        #: before prefix sharing (the same results; for benchmarks and tests).
        self.share_prefix = True

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
        block = pusht.pose_for_state(initial_state)
        frame = self._renderer.render(initial_state[:2], block, pusht.goal_pose(prompt))
        return self.start_from_frame(frame, initial_state[:2], block, prompt=prompt, seed=seed)

    @torch.no_grad()
    def start_from_frame(self, frame: np.ndarray, agent_pos, block_pose, *, prompt: str, seed: int):
        """Begin a history from a real RGB frame ``[S, S, 3]`` and the real task state
        (pusher position px, the T's pose ``x, y, angle``)."""
        self.check_prompt(prompt)
        frame = self._check_frame(frame)
        state = _task_state(agent_pos, block_pose)
        latent = self.vae.encode(frames_to_tensor(frame)[None])  # [1, C, S, S]
        self.last_reset_reason = self._reset_reason(self.net.tokenize([prompt])[0], n_input_frames=1)
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        w = _World(prompt=prompt, seed=int(seed), ys=latent, gen=gen)
        w.clip_feas = self.net.encode_image(latent)
        self._encode_prompt(w, prompt)
        self._w = w
        self._write([w], latent, state[None], features.resting_action(state)[None], real=True)
        return self.observe(), self._frame_record_info()

    def step(self, action) -> StepOutput:
        self._require_started()
        a = self.check_action(action)
        self._step_worlds([self._w], a[None])
        return self._output(self._w)

    def step_batch(self, states, actions, *, render: bool = True):
        """Step ``B`` worlds in one batched model call; ``actions`` ``[B, 2]``.

        Each world draws its noise from its own RNG, so the results match stepping the
        worlds one by one up to float rounding (batched matrix products sum in another
        order). Leaves this model in the last world's state.

        ``render=False`` advances the task state token alone (observation, reward and
        termination read only it) and leaves the frame's video latent and cache block
        pending: they are generated when something reads them (a frame, a cache, the
        proposals, a full step), one world at a time, with the world's own RNG, so the
        bits are those of stepping it with ``step()``. Planners whose objective reads the
        state alone skip the video this way; the coverage head's diagnostic reads NaN
        until the frame is rendered."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or len(actions) != len(states):
            raise InvalidActionError(
                f"step_batch needs actions of shape [{len(states)}, {self.action_dim}], "
                f"got {actions.shape}"
            )
        acts = np.stack([self.check_action(a) for a in actions]) if len(actions) else actions
        worlds = [self._world_from_state(s, include_rng=True) for s in states]
        if not worlds:
            return [], []
        self._step_worlds(worlds, acts, render=render)
        self._w = worlds[-1]
        return [self._state_of(w) for w in worlds], [self._output(w) for w in worlds]

    # --- DreamZero's reset rules ------------------------------------------------------------
    def _reset_reason(self, language: torch.Tensor, n_input_frames: int) -> str | None:
        """Why the caches must be rebuilt before this call, or None to keep them."""
        if self._w is None:
            return "no stored language"
        if n_input_frames == 1:
            return "1-frame input"
        if not torch.equal(self._w.language, language):
            return "language changed"
        return None

    @property
    def _language(self) -> torch.Tensor | None:
        """The stored language key (token ids of the prompt), or None before start."""
        return None if self._w is None else self._w.language

    def _encode_prompt(self, w: _World, prompt: str) -> None:
        """Text tokens and the per-layer cross-attention cache of both branches."""
        net = self.net
        w.prompt = prompt
        w.language = net.tokenize([prompt])[0]
        ids = w.language[None].expand(2, -1)
        text = net.encode_text(ids, null=torch.tensor([False, True]))  # [2, Lt, d]
        w.text = text[:1]
        cross = net.cross_context(text, w.clip_feas.expand(2, -1, -1))
        # [layers, 2 (k, v), 2 (branch), H, Lc, hd]
        w.cross = torch.stack([torch.stack([k, v]) for k, v in cross]).contiguous()

    # --- batched generation -------------------------------------------------------------------
    def _gather(self, worlds: list[_World], *, max_frames: int | None, new_tokens: int):
        """Caches of ``worlds`` for one call: cross (K, V) ``[2B, H, Lc, hd]`` per layer,
        and per layer either (K, V) ``[2B, H, L, hd]`` (rows 2b, 2b + 1 = world b's cond,
        uncond branch) or, when the worlds' first cached frames are the same tensors
        (forks of one state), a :class:`SharedPrefixCache` holding those once and only
        each world's own frames stacked; and an attention mask over the stacked frames
        and the new tokens ``[2B, 1, 1, L + new_tokens]`` when their lengths differ."""
        blocks = [w.blocks[max(0, len(w.blocks) - max_frames):] if max_frames else w.blocks
                  for w in worlds]  # fmt: skip
        cross = torch.stack([w.cross for w in worlds], dim=2).flatten(2, 3)  # [l, 2, 2B, H, Lc, hd]
        cross_kv = [(cross[i, 0], cross[i, 1]) for i in range(cross.shape[0])]
        shared = _common_prefix(blocks) if self.share_prefix and len(worlds) > 1 else 0
        caches, mask = self._stack_blocks(worlds, [bl[shared:] for bl in blocks], new_tokens)
        if shared:
            # [c, layers, 2 (k, v), 2 (branch), H, T_F, hd] -> [layers, 2, 2, H, c * T_F, hd]
            pre = torch.stack(blocks[0][:shared]).permute(1, 2, 3, 4, 0, 5, 6).flatten(4, 5)
            caches = [SharedPrefixCache(pre[i, 0], pre[i, 1], *(caches[i] if caches else (None, None)))
                      for i in range(pre.shape[0])]  # fmt: skip
        return caches, cross_kv, mask

    def _stack_blocks(self, worlds: list[_World], blocks: list[list[torch.Tensor]], new_tokens: int):
        """Each world's cache blocks stacked, left-padded to the longest: per layer (K, V)
        ``[2B, H, L, hd]`` and the padding mask (None when no world has fewer)."""
        tf = self.net.cfg.tokens_per_frame
        longest = max(len(b) for b in blocks)
        if longest == 0:
            return None, None
        layers, _, _, h, _, hd = worlds[0].blocks[-1].shape
        kv = torch.zeros(len(worlds), longest, layers, 2, 2, h, tf, hd)
        for b, bl in enumerate(blocks):
            if bl:
                kv[b, longest - len(bl):] = torch.stack(bl)
        # -> [layers, 2 (k, v), 2B, H, L, hd]
        kv = kv.permute(2, 3, 0, 4, 5, 1, 6, 7).flatten(2, 3).flatten(4, 5)
        caches = [(kv[i, 0], kv[i, 1]) for i in range(layers)]
        mask = None
        if any(len(bl) != longest for bl in blocks):
            valid = torch.ones(len(worlds), longest * tf + new_tokens, dtype=torch.bool)
            for b, bl in enumerate(blocks):
                valid[b, : (longest - len(bl)) * tf] = False  # left padding
            mask = valid.repeat_interleave(2, dim=0)[:, None, None, :]
        return caches, mask

    def _step_worlds(self, worlds: list[_World], actions: np.ndarray, *, render: bool = True) -> None:
        with torch.no_grad():
            if render:
                self._render(worlds)  # frames left pending by earlier state-only steps
            acts = torch.tensor(actions, dtype=torch.float32)
            now = torch.from_numpy(np.stack([w.task[w.n - 1] for w in worlds]))
            prev = torch.from_numpy(np.stack([w.task[max(w.n - 2, 0)] for w in worlds]))
            last = torch.from_numpy(np.stack([w.acts[w.n - 1] for w in worlds]))
            # The state token, predicted, and the ensemble's disagreement about it.
            members = None
            if any(w.hypothesis is not None for w in worlds):
                members = torch.tensor([-1 if w.hypothesis is None else w.hypothesis for w in worlds])
            nxt, spread = self.weights.state_net.predict(now, prev, acts, last, members=members)
            self._record(worlds, nxt.numpy(), acts.numpy(), real=False, disagreement=spread.numpy())
            if render:
                self._write_video(worlds, self._generate(worlds, acts, now, prev, nxt), nxt.numpy())

    def _render(self, worlds: list[_World]) -> None:
        """Generate every frame a state-only step left pending, in order, one world at a
        time (so a frame's bits never depend on which worlds it was batched with)."""
        with torch.no_grad():
            for w in worlds:
                while w.rendered < w.n:
                    # The inputs frame f was stepped with: the states before it, the
                    # action into it, and its own (predicted) state.
                    f = w.rendered
                    now, prev, nxt = torch.from_numpy(w.task[[f - 1, max(f - 2, 0), f]])[:, None]
                    act = torch.from_numpy(w.acts[[f]])
                    self._write_video([w], self._generate([w], act, now, prev, nxt), nxt.numpy())

    def _generate(self, worlds: list[_World], actions: torch.Tensor, now: torch.Tensor,
                  prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """Denoise each world's next frame to render (frame ``w.rendered``; caches
        frozen), conditioned on the action, the pusher and the predicted next task state
        ``nxt`` ``[B, 6]``: latents ``[B, C, S, S]``."""
        net, c = self.net, self.net.cfg
        tf, B = c.tokens_per_frame, len(worlds)
        caches, cross, mask = self._gather(worlds, max_frames=None, new_tokens=tf + 2)
        pusher = pusher_features(now[:, 0:2], prev[:, 0:2])
        ctrl = net.control_tokens(actions, pusher).repeat_interleave(2, dim=0)  # [2B, 2, d]
        smap = net.map_tokens(nxt).repeat_interleave(2, dim=0)
        ys = torch.cat([w.ys for w in worlds]).repeat_interleave(2, dim=0)
        pos = torch.tensor([float(w.rendered) for w in worlds]).repeat_interleave(2)[:, None]
        pos = pos.expand(2 * B, tf + 2)
        shape = (1, c.latent_channels, c.latent_size, c.latent_size)
        x = torch.cat([torch.randn(shape, generator=w.gen) for w in worlds])  # [B, C, S, S]
        t0 = self.warm_start
        z_prev = torch.stack([w.chunks[-1][-1] for w in worlds])
        if c.anchor == "render":
            # The change is measured from the latent the renderer draws for the predicted
            # state, so the frame shows the T where the state token says it is.
            renderer = self.weights.renderer
            anchor = renderer(nxt, renderer.goal_maps([w.prompt for w in worlds]))
        else:
            anchor = z_prev
        if t0 > 0:
            # SDEdit-style: start the flow at t0 from "no change" -- the previous frame
            # (or, for a residual flow, a zero change), noised -- rather than from pure
            # noise: consecutive frames differ little.
            x = t0 * flow_target(c, z_prev, z_prev) + (1 - t0) * x
        n = self.num_denoise_steps
        for i in range(n):
            t = torch.full((2 * B,), t0 + (1 - t0) * i / n)
            tokens = net.frame_tokens(x.repeat_interleave(2, dim=0), ys, t, smap)
            hidden, _ = net.run(torch.cat([tokens, ctrl], dim=1), pos, cross, caches, mask)
            v = net.velocity(hidden[:, :tf]).view(B, 2, tf, -1)
            v = v[:, 1] + self.cfg_scale * (v[:, 0] - v[:, 1]) if self.cfg_scale != 1.0 else v[:, 0]
            x = x + unpatchify(v, c.latent_channels, c.latent_size, c.latent_size, c.patch) * ((1 - t0) / n)
        return latent_from_flow(c, x, anchor)

    def _write(self, worlds: list[_World], latents: torch.Tensor, states: np.ndarray,
               actions: np.ndarray, *, real: bool, disagreement: np.ndarray | None = None) -> None:
        """Append each world's new frame: its task state ``states[b]`` ``[6]`` (reached by
        ``actions[b]``) and its latent ``latents[b]``, written into both caches."""
        self._record(worlds, states, actions, real=real, disagreement=disagreement)
        self._write_video(worlds, latents, states)

    def _record(self, worlds: list[_World], states: np.ndarray, actions: np.ndarray, *,
                real: bool, disagreement: np.ndarray | None = None) -> None:
        """Append a frame's task state to each world, with the reward and success the
        task's own geometry gives its pose (its video is written by ``_write_video``)."""
        states = np.asarray(states, dtype=np.float32)
        agents, blocks = features.poses_from_state(states)
        covs = np.zeros(len(worlds))
        prompts = [w.prompt for w in worlds]
        for prompt in set(prompts):  # one array call per goal
            rows = [b for b, p in enumerate(prompts) if p == prompt]
            covs[rows] = pusht.coverages(blocks[rows], pusht.goal_pose(prompt))
        for b, w in enumerate(worlds):
            cov = float(covs[b])
            success = float(cov > pusht.SUCCESS_THRESHOLD)
            w.append_frame(states[b], actions[b],
                           [*agents[b], *blocks[b], cov, success, float(real), np.nan,
                            0.0 if disagreement is None else float(disagreement[b])])

    def _write_video(self, worlds: list[_World], latents: torch.Tensor, states: np.ndarray) -> None:
        """Write frame ``w.rendered`` of each world: its latent ``latents[b]`` with its task
        state ``states[b]`` into both of its caches, and run the heads (new tensors and
        lists only; nothing is edited)."""
        net, c = self.net, self.net.cfg
        tf, B = c.tokens_per_frame, len(worlds)
        # A frame sees at most local_attn_size - 1 earlier frames (with itself: the
        # window), so rewriting the current frame after the window slid sees exactly the
        # context the original write saw.
        caches, cross, mask = self._gather(worlds, max_frames=self.local_attn_size - 1, new_tokens=tf)
        ys = torch.cat([w.ys for w in worlds]).repeat_interleave(2, dim=0)
        states = np.asarray(states, dtype=np.float32)
        smap = net.map_tokens(torch.from_numpy(states)).repeat_interleave(2, dim=0)
        tokens = net.frame_tokens(latents.repeat_interleave(2, dim=0), ys, torch.ones(2 * B), smap)
        pos = torch.tensor([float(w.rendered) for w in worlds]).repeat_interleave(2)[:, None].expand(2 * B, tf)
        hidden, kvs = net.run(tokens, pos, cross, caches, mask)
        k_all = torch.stack([k for k, _ in kvs])  # [layers, 2B, H, T_F, hd]
        v_all = torch.stack([v for _, v in kvs])
        heads = net.heads(hidden[0::2], torch.cat([w.text for w in worlds]))
        proposal = torch.cat(
            [heads["mdn_logits"][..., None], heads["mdn_mean"], heads["mdn_log_std"]], dim=-1
        )  # [B, n_mixture, 5]
        cov_head = heads["coverage"].numpy().astype(np.float64)
        for b, w in enumerate(worlds):
            # [layers, 2 (k, v), 2 (branch), H, T_F, hd]: one immutable block per frame.
            block = torch.stack([k_all[:, 2 * b : 2 * b + 2], v_all[:, 2 * b : 2 * b + 2]], dim=1)
            w.blocks = w.blocks + [block.contiguous()]
            if len(w.blocks) > self.local_attn_size:  # window full: slide
                drop = len(w.blocks) - self.local_attn_size
                w.blocks = w.blocks[drop:]
                w.cache_start += drop
            w.proposal = proposal[b].clone()
            w.info[w.rendered, 8] = cov_head[b]
            w.append_latent(latents[b])
            w.rendered += 1

    # --- real-world synchronisation (hybrid control) ------------------------------------
    @torch.no_grad()
    def resync(self, frame: np.ndarray | None = None, agent_pos=None, block_pose=None, *,
               latent: torch.Tensor | None = None) -> None:
        """Replace the current frame with a real one (an RGB frame, encoded) or a given
        latent ``[C, S, S]`` (latent injection), and its task state with the real one
        (``agent_pos`` px and ``block_pose`` x, y, angle; each left as predicted when
        None), and rewrite it into the caches."""
        self._require_started()
        if (frame is None) == (latent is None):
            raise ValueError("resync needs exactly one of frame= or latent=")
        if latent is None:
            latent = self.vae.encode(frames_to_tensor(self._check_frame(frame))[None])[0]
        latent = torch.as_tensor(latent, dtype=torch.float32)
        c = self.net.cfg
        if latent.shape != (c.latent_channels, c.latent_size, c.latent_size):
            raise ValueError(
                f"latent must have shape ({c.latent_channels}, {c.latent_size}, "
                f"{c.latent_size}), got {tuple(latent.shape)}"
            )
        self._rewrite_current(latent, self._merged_state(agent_pos, block_pose), real=frame is not None,
                              known_block=block_pose is not None)

    @torch.no_grad()
    def inject_state(self, agent_pos=None, block_pose=None) -> None:
        """Replace the current frame's task state (either part; None keeps the predicted
        one) and rewrite the frame into the caches with its latent unchanged: state
        injection, the hybrid-control verb beside latent injection."""
        self._require_started()
        w = self._w
        self._rewrite_current(self.latent(w.n - 1), self._merged_state(agent_pos, block_pose),
                              real=bool(w.info[w.n - 1, 7]), known_block=block_pose is not None)  # fmt: skip

    def _merged_state(self, agent_pos, block_pose) -> np.ndarray:
        """The current task state with the given parts replaced (the others kept bit for
        bit: nothing is converted back and forth)."""
        w = self._w
        state = w.task[w.n - 1].copy()
        agent, block = features.poses_from_state(state)
        given = _task_state(agent if agent_pos is None else agent_pos,
                            block if block_pose is None else block_pose)
        if agent_pos is not None:
            state[0:2] = given[0:2]
        if block_pose is not None:
            state[2:6] = given[2:6]
        return state

    def _rewrite_current(self, latent: torch.Tensor, state: np.ndarray, real: bool, *,
                         known_block: bool = False) -> None:
        """Drop the current frame's block, latent and record; write ``latent`` with task
        state ``state`` instead. The ensemble's disagreement is kept unless the T's pose
        was given (``known_block``): then there is nothing left to doubt."""
        w = self._w
        self._render([w])
        action = w.acts[w.n - 1].copy()  # the same action led to the replaced frame
        doubt = np.zeros(1) if known_block else w.info[w.n - 1, 9:10].copy()
        w.n -= 1
        w.rendered -= 1
        w.blocks = w.blocks[:-1]
        tail = w.chunks[-1][:-1]
        w.chunks = w.chunks[:-1] + ([tail] if len(tail) else [])
        self._write([w], latent[None], state[None], action[None], real=real, disagreement=doubt)

    # --- state -------------------------------------------------------------------------------
    def _state_of(self, w: _World) -> ModelState:
        c = self.net.cfg
        tensors: dict[str, torch.Tensor] = {
            "language_ids": w.language,  # [Lt] int64
            "text": w.text,  # [1, Lt, d]
            "ys": w.ys,  # [1, C, S, S]
            "clip_feas": w.clip_feas,  # [1, n_img, d]
            "crossattn_cache": w.cross,  # [layers, 2, 2, H, Lc, hd]
            "rng_state": w.gen.get_state(),  # uint8
            "frame_info": torch.from_numpy(w.info[: w.n].copy()),  # [T, 10] float64
            "task_state": torch.from_numpy(w.task[: w.n].copy()),  # [T, 6] float32
            "task_action": torch.from_numpy(w.acts[: w.n].copy()),  # [T, 2] float32
            "proposal": w.proposal,  # [n_mixture, 5]
        }
        for k, block in enumerate(w.blocks):
            tensors[f"kv_cache/{w.cache_start + k:06d}"] = block
        for k, chunk in enumerate(w.chunks):
            tensors[f"latent_video/{k:05d}"] = chunk
        meta = {
            "state_version": STATE_VERSION,
            "prompt": w.prompt,
            "seed": w.seed,
            "current_start_frame": w.n,
            "rendered_frames": w.rendered,
            "cache_start_frame": w.cache_start,
            "local_attn_size": self.local_attn_size,
            "num_frame_per_block": c.num_frame_per_block,
            "weights": self.weights.meta.get("weights_id", ""),
        }
        if w.hypothesis is not None:  # absent in the usual readout: older states read as it
            meta["hypothesis"] = w.hypothesis
        return ModelState(tensors=tensors, meta=meta)

    def extract_state(self) -> ModelState:
        self._require_started()
        return self._state_of(self._w)

    def _world_from_state(self, state: ModelState, *, include_rng: bool) -> _World:
        t, meta = state.tensors, state.meta
        version = meta.get("state_version")
        if version not in READABLE_STATE_VERSIONS:
            hint = (" (written before the task-state token; re-create it with these weights)"
                    if isinstance(version, int) and version < STATE_VERSION else "")
            raise StateMismatchError(
                f"not a {self.name} state of version {' or '.join(map(str, READABLE_STATE_VERSIONS))}: "
                f"this one has state version {version}{hint}"
            )
        missing = [k for k in ("language_ids", "task_state", "task_action", "frame_info") if k not in t]
        if missing:
            raise StateMismatchError(f"{self.name} state of version {version} lacks {missing}")
        if meta.get("weights", "") != self.weights.meta.get("weights_id", ""):
            raise StateMismatchError(
                f"state was made by weights {meta.get('weights')!r}, this model has "
                f"{self.weights.meta.get('weights_id')!r}"
            )
        self.check_prompt(meta["prompt"])
        n = int(meta["current_start_frame"])
        rows = t["frame_info"].numpy()
        if version == 3:  # before the ensemble: no disagreement column
            rows = np.concatenate([rows, np.zeros((len(rows), 1))], axis=1)
        if rows.shape[1:] != (FRAME_INFO_COLUMNS,):
            raise StateMismatchError(f"frame_info must have {FRAME_INFO_COLUMNS} columns in state "
                                     f"version {STATE_VERSION}, got {tuple(rows.shape)}")
        if (len(t["frame_info"]) != n or tuple(t["task_state"].shape) != (n, features.STATE_DIM)
                or tuple(t["task_action"].shape) != (n, self.action_dim)):
            raise StateMismatchError(
                "frame_info, task_state, task_action and current_start_frame disagree")
        gen = torch.Generator()
        if include_rng:
            gen.set_state(t["rng_state"].clone())
        elif self._w is not None:
            gen.set_state(self._w.gen.get_state())  # keep the live stream (ALE semantics)
        # References, not copies: these tensors are never written again by anyone.
        w = _World(prompt=meta["prompt"], seed=int(meta["seed"]), ys=t["ys"], gen=gen)
        w.language, w.text, w.clip_feas, w.cross = (
            t["language_ids"], t["text"], t["clip_feas"], t["crossattn_cache"],
        )  # fmt: skip
        w.blocks = [t[k] for k in sorted(k for k in t if k.startswith("kv_cache/"))]
        w.cache_start = int(meta["cache_start_frame"])
        w.chunks = [t[k] for k in sorted(k for k in t if k.startswith("latent_video/"))]
        w.set_frames(t["task_state"].numpy(), t["task_action"].numpy(), rows)
        w.rendered = int(meta.get("rendered_frames", n))
        latents = sum(len(chunk) for chunk in w.chunks)
        if not 1 <= w.rendered <= n or latents != w.rendered:
            raise StateMismatchError(
                f"rendered_frames ({w.rendered}) must be in [1, {n}] and equal the latent "
                f"video's frames ({latents})")
        w.proposal = t["proposal"]
        hypothesis = meta.get("hypothesis")
        if hypothesis is not None and not (isinstance(hypothesis, int) and 0 <= hypothesis < self.hypotheses):
            raise StateMismatchError(f"state is stepped by hypothesis {hypothesis!r}, these weights "
                                     f"hold {self.hypotheses} (0..{self.hypotheses - 1})")
        w.hypothesis = hypothesis
        return w

    @property
    def hypotheses(self) -> int:
        """The state dynamics' ensemble members."""
        return self.weights.state_net.cfg.members

    def assume(self, state: ModelState, hypothesis: int | None) -> ModelState:
        """``state`` stepped from now on by ensemble member ``hypothesis`` alone (its
        state token follows that member's prediction; None: the weights' readout). The
        history, tensors and RNG are shared, not copied; only the meta changes."""
        super().assume(state, hypothesis)
        self._world_from_state(state, include_rng=False)  # a state of these weights
        meta = {k: v for k, v in state.meta.items() if k != "hypothesis"}
        if hypothesis is not None:
            meta["hypothesis"] = int(hypothesis)
        return ModelState(tensors=state.tensors, meta=meta)

    def load_state(self, state: ModelState, *, include_rng: bool = True) -> None:
        # The language key comes with the state: a restored state never trips the reset
        # check, and nothing is re-encoded.
        self._w = self._world_from_state(state, include_rng=include_rng)
        self.last_reset_reason = None

    def set_prompt(self, prompt: str) -> None:
        self._require_started()
        self.check_prompt(prompt)
        # Re-encode the text conditioning and move the reset key with it: the history
        # (self-attention cache, latent video) continues under the new prompt.
        with torch.no_grad():
            self._encode_prompt(self._w, prompt)
            # Rewrite the current frame under the new prompt: its cache block and its head
            # outputs (coverage is about the new goal) follow the new conditioning.
            w = self._w
            self._rewrite_current(self.latent(w.n - 1), w.task[w.n - 1].copy(), bool(w.info[w.n - 1, 7]))

    def set_seed(self, seed: int) -> None:
        self._require_started()
        self._w.seed = int(seed)
        self._w.gen.manual_seed(int(seed))

    # --- reading -------------------------------------------------------------------------------
    @property
    def frame_count(self) -> int:
        return 0 if self._w is None else self._w.n

    @property
    def prompt(self) -> str:
        return pusht.DEFAULT_PROMPT if self._w is None else self._w.prompt

    @property
    def seed(self) -> int:
        return 0 if self._w is None else self._w.seed

    @property
    def crossattn_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v) ``[2 branches, heads, Lc, head_dim]`` over prompt and image."""
        self._require_started()
        return [(c[0], c[1]) for c in self._w.cross]

    @property
    def _blocks(self) -> list[torch.Tensor]:
        if self._w is None:
            return []
        self._render([self._w])
        return self._w.blocks

    def observe(self) -> dict[str, np.ndarray]:
        self._require_started()
        return self._observe(self._w)

    def latent(self, frame_index: int) -> torch.Tensor:
        """The latent of frame ``frame_index``, [C, S, S]."""
        i = self.check_frame_index(frame_index)
        if i >= self._w.rendered:
            self._render([self._w])
        return self._w.chunks[i // LATENT_CHUNK][i % LATENT_CHUNK]

    @torch.no_grad()
    def decode_frame(self, frame_index: int) -> np.ndarray:
        self._require_started()
        img = self.vae.decode(self.latent(frame_index)[None])[0]
        return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def propose_actions(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``n`` actions ``[n, 2]`` sampled from the model's action-proposal head for the
        current frame (a mixture of Gaussians), clipped to the action box."""
        self._require_started()
        self._render([self._w])
        rng = rng or np.random.default_rng()
        p = self._w.proposal.numpy().astype(np.float64)
        w = np.exp(p[:, 0] - p[:, 0].max())
        comp = rng.choice(len(p), size=n, p=w / w.sum())
        a = p[comp, 1:3] + np.exp(p[comp, 3:5]) * rng.standard_normal((n, 2))
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def kv_cache(self, layer: int, branch: str = "cond") -> torch.Tensor:
        """DreamZero's per-layer cache view ``[2, B=1, L, heads, head_dim]`` (k, v)."""
        self._require_started()
        b = {"cond": 0, "uncond": 1}[branch]
        kv = torch.stack([blk[layer, :, b] for blk in self._blocks], dim=0)  # [F, 2, H, T_F, hd]
        return kv.permute(1, 0, 3, 2, 4).flatten(1, 2)[:, None]

    def embed(self, state: ModelState) -> np.ndarray:
        """The current frame's VAE latent, flattened (``C * S * S``); a frame left pending
        by a state-only step is rendered first (on a copy: ``state`` stays as it is)."""
        n = int(state.meta.get("current_start_frame", 0))
        if int(state.meta.get("rendered_frames", n)) < n:
            w = self._world_from_state(state, include_rng=True)
            self._render([w])
            return w.chunks[-1][-1].flatten().numpy().astype(np.float64)
        chunks = sorted(k for k in state.tensors if k.startswith("latent_video/"))
        return state.tensors[chunks[-1]][-1].flatten().numpy().astype(np.float64)

    def spawn(self) -> MiniDreamZero:
        return MiniDreamZero(
            weights_dir=self.weights_dir, cfg_scale=self.cfg_scale,
            num_denoise_steps=self.num_denoise_steps, local_attn_size=self.local_attn_size,
            warm_start=self.warm_start, _weights=self.weights,
        )  # fmt: skip

    def config(self) -> dict[str, Any]:
        cfg = {"cfg_scale": self.cfg_scale, "num_denoise_steps": self.num_denoise_steps,
               "local_attn_size": self.local_attn_size, "warm_start": self.warm_start}  # fmt: skip
        if self.weights_dir is not None:
            cfg["weights_dir"] = self.weights_dir
        return cfg

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # --- helpers ---------------------------------------------------------------------------
    def _require_started(self) -> None:
        if self._w is None:
            raise RuntimeError(f"{self.name}: call start() (or load_state()) first")

    def _check_frame(self, frame) -> np.ndarray:
        frame = np.asarray(frame)
        want = (self.frame_size, self.frame_size, 3)
        if frame.shape != want or frame.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 {want}, got {frame.dtype} {frame.shape}")
        return frame

    def _output(self, w: _World) -> StepOutput:
        info = self._frame_record_info(w)
        return StepOutput(
            observation=self._observe(w),
            reward=pusht.reward_from_coverage(info["coverage"]),
            terminated=info["is_success"],
            info=info,
        )

    def _observe(self, w: _World) -> dict[str, np.ndarray]:
        row = w.info[w.n - 1]
        return {
            "agent_pos": row[0:2].astype(np.float32),
            "block_pose": row[2:5].astype(np.float32),
            "goal_pose": pusht.goal_pose(w.prompt).astype(np.float32),
        }

    def _frame_record_info(self, w: _World | None = None) -> dict[str, Any]:
        w = w or self._w
        row = w.info[w.n - 1]
        return {
            "coverage": float(row[5]),
            "is_success": bool(row[6] > 0.5),
            "agent_pos": row[0:2].copy(),
            "block_pose": row[2:5].copy(),
            "goal_pose": pusht.goal_pose(w.prompt),
            "real_frame": bool(row[7]),
            "coverage_head": float(np.clip(row[8], 0.0, 1.0)),
            # How far apart (px) the state dynamics' members put this frame's T: the
            # model's own doubt about the step (0 for a real frame or one member).
            "disagreement": float(row[9]),
        }


class _World:
    """One world's working state. Tensors in it are never written in place: a step makes
    new tensors and new lists, so every state handed out stays valid (copy-on-write)."""

    def __init__(self, *, prompt: str, seed: int, ys: torch.Tensor, gen: torch.Generator):
        self.prompt, self.seed, self.gen = prompt, seed, gen
        self.ys = ys  # [1, C, S, S] first-frame latent
        self.language: torch.Tensor | None = None  # [Lt] int64, the reset key
        self.text: torch.Tensor | None = None  # [1, Lt, d] conditional prompt tokens
        self.clip_feas: torch.Tensor | None = None  # [1, n_img, d]
        self.cross: torch.Tensor | None = None  # [layers, 2, 2, H, Lc, hd]
        self.blocks: list[torch.Tensor] = []  # per cached frame [layers, 2, 2, H, T_F, hd]
        self.cache_start = 0  # frame index of blocks[0]
        self.chunks: list[torch.Tensor] = []  # latent video, [<=LATENT_CHUNK, C, S, S] each
        self.info = np.zeros((0, FRAME_INFO_COLUMNS))  # [capacity, 9]; rows [:n] are valid
        self.task = np.zeros((0, features.STATE_DIM), np.float32)  # the task state per frame
        self.acts = np.zeros((0, 2), np.float32)  # the action that led to each frame
        self.n = 0  # frames in the history (task state, action, record)
        self.rendered = 0  # frames whose latent and cache block exist (the rest pending)
        self.proposal: torch.Tensor | None = None  # [n_mixture, 5] of the current frame
        self.hypothesis: int | None = None  # the ensemble member stepping it (None: the readout)

    def set_frames(self, task: np.ndarray, acts: np.ndarray, rows: np.ndarray) -> None:
        self.task = np.array(task, dtype=np.float32, copy=True)  # owned, never shared
        self.acts = np.array(acts, dtype=np.float32, copy=True)
        self.info = np.array(rows, dtype=np.float64, copy=True)
        self.n = len(rows)

    def append_frame(self, task, action, row) -> None:
        if self.n == len(self.info):
            cap = max(32, 2 * len(self.info))
            grow = lambda a: np.concatenate([a[: self.n], np.zeros((cap - self.n, a.shape[1]), a.dtype)])  # noqa: E731
            self.info, self.task, self.acts = grow(self.info), grow(self.task), grow(self.acts)
        self.info[self.n] = row
        self.task[self.n] = task
        self.acts[self.n] = action
        self.n += 1

    def append_latent(self, latent: torch.Tensor) -> None:
        lat = latent[None].clone()
        if self.chunks and len(self.chunks[-1]) < LATENT_CHUNK:
            # A new tensor for the grown chunk: earlier states keep the old one.
            self.chunks = self.chunks[:-1] + [torch.cat([self.chunks[-1], lat])]
        else:
            self.chunks = self.chunks + [lat]


def _common_prefix(blocks: list[list[torch.Tensor]]) -> int:
    """How many leading cache blocks every list holds as the very same tensors."""
    first, n = blocks[0], min(len(b) for b in blocks)
    c = 0
    while c < n and all(b[c] is first[c] for b in blocks[1:]):
        c += 1
    return c


def _finite(value, n: int, name: str, unit: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.full(0, np.nan)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be {n} finite numbers ({unit}), got {value!r}")
    return arr


def _task_state(agent_pos, block_pose) -> np.ndarray:
    """Checked pusher position and T pose -> the task state token ``[6]`` float32."""
    agent = _finite(agent_pos, 2, "agent_pos", "px")
    block = _finite(block_pose, 3, "block_pose", "x, y px and angle rad")
    return features.state_from_poses(agent, block)
