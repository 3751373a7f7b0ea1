"""The causal world-action transformer of ``mini-dreamzero`` (DreamZero's
``CausalWanModel`` at CPU scale).

A frame is ``T_F = 16`` latent tokens (4x4 patches of a 16x16x4 VAE latent). Each layer
has block-causal self-attention with rotary positions over the frame index (so a sliding
window of cached keys stays valid), cross-attention over the prompt's tokens and the first
frame's image tokens (``clip_feas``), and an MLP. The first frame's latent (``ys``) is
concatenated to every frame's token input, as Wan's image-to-video conditioning does.

Two passes share the weights:

* **write**: a clean frame's tokens attend to the cache and to themselves; their keys and
  values (per layer) are what the KV cache stores -- observation tokens only;
* **denoise**: the next frame's noisy tokens plus an action token and a state token attend
  to the frozen cache and to themselves, and predict the flow-matching velocity; the state
  token predicts the next pusher position. Action and state tokens are never cached.

With ``state_map`` on, every frame's tokens also read a rasterised picture of that
frame's task state (``features.state_map``): a clean frame its own state, the frame being
denoised the next state that :class:`StateDynamics` predicted. The latent is generated
*conditioned on the predicted state*, so the decoded frame shows the T where the state
says it is.

Training runs both passes at once over a clip with a block-causal mask (teacher forcing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from arcfab_gym.models.mini_dreamzero import features
from arcfab_gym.tasks import pusht

_PAD, _NULL = 0, 1


def build_vocab(prompts: tuple[str, ...]) -> tuple[str, ...]:
    words = sorted({w for p in prompts for w in p.lower().split()})
    return ("<pad>", "<null>", *words)


@dataclass
class DynamicsConfig:
    latent_channels: int = 4
    latent_size: int = 16
    patch: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    mlp_ratio: int = 4
    local_attn_size: int = 16  # frames of keys the self-attention cache keeps
    num_frame_per_block: int = 1  # frames generated per call
    max_text_tokens: int = 8
    n_image_tokens: int = 4  # clip_feas: 2x2 pooled patches of the first frame
    n_mixture: int = 4  # components of the action-proposal mixture
    rope_base: float = 1000.0
    # The flow's target: the next latent itself (False), or its change from the previous
    # latent divided by ``delta_scale`` (True) -- static scene parts then sit at zero and
    # sampling noise cannot blur them.
    residual: bool = False
    delta_scale: float = 1.0
    # Frame tokens read a rasterised picture of the frame's task state (features.state_map).
    state_map: bool = False
    # What a residual flow's change is measured from: the previous latent ("previous"), or
    # the latent :class:`StateRenderer` draws from the frame's own task state ("render"):
    # the frame then cannot drift from its state however long the rollout.
    anchor: str = "previous"
    prompts: tuple[str, ...] = pusht.PROMPTS
    vocab: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.anchor not in ("previous", "render"):
            raise ValueError(f"anchor must be 'previous' or 'render', got {self.anchor!r}")
        if not self.vocab:
            self.vocab = build_vocab(tuple(self.prompts))
        self.prompts = tuple(self.prompts)
        self.vocab = tuple(self.vocab)

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_size // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch * self.patch

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def map_patch(self) -> int:
        return features.MAP_SIZE // (self.latent_size // self.patch)

    @property
    def map_dim(self) -> int:
        return features.MAP_CHANNELS * self.map_patch**2 if self.state_map else 0


@dataclass
class StateDynamicsConfig:
    hidden: int = 512
    layers: int = 3
    members: int = 1
    """Ensemble members: MLPs of the same shape beside one shared linear path. Their
    spread is the step's disagreement (``predict``)."""
    readout: str = "mean"
    """What the state follows: the members' ``mean`` change, or the ``first`` member's
    (when the others are weaker, trained only to measure the doubt)."""

    def __post_init__(self):
        if self.members < 1:
            raise ValueError(f"state dynamics needs at least one member, got {self.members}")
        if self.readout not in ("mean", "first"):
            raise ValueError(f"unknown state readout {self.readout!r}: mean or first")


#: Pixels per radian when the T's angle spread enters the disagreement: about the T's
#: half-length, so a turn counts as the distance its ends move.
ANGLE_PX_PER_RAD = 50.0


class StateDynamics(nn.Module):
    """The state token's dynamics: from the task state now and one frame before and the
    action, the next task state (``features`` has the layout). An ensemble of MLPs
    (``cfg.members``, their weights stacked so all run in one batched matmul per layer)
    predicts the scaled change (``features.DELTA_NAMES``); ``delta_scale`` (a buffer,
    saved with the weights) holds the per-column scales measured on the training data."""

    def __init__(self, cfg: StateDynamicsConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or StateDynamicsConfig()
        dims = [features.DYNAMICS_INPUT_DIM] + [cfg.hidden] * cfg.layers + [features.DELTA_DIM]
        E = cfg.members
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(E, a, b)
            for e in range(E):  # nn.Linear's initialisation, member by member
                lin = nn.Linear(a, b)
                w[e] = lin.weight.detach().T
            bound = 1.0 / math.sqrt(a)
            self.weight.append(nn.Parameter(w))
            self.bias.append(nn.Parameter(torch.empty(E, 1, b).uniform_(-bound, bound)))
        # A linear path beside the MLPs, fitted by least squares before training and then
        # frozen (``fit_linear``): the pusher's change is linear in these inputs (the fit
        # is off by 1e-5 px on held-out data), which an MLP alone only approximated (it
        # was left 4-7 px off). The MLPs, their last layer starting at zero, learn the
        # rest: the contacts.
        self.linear = nn.Linear(features.DYNAMICS_INPUT_DIM, features.DELTA_DIM)
        self.linear.requires_grad_(False)
        with torch.no_grad():
            self.weight[-1].zero_()
            self.bias[-1].zero_()
        self.register_buffer("delta_scale", torch.ones(features.DELTA_DIM))
        # The pusher is kinematic in gym-pusht (contacts never move it): its change is the
        # linear path's alone, and the MLPs' pusher outputs are masked out.
        mask = torch.ones(features.DELTA_DIM)
        mask[: features.DELTA_NAMES.index("d_agent_y") + 1] = 0.0
        self.register_buffer("mlp_mask", mask, persistent=False)

    @classmethod
    def load(cls, path, config: dict) -> StateDynamics:
        """The state dynamics saved at ``path`` (a safetensors file, in the current or the
        pre-ensemble layout) with the settings ``config`` (config.json's
        ``state_dynamics``)."""
        from safetensors.torch import load_file

        model = cls(StateDynamicsConfig(**config))
        model.load_state_dict(cls.upgrade_state_dict(load_file(str(path))))
        return model

    @staticmethod
    def upgrade_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights saved before the ensemble (one ``nn.Sequential`` MLP: ``mlp.{2i}.weight``
        ``[out, in]``) -> one member in the stacked layout; newer ones pass unchanged."""
        if not any(k.startswith("mlp.") for k in sd):
            return sd
        out = {k: v for k, v in sd.items() if not k.startswith("mlp.")}
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("mlp.")})
        for i, j in enumerate(idx):
            out[f"weight.{i}"] = sd[f"mlp.{j}.weight"].T[None].contiguous()
            out[f"bias.{i}"] = sd[f"mlp.{j}.bias"][None, None].contiguous()
        return out

    @torch.no_grad()
    def fit_linear(self, now, prev, action, last_action, nxt) -> None:
        """Least-squares fit of the linear path to the scaled change from ``now`` to
        ``nxt`` (all ``[N, ...]``), in float64, by the normal equations with a tiny ridge:
        deterministic even when inputs are collinear (LAPACK's rank-revealing ``lstsq``
        returned different solutions run to run on small data sets)."""
        x = features.dynamics_input(now, prev, action, last_action).double()
        y = (features.delta_target(now, nxt) / self.delta_scale).double()
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        gram = x1.T @ x1
        ridge = 1e-9 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        w = torch.linalg.solve(gram + ridge, x1.T @ y)  # [in + 1, out]
        self.linear.weight.copy_(w[:-1].T.float())
        self.linear.bias.copy_(w[-1].float())

    def member_deltas(self, now, prev, action, last_action) -> torch.Tensor:
        """Each member's scaled change ``[E, B, 5]``: inputs ``[B, ...]`` (the same for
        every member) or ``[E, B, ...]`` (one state per member, as in training)."""
        x = features.dynamics_input(now, prev, action, last_action)
        E = self.cfg.members
        h = x if x.dim() == 3 else x.expand(E, *x.shape)
        last = len(self.weight) - 1
        for i, (w, b) in enumerate(zip(self.weight, self.bias)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = F.silu(h)
        return h * self.mlp_mask + self.linear(x)

    def _next(self, now, deltas: torch.Tensor) -> torch.Tensor:
        delta = deltas[0] if self.cfg.readout == "first" else deltas.mean(0)
        return features.apply_delta(now, delta * self.delta_scale)

    def forward(self, now: torch.Tensor, prev: torch.Tensor, action: torch.Tensor,
                last_action: torch.Tensor) -> torch.Tensor:
        """States now and before ``[B, 6]``, the action ``[B, 2]`` and the one that led
        to ``now`` ``[B, 2]`` -> the next state ``[B, 6]`` (``cfg.readout``)."""
        return self._next(now, self.member_deltas(now, prev, action, last_action))

    def predict(self, now, prev, action, last_action, *,
                members: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next state ``[B, 6]`` and the members' disagreement about it ``[B]``: the
        standard deviation over members of the T's predicted position (px) plus that of
        its angle times ``ANGLE_PX_PER_RAD``; zero with one member. ``members`` ``[B]``
        (int64) picks the member each row's state follows (-1: ``cfg.readout``)."""
        deltas = self.member_deltas(now, prev, action, last_action)
        nxt = self._next(now, deltas)
        if members is not None:
            rows = members >= 0
            if rows.any():
                own = deltas[members.clamp(min=0), torch.arange(len(members))]  # [B, 5]
                picked = features.apply_delta(now, own * self.delta_scale)
                nxt = torch.where(rows[:, None], picked, nxt)
        if self.cfg.members == 1:
            return nxt, torch.zeros(nxt.shape[0])
        d = deltas * self.delta_scale  # [E, B, 5], the T's part in its own frame at `now`
        pos_px = d[..., 2:4] * (pusht.WORLD_SIZE / 2)
        spread = pos_px.var(0, unbiased=False).sum(-1).sqrt() + ANGLE_PX_PER_RAD * d[..., 4].std(0, unbiased=False)
        return nxt, spread


@dataclass
class RendererConfig:
    width: int = 64
    blocks: int = 2
    latent_channels: int = 4
    map_size: int = 64  # the maps it reads: the frame's resolution, 4x the latent's


class StateRenderer(nn.Module):
    """Draws a frame's latent from its task state: the state map (the T's area, the
    pusher's disc, ``features.state_map``) and the goal region's map, at the frame's
    resolution -> ``[B, C, 16, 16]``, regressed on the VAE's latents of real frames. A
    Push-T picture is a function of those three shapes, so this is the part of a frame
    the state fixes; the video flow (``DynamicsConfig.anchor = "render"``) generates
    the rest. Shaped like the VAE's encoder: two strided convolutions down to the latent
    grid, then residual 3x3 blocks.
    """

    def __init__(self, cfg: RendererConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or RendererConfig()
        w = cfg.width
        self.stem = nn.Sequential(
            nn.Conv2d(features.MAP_CHANNELS + 1, w // 2, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w // 2, w, 4, stride=2, padding=1),  # map_size / 4 = the latent grid
        )  # fmt: skip
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1))
            for _ in range(cfg.blocks)
        )
        self.out = nn.Conv2d(w, cfg.latent_channels, 1)

    def goal_maps(self, prompts) -> torch.Tensor:
        """The goal map of each prompt at this renderer's resolution ``[B, 1, M, M]``."""
        return features.goal_map(prompts, self.cfg.map_size)

    def forward(self, state: torch.Tensor, goal_map: torch.Tensor) -> torch.Tensor:
        """Task states ``[B, 6]`` and goal maps ``[B, 1, M, M]`` -> latents ``[B, C, M/4, M/4]``."""
        x = self.stem(torch.cat([features.state_map(state, self.cfg.map_size), goal_map], dim=1))
        for blk in self.blocks:
            x = x + blk(F.silu(x))
        return self.out(F.silu(x))


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """[..., C, H, W] -> [..., (H/p)(W/p), C p p]."""
    *lead, c, h, w = z.shape
    n = len(lead)
    x = z.reshape(*lead, c, h // p, p, w // p, p)
    x = x.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)  # [..., h/p, w/p, C, p, p]
    return x.reshape(*lead, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, c: int, h: int, w: int, p: int) -> torch.Tensor:
    """[..., (H/p)(W/p), C p p] -> [..., C, H, W]."""
    *lead, _, _ = x.shape
    n = len(lead)
    x = x.reshape(*lead, h // p, w // p, c, p, p)
    x = x.permute(*range(n), n + 2, n, n + 3, n + 1, n + 4)
    return x.reshape(*lead, c, h, w)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[...] -> [..., dim] sinusoidal embedding of values in about [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = t[..., None].float() * 1000.0 * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class Rope(nn.Module):
    """Rotary embedding over the frame index, applied to all head dims."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, H, L, hd], pos [L] or [B, L] (float) -> rotated x."""
        ang = pos[..., None].float() * self.inv_freq  # [(B,) L, hd/2]
        if ang.dim() == 3:
            ang = ang[:, None]
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return out.flatten(-2)


@dataclass(frozen=True)
class SharedPrefixCache:
    """One layer's self-attention cache for a batch of worlds whose first cached frames
    are the same tensors (forks of one state): those keys / values once, ``[2, H, Lp, hd]``
    (the conditional and unconditional branch), and each world's own later ones
    ``[2B, H, Lr, hd]`` (rows 2b, 2b + 1 = world b's branches), or None."""

    k: torch.Tensor
    v: torch.Tensor
    rest_k: torch.Tensor | None = None
    rest_v: torch.Tensor | None = None


def _branch_major(x: torch.Tensor) -> torch.Tensor:
    """``[2B, H, n, e]`` (rows 2b, 2b + 1 = world b's branches) -> ``[2, H, B, n, e]``."""
    b2, h, n, e = x.shape
    return x.view(b2 // 2, 2, h, n, e).permute(1, 2, 0, 3, 4)


def shared_prefix_attention(q, k, v, cache: SharedPrefixCache, mask=None) -> torch.Tensor:
    """Attention of queries ``q`` ``[2B, H, n, hd]`` over a shared prefix, each world's own
    cached frames and its new keys ``k``, ``v``: softmax over all of them, as
    ``scaled_dot_product_attention`` over the concatenated keys would give (to rounding).
    The prefix is never copied per world: every world's queries meet it in one matmul
    per branch and head, which is where a batch of forks spends its attention.
    ``mask`` ``[2B, 1, 1, Lr + n]`` (True = attend) covers the worlds' own keys."""
    b2, h, n, hd = q.shape
    B, scale = b2 // 2, hd**-0.5
    qb = _branch_major(q * scale)  # [2, H, B, n, hd]
    lp = cache.k.shape[2]
    s_pre = (qb.reshape(2, h, B * n, hd) @ cache.k.transpose(-1, -2)).view(2, h, B, n, lp)
    own_k, own_v = k, v
    if cache.rest_k is not None:
        own_k, own_v = torch.cat([cache.rest_k, k], dim=2), torch.cat([cache.rest_v, v], dim=2)
    s_own = qb @ _branch_major(own_k).transpose(-1, -2)  # [2, H, B, n, Lr + n]
    if mask is not None:
        s_own = s_own.masked_fill(~_branch_major(mask.expand(b2, 1, 1, own_k.shape[2])), float("-inf"))
    top = torch.maximum(s_pre.amax(-1, keepdim=True), s_own.amax(-1, keepdim=True))
    e_pre, e_own = s_pre.sub_(top).exp_(), s_own.sub_(top).exp_()  # in place: fresh tensors
    out = (e_pre.view(2, h, B * n, lp) @ cache.v).view(2, h, B, n, hd)
    out.add_(e_own @ _branch_major(own_v))
    out.div_(e_pre.sum(-1, keepdim=True).add_(e_own.sum(-1, keepdim=True)))
    return out.permute(2, 0, 1, 3, 4).reshape(b2, h, n, hd)


class Block(nn.Module):
    def __init__(self, cfg: DynamicsConfig, rope: Rope):
        super().__init__()
        d, self.h, self.hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.rope = rope
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.q_cross = nn.Linear(d, d)
        self.kv_cross = nn.Linear(d, 2 * d)
        self.proj_cross = nn.Linear(d, d)
        self.norm3 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d)
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.h, self.hd).transpose(1, 2)  # [B, H, L, hd]

    def cross_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, Lc, d] -> cacheable cross-attention keys/values [B, H, Lc, hd] x 2."""
        k, v = self.kv_cross(context).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x: torch.Tensor,  # [B, L, d]
        pos: torch.Tensor,  # [L] frame index of each token
        cross: tuple[torch.Tensor, torch.Tensor],  # [B, H, Lc, hd] x 2
        cache: tuple[torch.Tensor, torch.Tensor] | SharedPrefixCache | None = None,  # [B, H, Lk, hd] x 2
        mask: torch.Tensor | None = None,  # [B, 1, 1, Lk + L] bool, True = attend
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the new hidden states and this pass's (roped) keys and values."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        q, k = self.rope(q, pos), self.rope(k, pos)
        if isinstance(cache, SharedPrefixCache):
            att = shared_prefix_attention(q, k, v, cache, mask)
        else:
            if cache is not None:
                keys, values = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            else:
                keys, values = k, v
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        qc = self._heads(self.q_cross(self.norm2(x)))
        att = F.scaled_dot_product_attention(qc, cross[0], cross[1])
        x = x + self.proj_cross(att.transpose(1, 2).reshape(b, n, d))
        x = x + self.mlp(self.norm3(x))
        return x, (k, v)


class WorldTransformer(nn.Module):
    """The dynamics network plus its heads. Shapes: ``T_F`` tokens per frame, ``P`` =
    patch dim (64), ``d`` = model width."""

    def __init__(self, cfg: DynamicsConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DynamicsConfig()
        d, P, tf = cfg.d_model, cfg.patch_dim, cfg.tokens_per_frame
        self.rope = Rope(cfg.head_dim, cfg.rope_base)
        self.word = nn.Embedding(len(cfg.vocab), d)
        self.text_pos = nn.Parameter(torch.zeros(cfg.max_text_tokens, d))
        self.img_proj = nn.Linear(cfg.latent_channels * (cfg.latent_size // 2) ** 2, d)
        self.img_pos = nn.Parameter(torch.zeros(cfg.n_image_tokens, d))
        self.in_proj = nn.Linear(2 * P + cfg.map_dim, d)  # [latent patch, ys patch, state map]
        self.spatial = nn.Parameter(torch.randn(tf, d) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(64, d), nn.SiLU(), nn.Linear(d, d))
        self.action_in = nn.Linear(2, d)
        self.state_in = nn.Linear(4, d)
        self.type_emb = nn.Parameter(torch.randn(2, d) * 0.02)  # action, state
        self.blocks = nn.ModuleList(Block(cfg, self.rope) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(d)
        self.velocity = nn.Linear(d, P)
        self.next_agent = nn.Linear(d, 2)
        # Heads on a clean frame (pooled tokens) and the goal prompt (pooled text).
        self.head_trunk = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU())
        self.coverage = nn.Linear(d, 1)
        self.success = nn.Linear(d, 1)
        self.block_pose = nn.Linear(d, 4)  # x, y (normalised), sin, cos
        self.action_mdn = nn.Linear(d, cfg.n_mixture * 5)  # logit, mean (2), log std (2)
        nn.init.zeros_(self.velocity.weight)
        nn.init.zeros_(self.velocity.bias)

    # --- conditioning -------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> token ids [B, max_text_tokens] (the language key of the state)."""
        index = {w: i for i, w in enumerate(self.cfg.vocab)}
        out = torch.full((len(prompts), self.cfg.max_text_tokens), _PAD, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids = [index[w] for w in p.lower().split()][: self.cfg.max_text_tokens]
            out[b, : len(ids)] = torch.tensor(ids)
        return out

    def encode_text(self, ids: torch.Tensor, null: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, Lt] -> text tokens [B, Lt, d]; rows where ``null`` is True get the
        unconditional (CFG) text."""
        if null is not None:
            ids = torch.where(null[:, None], torch.full_like(ids, _NULL), ids)
        return self.word(ids) + self.text_pos

    def encode_image(self, first_latent: torch.Tensor) -> torch.Tensor:
        """first frame latent [B, C, S, S] -> clip_feas [B, 4, d] (2x2 pooled patches)."""
        s = self.cfg.latent_size // 2
        return self.img_proj(patchify(first_latent, s)) + self.img_pos

    def cross_context(self, text: torch.Tensor, image: torch.Tensor) -> list:
        """Per-layer cross-attention keys/values over [text; image] (the cross cache)."""
        ctx = torch.cat([text, image], dim=1)
        return [blk.cross_kv(ctx) for blk in self.blocks]

    # --- token builders -------------------------------------------------------------------
    def map_tokens(self, state: torch.Tensor) -> torch.Tensor:
        """Task states [B, 6] -> their state maps, patchified like the latent [B, T_F, M]."""
        return patchify(features.state_map(state), self.cfg.map_patch)

    def frame_tokens(self, latent: torch.Tensor, ys: torch.Tensor, t: torch.Tensor,
                     smap: torch.Tensor | None = None) -> torch.Tensor:
        """latent, ys [B, C, S, S] (or already patchified [B, T_F, P]); t [B] noise level
        (1 = clean); smap [B, T_F, M] the frame's state map tokens (``state_map`` weights
        only) -> [B, T_F, d]."""
        p = self.cfg.patch
        lat = latent if latent.dim() == 3 else patchify(latent, p)
        y = ys if ys.dim() == 3 else patchify(ys, p)
        parts = [lat, y]
        if self.cfg.state_map:
            if smap is None:
                raise ValueError("these weights condition frames on the task state: pass smap")
            parts.append(smap)
        x = self.in_proj(torch.cat(parts, dim=-1)) + self.spatial
        return x + self.time_mlp(sinusoid(t, 64))[:, None]

    def control_tokens(self, action: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """action [B, 2] in [-1, 1], state [B, 4] (pusher now and one frame before,
        normalised) -> [B, 2, d]."""
        a = self.action_in(action) + self.type_emb[0]
        s = self.state_in(state) + self.type_emb[1]
        return torch.stack([a, s], dim=1)

    # --- passes ----------------------------------------------------------------------------
    def run(self, x, pos, cross, caches=None, mask=None):
        """Through every block; returns final hidden [B, L, d] and per-layer (k, v)."""
        kvs = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, pos, cross[i], None if caches is None else caches[i], mask)
            kvs.append(kv)
        return self.norm_out(x), kvs

    def heads(self, hidden: torch.Tensor, goal_text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clean-frame hidden [..., T_F, d] and goal text tokens [..., Lt, d] -> head outputs."""
        feat = torch.cat([hidden.mean(-2), goal_text.mean(-2)], dim=-1)
        h = self.head_trunk(feat)
        mdn = self.action_mdn(h).unflatten(-1, (self.cfg.n_mixture, 5))
        return {
            "coverage": torch.sigmoid(self.coverage(h)).squeeze(-1),
            "success_logit": self.success(h).squeeze(-1),
            "block_pose": self.block_pose(h),
            "mdn_logits": mdn[..., 0],
            "mdn_mean": torch.tanh(mdn[..., 1:3]),
            "mdn_log_std": mdn[..., 3:5].clamp(-5, 1),
        }
