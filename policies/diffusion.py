"""Diffusion Policy (Chi et al., RSS 2023) over action chunks, with schedulers from `diffusers`.

Training: DDPM noise prediction (epsilon) on min-max-normalised action chunks, 100 steps,
`squaredcos_cap_v2` betas, samples clipped to [-1, 1]. Inference samplers by name:
`ddpm100` (DDPMScheduler), `ddimN` (DDIMScheduler, N steps), `dpmN` (DPMSolverMultistepScheduler,
a fast probability-flow ODE solver). The observation window (`n_obs_steps`) is encoded per step and
flattened into the FiLM condition; `horizon` actions are predicted, of which the executor runs
`n_action_steps` starting at index `n_obs_steps - 1`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from robot_rl.policies.nets import ConditionalUnet1D, ObsEncoder
from robot_rl.policies.normalizer import Normalizer
from torch import nn


@dataclass
class PolicyConfig:
    state_keys: tuple[str, ...] = ()
    image_keys: tuple[str, ...] = ()
    action_dim: int = 7
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    down_dims: tuple[int, ...] = (64, 128, 256)
    kernel_size: int = 5
    n_groups: int = 8
    step_embed_dim: int = 128
    dropout: float = 0.0
    image_crop: int = 76
    image_feature_dim: int = 64
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    image_weights: str | None = None  # optional local ResNet-18 weights (safetensors)
    # the loss also on the action steps padded past an episode's end (delta dims: zero motion), as
    # diffusion_policy trains: the only windows that show holding still at the goal when demonstrations
    # end at success (reach_point / reach, 50 demos, 1000 steps: 65 % / 50 % against 35 % / 25 % masked)
    loss_on_padding: bool = False
    state_dims: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicyConfig:
        d = dict(d)
        for k in ("state_keys", "image_keys", "down_dims"):
            if k in d:
                d[k] = tuple(d[k])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"policy config: unknown keys {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def masked_mean(err: torch.Tensor, is_pad: torch.Tensor | None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of a per-element error over (B, horizon, dim), skipping padded action steps: padding
    teaches the network nothing about the demonstrator. `weights` (B,) scale each sample's error
    (advantage-weighted fine-tuning); the normaliser stays the count of unpadded elements."""
    w = torch.ones_like(err[..., :1]) if is_pad is None else (~is_pad).float().unsqueeze(-1)
    count = (w.sum() * err.shape[-1]).clamp(min=1)
    if weights is not None:
        w = w * weights.view(-1, 1, 1)
    return (err * w).sum() / count


def gaussian(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise on `device`, drawn by `generator` where given (a CPU generator serves a GPU policy)."""
    at = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=at).to(device)


def parse_sampler(name: str) -> tuple[str, int]:
    if name == "bc":
        return "bc", 1
    m = re.fullmatch(r"(ddpm|ddim|dpm|cm)(\d+)", name)
    if not m:
        raise ValueError(f"sampler '{name}' is not one of ddpm100, ddimN, dpmN, cmN (e.g. ddim10, cm1, cm3), bc")
    return m.group(1), int(m.group(2))


class DiffusionPolicy(nn.Module):
    kind = "diffusion"

    def __init__(self, cfg: PolicyConfig, normalizer: Normalizer):
        super().__init__()
        from diffusers import DDPMScheduler

        self.cfg = cfg
        self.normalizer = normalizer
        state_dim = sum(cfg.state_dims[k] for k in cfg.state_keys)
        self.encoder = ObsEncoder(state_dim, cfg.image_keys, cfg.image_crop, cfg.image_feature_dim,
                                  weights_path=cfg.image_weights)
        self.net = ConditionalUnet1D(cfg.action_dim, self.encoder.step_dim * cfg.n_obs_steps, cfg.down_dims,
                                     cfg.kernel_size, cfg.n_groups, cfg.step_embed_dim, cfg.dropout)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                             clip_sample=True, prediction_type="epsilon")
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)

    # ---- observations ---------------------------------------------------------------------------
    def state_tensor(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.cfg.state_keys:
            return None
        parts = [self.normalizer.normalize(k, batch[k].float()).flatten(2) for k in self.cfg.state_keys]
        return torch.cat(parts, dim=-1)

    def condition(self, batch: dict[str, torch.Tensor], image_features: dict[str, torch.Tensor] | None = None):
        images = {k: batch[k] for k in self.cfg.image_keys if k in batch}
        return self.encoder(self.state_tensor(batch), images, image_features)

    # ---- training ---------------------------------------------------------------------------------
    def pad_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The padded action steps the losses skip (none with `loss_on_padding`)."""
        return None if self.cfg.loss_on_padding else batch.get("action_is_pad")

    def compute_loss(self, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.condition(batch)
        a0 = self.normalizer.normalize("action", batch["action"].float())
        noise = torch.randn_like(a0)
        t = torch.randint(0, self.cfg.num_train_timesteps, (a0.shape[0],), device=a0.device)
        at = self.noise_scheduler.add_noise(a0, noise, t)
        pred = self.net(at, t, cond)
        return masked_mean((pred - noise) ** 2, self.pad_mask(batch), weights)

    # ---- sampling -----------------------------------------------------------------------------------
    def scheduler(self, kind: str, steps: int):
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[kind]
        s = cls.from_config(self.noise_scheduler.config)
        s.set_timesteps(steps)
        return s

    @torch.no_grad()
    def sample_normalized(self, cond: torch.Tensor, sampler: str = "ddim10", generator: torch.Generator | None = None,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
        kind, steps = parse_sampler(sampler)
        if kind == "cm":
            raise ValueError("cm samplers need the distilled consistency policy (robot-rl distill)")
        b = cond.shape[0]
        x = noise if noise is not None else gaussian((b, self.cfg.horizon, self.cfg.action_dim), generator, cond.device)
        sched = self.scheduler(kind, steps)
        for t in sched.timesteps:
            eps = self.net(x, t.expand(b).to(cond.device), cond)
            x = sched.step(eps, t, x, generator=generator).prev_sample
        return x.clamp(-1, 1)

    @torch.no_grad()
    def predict_action(self, batch: dict[str, torch.Tensor], sampler: str = "ddim10",
                       generator: torch.Generator | None = None, image_features=None) -> torch.Tensor:
        """Observation window -> (B, horizon, action_dim) actions in physical (store) units."""
        cond = self.condition(batch, image_features)
        return self.normalizer.unnormalize("action", self.sample_normalized(cond, sampler, generator))


class BCPolicy(DiffusionPolicy):
    """Deterministic behaviour-cloning baseline: the same encoder and U-Net regress the action chunk
    directly (input zeros, step 0) with an MSE loss. It averages the modes of multimodal data, which
    is what the diffusion policies are compared against."""

    kind = "bc"

    def compute_loss(self, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.condition(batch)
        a0 = self.normalizer.normalize("action", batch["action"].float())
        pred = self.net(torch.zeros_like(a0), torch.zeros(a0.shape[0], dtype=torch.long, device=a0.device), cond)
        return masked_mean((pred - a0) ** 2, self.pad_mask(batch), weights)

    @torch.no_grad()
    def sample_normalized(self, cond, sampler: str = "bc", generator=None, noise=None) -> torch.Tensor:
        b = cond.shape[0]
        x = torch.zeros((b, self.cfg.horizon, self.cfg.action_dim), device=cond.device)
        return self.net(x, torch.zeros(b, dtype=torch.long, device=cond.device), cond).clamp(-1, 1)
