"""A tiny random-initialised DreamZero for tests on a CPU, and the full 14B shapes.

The DiT (``CausalWanModel``), the policy head (``WANPolicyHead``) and the text encoder
(``WanTextEncoder``) are DreamZero's own classes at a tiny size. Two frozen encoders cannot
be built small (CLIP ViT-H; the Wan VAE makes a CUDA tensor in ``__init__``), so they are
replaced by stand-ins with the same methods and output shapes:

* :class:`TinyImageEncoder` -- ``encode_image`` -> ``[B, 257, 1280]`` (pooled patches);
* :class:`TinyVideoVAE` -- ``encode`` / ``decode`` with 8x spatial and 4x temporal
  compression, the first frame kept on its own (as Wan's causal VAE does).

Their weights are written as ``.pth`` files so that nothing is downloaded (the head loads
every frozen encoder from a ``*_pretrained_path``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The DROID 14B configuration's shapes (Wan2.1-I2V-14B DiT: 40 layers, dim 5120, 40 heads;
#: three 176x320 views tiled into 352x640 -> 44x80 latent -> 880 tokens per latent frame;
#: 2 latent frames per block;
#: 4 blocks of history + the first frame; 24 x 32 action chunks; T5 text of 512 tokens).
FULL_14B: dict[str, Any] = {
    "num_layers": 40, "dim": 5120, "num_heads": 40, "frame_seqlen": 880, "text_len": 512,
    "num_frame_per_block": 2, "max_chunk_size": 4, "action_horizon": 24, "action_dim": 32,
    "latent_channels": 16, "latent_h": 44, "latent_w": 80, "num_frames": 33,
    "clip_tokens": 257, "clip_dim": 1280, "dtype_bytes": 2,
}  # fmt: skip


class _Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(n_out, n_in, generator=g) / n_in**0.5)


class TinyImageEncoder(nn.Module):
    """Stand-in for ``WanImageEncoder``: 16x16 pooled patches plus a mean token, each
    projected to 1280 features (CLIP ViT-H's width and token count)."""

    def __init__(self, image_encoder_pretrained_path: str | None = None):
        super().__init__()
        self.model = _Linear(3, 1280, seed=11)
        self.image_encoder_pretrained_path = image_encoder_pretrained_path

    def encode_image(self, videos: torch.Tensor) -> torch.Tensor:
        # videos: [B, 1, 3, H, W] in [-1, 1] (the head passes the first frame)
        x = videos[:, 0]
        pooled = nn.functional.adaptive_avg_pool2d(x.float(), 16).flatten(2).transpose(1, 2)
        tokens = torch.cat([pooled.mean(1, keepdim=True), pooled], dim=1)  # [B, 257, 3]
        w = self.model.weight.float()
        return (tokens @ w.t()).to(videos.dtype)


class TinyVideoVAE(nn.Module):
    """Stand-in for ``WanVideoVAE`` (z_dim 16): 8x8 pixel patches -> 16 channels by a fixed
    random projection, frame 0 alone then groups of 4 frames averaged; ``decode`` inverts
    it (pseudo-inverse, each latent frame repeated 4 times)."""

    upsampling_factor = 8

    def __init__(self, z_dim: int = 16, vae_pretrained_path: str | None = None):
        super().__init__()
        self.z_dim = z_dim
        self.model = _Linear(3 * 64, z_dim, seed=12)
        self.vae_pretrained_path = vae_pretrained_path

    def _proj(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.model.weight.float()
        return w, torch.linalg.pinv(w)

    def encode(self, videos, tiled=False, tile_size=(34, 34), tile_stride=(18, 16)):
        # videos: [B, 3, T, H, W] in [-1, 1], T = 1 + 4k
        x = videos.float()
        first, rest = x[:, :, :1], x[:, :, 1:]
        b, c, t, h, w = rest.shape
        if t % 4:
            raise ValueError(f"the VAE takes 1 + 4k frames, got {t + 1}")
        groups = rest.reshape(b, c, t // 4, 4, h, w).mean(3) if t else rest
        x = torch.cat([first, groups], dim=2)  # [B, 3, 1 + k, H, W]
        b, c, n, h, w = x.shape
        p = nn.functional.pixel_unshuffle(x.transpose(1, 2).reshape(b * n, c, h, w), 8)
        proj, _ = self._proj()
        z = torch.einsum("oc,bchw->bohw", proj, p)
        return z.reshape(b, n, self.z_dim, h // 8, w // 8).transpose(1, 2).to(videos.dtype)

    def decode(self, hidden_states, tiled=False, tile_size=(34, 34), tile_stride=(18, 16)):
        z = hidden_states.float()  # [B, 16, n, h, w]
        b, c, n, h, w = z.shape
        _, inv = self._proj()
        p = torch.einsum("co,bohw->bchw", inv, z.transpose(1, 2).reshape(b * n, c, h, w))
        x = nn.functional.pixel_shuffle(p, 8).reshape(b, n, 3, h * 8, w * 8).transpose(1, 2)
        frames = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        return frames.clamp(-1, 1).to(hidden_states.dtype)


#: The tiny head of the vendored ABOUT.md: i2v DiT, 2 layers, dim 64, 2 heads, 4 tokens per
#: latent frame (a 32x32 video), text_len 16, text_dim 32, 4 actions per block of 2 latent
#: frames, max_chunk_size 4 (local_attn_size 9).
TINY = {
    "num_layers": 2, "dim": 64, "ffn_dim": 128, "num_heads": 2, "frame_seqlen": 4,
    "text_len": 16, "text_dim": 32, "num_frame_per_block": 2, "max_chunk_size": 4,
    "action_horizon": 4, "action_dim": 8, "max_state_dim": 8, "num_frames": 33,
    "image_size": 32, "vocab": 260,
}  # fmt: skip


def tiny_head_config(weights_dir: str | Path, *, tiny: dict[str, Any] | None = None) -> dict:
    """``WANPolicyHeadConfig`` arguments for the tiny head whose frozen-encoder weights
    are (or will be) in ``weights_dir`` (see :func:`write_tiny_encoders`)."""
    t = {**TINY, **(tiny or {})}
    d = Path(weights_dir)
    return {
        "diffusion_model_cfg": {
            "_target_": "groot.vla.model.dreamzero.modules.wan_video_dit_action_casual_chunk.CausalWanModel",
            "model_type": "i2v", "frame_seqlen": t["frame_seqlen"], "text_len": t["text_len"],
            "in_dim": 36, "dim": t["dim"], "ffn_dim": t["ffn_dim"], "freq_dim": 32,
            "text_dim": t["text_dim"], "out_dim": 16, "num_heads": t["num_heads"],
            "num_layers": t["num_layers"], "max_chunk_size": t["max_chunk_size"],
            "num_frame_per_block": t["num_frame_per_block"], "action_dim": t["action_dim"],
            "max_state_dim": t["max_state_dim"], "hidden_size": 32,
            "num_action_per_block": t["action_horizon"], "num_state_per_block": 1,
        },
        "text_encoder_cfg": {
            "_target_": "groot.vla.model.dreamzero.modules.wan_video_text_encoder.WanTextEncoder",
            "vocab": t["vocab"], "dim": t["text_dim"], "dim_attn": t["text_dim"],
            "dim_ffn": 2 * t["text_dim"], "num_heads": 2, "num_layers": 1, "num_buckets": 8,
            "text_encoder_pretrained_path": str(d / "text_encoder.pth"),
        },
        "image_encoder_cfg": {
            "_target_": "arcfab_gym.models.dreamzero.tiny.TinyImageEncoder",
            "image_encoder_pretrained_path": str(d / "image_encoder.pth"),
        },
        "vae_cfg": {
            "_target_": "arcfab_gym.models.dreamzero.tiny.TinyVideoVAE",
            "vae_pretrained_path": str(d / "vae.pth"),
        },
        "num_frames": t["num_frames"], "num_frame_per_block": t["num_frame_per_block"],
        "action_dim": t["action_dim"], "action_horizon": t["action_horizon"],
        "hidden_size": 32, "input_embedding_dim": 64, "backbone_embedding_dim": 64,
        "tiled": False, "train_architecture": "full", "skip_component_loading": True,
        "use_gradient_checkpointing": False, "num_inference_timesteps": 4,
        "max_state_dim": t["max_state_dim"],
    }  # fmt: skip


def write_tiny_encoders(
    weights_dir: str | Path, *, tiny: dict | None = None, seed: int = 0, src=None
) -> Path:
    """Write the frozen encoders' ``.pth`` files (text encoder random at ``seed``)."""
    from arcfab_gym.models.dreamzero.runtime import import_dreamzero

    import_dreamzero(src)
    from groot.vla.model.dreamzero.modules.wan_video_text_encoder import WanTextEncoder

    cfg = tiny_head_config(weights_dir, tiny=tiny)
    d = Path(weights_dir)
    d.mkdir(parents=True, exist_ok=True)
    kw = {k: v for k, v in cfg["text_encoder_cfg"].items() if not k.startswith("_")}
    kw.pop("text_encoder_pretrained_path")
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text = WanTextEncoder(**kw)
    finally:
        torch.random.set_rng_state(rng)
    torch.save(text.state_dict(), d / "text_encoder.pth")
    torch.save(TinyImageEncoder().model.state_dict(), d / "image_encoder.pth")
    torch.save(TinyVideoVAE().model.state_dict(), d / "vae.pth")
    return d


def write_tiny_checkpoint(
    out: str | Path, *, seed: int = 0, tiny: dict | None = None, src=None
) -> Path:
    """A DreamZero-format checkpoint directory at the tiny size: ``config.json`` (a VLA
    config whose ``action_head_cfg.config`` is the head's) and ``model.safetensors``
    (weights under ``action_head.``), as DreamZero's loader reads them; the frozen
    encoders' ``.pth`` files beside them. Random weights drawn from ``seed``."""
    from safetensors.torch import save_file

    from arcfab_gym.models.dreamzero.runtime import build_head

    out = Path(out)
    write_tiny_encoders(out, tiny=tiny, seed=seed, src=src)
    cfg = tiny_head_config(out, tiny=tiny)
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        head = build_head(copy.deepcopy(cfg), device="cpu", src=src)
    finally:
        torch.random.set_rng_state(rng)
    weights = {f"action_head.{k}": v.contiguous() for k, v in head.state_dict().items()
               if not k.startswith(("text_encoder.", "image_encoder.", "vae."))}  # fmt: skip
    save_file(weights, str(out / "model.safetensors"))
    vla = {"action_head_cfg": {"_target_": "groot...WANPolicyHead", "config": cfg},
           "action_horizon": cfg["action_horizon"], "action_dim": cfg["action_dim"]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(vla, indent=1))
    return out
