"""A small convolutional VAE: 64x64 RGB frames <-> 16x16x4 latents (DreamZero's
``WanVideoVAE``, at CPU scale)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VAEConfig:
    frame_size: int = 64
    latent_channels: int = 4
    width: int = 64  # channels at 16x16; half at 32x32, a quarter at 64x64


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
    )  # fmt: skip


class FrameVAE(nn.Module):
    """Encoder: [B, 3, 64, 64] in [0, 1] -> mean, logvar [B, C, 16, 16]; decoder inverts.

    ``latent_scale`` (a buffer, set after training) makes latents roughly unit-variance,
    which is what the flow-matching dynamics expects.
    """

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        w, c = cfg.width, cfg.latent_channels
        # Strided convs go down to 16x16 quickly (cheap on a CPU); the residual-free 3x3
        # blocks work at 16x16 and 32x32 only.
        self.enc = nn.Sequential(
            nn.Conv2d(3, w // 2, 4, stride=2, padding=1), nn.SiLU(),  # 32x32
            nn.Conv2d(w // 2, w, 4, stride=2, padding=1), nn.SiLU(),  # 16x16
            _block(w, w), nn.Conv2d(w, 2 * c, 1),
        )  # fmt: skip
        self.dec = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.SiLU(), _block(w, w),
            nn.ConvTranspose2d(w, w // 2, 4, stride=2, padding=1), nn.SiLU(),  # 32x32
            nn.Conv2d(w // 2, w // 2, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(w // 2, w // 4, 4, stride=2, padding=1), nn.SiLU(),  # 64x64
            nn.Conv2d(w // 4, 3, 3, padding=1),
        )  # fmt: skip
        self.register_buffer("latent_scale", torch.ones(()))

    def encode_dist(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [B, 3, H, W] in [0, 1] -> (mean, logvar) [B, C, H/4, W/4], unscaled."""
        mean, logvar = self.enc(frames * 2 - 1).chunk(2, dim=1)
        return mean, logvar.clamp(-12, 6)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, 3, H, W] in [0, 1] -> scaled latent means [B, C, H/4, W/4]."""
        return self.encode_dist(frames)[0] / self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents [B, C, h, w] -> frames [B, 3, 4h, 4w] in [0, 1]."""
        return torch.sigmoid(self.dec(latents * self.latent_scale))

    def loss(self, frames: torch.Tensor, *, kl_weight: float = 1e-5, fg_weight: float = 10.0):
        """Weighted reconstruction + KL. Pixels that are not white background (the T, the
        pusher, the goal) weigh ``fg_weight`` times more: they are what matters."""
        mean, logvar = self.encode_dist(frames)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = torch.sigmoid(self.dec(z))
        fg = (frames.min(dim=1, keepdim=True).values < 0.9).float()
        weight = 1.0 + (fg_weight - 1.0) * fg
        rec = (weight * (recon - frames).abs()).mean() + (weight * (recon - frames) ** 2).mean()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        return rec + kl_weight * kl, {"recon": rec.detach(), "kl": kl.detach(), "out": recon}


def frames_to_tensor(frames) -> torch.Tensor:
    """uint8 [..., H, W, 3] (numpy or torch) -> float [..., 3, H, W] in [0, 1]."""
    t = torch.as_tensor(frames)
    return t.movedim(-1, -3).float() / 255.0


def tensor_to_frames(t: torch.Tensor):
    """float [..., 3, H, W] in [0, 1] -> uint8 numpy [..., H, W, 3]."""
    return (t.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of frames in [0, 1], [B, 3, H, W] -> [B]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


__all__ = ["FrameVAE", "VAEConfig", "frames_to_tensor", "psnr", "tensor_to_frames"]
