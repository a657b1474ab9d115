"""Networks for action-chunk policies (pure PyTorch; no ROS, sim or drivers).

- `ConditionalUnet1D`: the 1-D convolutional U-Net denoiser of Diffusion Policy (Chi et al., 2023):
  residual conv blocks over the action sequence, FiLM (per-channel scale and bias) conditioning on
  the flattened observation features plus a sinusoidal embedding of the diffusion step, and an
  optional second time embedding (zero-initialised) for a consistency student's stop time.
- `ObsEncoder`: per-camera ResNet-18 with GroupNorm instead of BatchNorm and a spatial-softmax
  keypoint head, random crop in training (centre crop in evaluation), plus an MLP over the
  concatenated, normalised low-dimensional keys. Each frame is encoded once; windows are built by
  stacking per-frame features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(cin, cout, kernel, padding=kernel // 2), nn.GroupNorm(groups, cout), nn.Mish())

    def forward(self, x):
        return self.net(x)


class FiLMResBlock(nn.Module):
    """Two conv blocks; the condition scales and shifts the first block's output per channel."""

    def __init__(self, cin: int, cout: int, cond_dim: int, kernel: int, groups: int, dropout: float):
        super().__init__()
        self.b1 = ConvBlock(cin, cout, kernel, groups)
        self.b2 = ConvBlock(cout, cout, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * cout))
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cond):
        h = self.b1(x)
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = h * (1 + scale) + bias
        h = self.b2(self.drop(h))
        return h + self.skip(x)


class ConditionalUnet1D(nn.Module):
    def __init__(self, action_dim: int, cond_dim: int, down_dims: Sequence[int] = (64, 128, 256), kernel: int = 5,
                 groups: int = 8, step_embed_dim: int = 128, dropout: float = 0.0, stop_time: bool = False):
        super().__init__()
        self.step_embed = nn.Sequential(SinusoidalEmbedding(step_embed_dim), nn.Linear(step_embed_dim, 4 * step_embed_dim),
                                        nn.Mish(), nn.Linear(4 * step_embed_dim, step_embed_dim))
        self.stop_embed = None
        if stop_time:
            self.add_stop_time()
        c = cond_dim + step_embed_dim
        dims = [action_dim, *down_dims]
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(down_dims) - 1
            self.down.append(nn.ModuleList([FiLMResBlock(a, b, c, kernel, groups, dropout),
                                            FiLMResBlock(b, b, c, kernel, groups, dropout),
                                            nn.Conv1d(b, b, 3, 2, 1) if not last else nn.Identity()]))
        mid = down_dims[-1]
        self.mid = nn.ModuleList([FiLMResBlock(mid, mid, c, kernel, groups, dropout) for _ in range(2)])
        self.up = nn.ModuleList()
        rev = list(reversed(down_dims))
        for a, b in zip(rev[:-1], rev[1:]):
            self.up.append(nn.ModuleList([FiLMResBlock(2 * a, b, c, kernel, groups, dropout),
                                          FiLMResBlock(b, b, c, kernel, groups, dropout),
                                          nn.ConvTranspose1d(b, b, 4, 2, 1)]))
        self.final = nn.Sequential(ConvBlock(down_dims[0], down_dims[0], kernel, groups),
                                   nn.Conv1d(down_dims[0], action_dim, 1))
        self.step_embed_dim = step_embed_dim

    def add_stop_time(self) -> None:
        """A second time input (a consistency student's stop time s), zero-initialised so that the
        network starts out computing exactly what it computed before."""
        d = self.step_embed[0].dim
        self.stop_embed = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, d))
        nn.init.zeros_(self.stop_embed[1].weight)
        nn.init.zeros_(self.stop_embed[1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, s: torch.Tensor | None = None):
        """x: (B, horizon, action_dim) -> same shape. t: (B,) diffusion steps. cond: (B, cond_dim)."""
        emb = self.step_embed(t)
        if self.stop_embed is not None and s is not None:
            emb = emb + self.stop_embed(s)
        c = torch.cat([emb, cond], dim=-1)
        h = x.transpose(1, 2)
        skips = []
        for r1, r2, down in self.down:
            h = r2(r1(h, c), c)
            skips.append(h)
            h = down(h)
        for r in self.mid:
            h = r(h, c)
        for r1, r2, up in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(r2(r1(h, c), c))
        return self.final(h).transpose(1, 2)


class SpatialSoftmax(nn.Module):
    """Expected 2-D image coordinates of each of K learned keypoint maps (Levine et al., 2016)."""

    def __init__(self, channels: int, keypoints: int = 32):
        super().__init__()
        self.proj = nn.Conv2d(channels, keypoints, 1)
        self.keypoints = keypoints

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        b, _, h, w = feat.shape
        logits = self.proj(feat).flatten(2)  # (B, K, H*W)
        attn = F.softmax(logits, dim=-1)
        ys = torch.linspace(-1, 1, h, device=feat.device)
        xs = torch.linspace(-1, 1, w, device=feat.device)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx.flatten(), gy.flatten()], dim=-1)  # (H*W, 2)
        return (attn @ grid).flatten(1)  # (B, 2K)


def resnet18_groupnorm(weights_path: str | None = None) -> nn.Module:
    """ResNet-18 trunk with GroupNorm, no pretrained download; an optional local weights file
    (safetensors) is loaded where shapes match (BatchNorm statistics are not used)."""
    import torchvision

    net = torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(c // 16, c))
    if weights_path:
        from safetensors.torch import load_file

        state = load_file(weights_path)
        own = net.state_dict()
        net.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    return nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc: (B, 512, h/32, w/32)


class ImageEncoder(nn.Module):
    def __init__(self, crop: int, out_dim: int = 64, keypoints: int = 32, weights_path: str | None = None):
        super().__init__()
        self.crop = crop
        self.trunk = resnet18_groupnorm(weights_path)
        self.pool = SpatialSoftmax(512, keypoints)
        self.out = nn.Linear(2 * keypoints, out_dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img: (N, H, W, 3) uint8 -> (N, out_dim). Random crop in training, centre crop otherwise."""
        x = img.permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        c = min(self.crop, h, w)
        if self.training:
            i = torch.randint(0, h - c + 1, (1,)).item()
            j = torch.randint(0, w - c + 1, (1,)).item()
        else:
            i, j = (h - c) // 2, (w - c) // 2
        x = x[..., i:i + c, j:j + c]
        x = (x - 0.5) / 0.25
        return self.out(self.pool(self.trunk(x)))


class ObsEncoder(nn.Module):
    """Per-step features: [state MLP, one ImageEncoder per camera] concatenated."""

    def __init__(self, state_dim: int, image_keys: Sequence[str], crop: int = 76, image_dim: int = 64,
                 state_hidden: int = 256, state_out: int = 64, weights_path: str | None = None):
        super().__init__()
        self.image_keys = list(image_keys)
        self.state_mlp = (nn.Sequential(nn.Linear(state_dim, state_hidden), nn.Mish(), nn.Linear(state_hidden, state_out))
                          if state_dim else None)
        self.cams = nn.ModuleDict({k.replace(".", "_"): ImageEncoder(crop, image_dim, weights_path=weights_path)
                                   for k in self.image_keys})
        self.step_dim = (state_out if state_dim else 0) + image_dim * len(self.image_keys)

    def encode_frames(self, key: str, frames: torch.Tensor) -> torch.Tensor:
        """(..., H, W, 3) uint8 frames of one camera -> (..., image_dim), each frame once."""
        lead = frames.shape[:-3]
        out = self.cams[key.replace(".", "_")](frames.reshape(-1, *frames.shape[-3:]))
        return out.reshape(*lead, -1)

    def forward(self, state: torch.Tensor | None, images: dict[str, torch.Tensor] | None = None,
                image_features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """state: (B, T, state_dim) normalised; images: {key: (B, T, H, W, 3)}; or precomputed
        image_features {key: (B, T, image_dim)} (the per-frame cache at inference). -> (B, T*step_dim)."""
        parts = []
        if self.state_mlp is not None:
            parts.append(self.state_mlp(state))
        for k in self.image_keys:
            parts.append(image_features[k] if image_features is not None and k in image_features
                         else self.encode_frames(k, images[k]))
        return torch.cat(parts, dim=-1).flatten(1)
