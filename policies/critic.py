"""Critics over action chunks for offline and online RL fine-tuning (pure PyTorch).

`ChunkCritic` scores executing the first `n_action_steps` actions of a chunk from an observation
window: an ensemble of Q(s, a_chunk) heads and a state value V(s), MLPs with LayerNorm (as RLPD
uses for stability with high update-to-data ratios). Both read the policy's normalised inputs: the
flattened state window and the normalised executed actions.

Training is IQL (Kostrikov et al., "Offline RL with Implicit Q-Learning", ICLR 2022): V regresses
an upper expectile of the target Q on dataset actions, Q regresses r + γᵏ V(s'), so no action
outside the data is ever queried during critic training. Q heads either regress a scalar (MSE) or
predict a categorical distribution trained with the HL-Gauss cross-entropy (Farebrother et al.,
"Stop Regressing", ICML 2024): the scalar target is spread as a Gaussian over fixed bins.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class CriticConfig:
    obs_dim: int
    act_dim: int
    hidden: int = 256
    layers: int = 2
    n_q: int = 2
    q_loss: str = "mse"  # mse | hlgauss
    bins: int = 51
    v_min: float = -1.5
    v_max: float = 1.5
    sigma_ratio: float = 0.75  # HL-Gauss: σ as a multiple of the bin width
    expectile: float = 0.7
    gamma: float = 0.99
    target_tau: float = 0.005

    def __post_init__(self) -> None:
        if self.q_loss not in ("mse", "hlgauss"):
            raise ValueError(f"critic q_loss '{self.q_loss}' is not mse or hlgauss")
        if not 0.5 <= self.expectile < 1.0:
            raise ValueError(f"critic expectile {self.expectile} must lie in [0.5, 1)")
        if self.v_max <= self.v_min or self.bins < 2:
            raise ValueError(f"critic support [{self.v_min}, {self.v_max}] with {self.bins} bins is empty")


def mlp(din: int, dout: int, hidden: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = din
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.Mish()]
        d = hidden
    return nn.Sequential(*mods, nn.Linear(d, dout))


def hl_gauss_target(y: torch.Tensor, edges: torch.Tensor, sigma: float) -> torch.Tensor:
    """Probability mass of N(y, σ²) in each bin [edges[i], edges[i+1]), renormalised over the support."""
    cdf = torch.special.erf((edges[None, :] - y[:, None].clamp(edges[0], edges[-1])) / (sigma * 2**0.5))
    mass = cdf[:, 1:] - cdf[:, :-1]
    return mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)


class ChunkCritic(nn.Module):
    def __init__(self, cfg: CriticConfig):
        super().__init__()
        self.cfg = cfg
        out = cfg.bins if cfg.q_loss == "hlgauss" else 1
        self.qs = nn.ModuleList(mlp(cfg.obs_dim + cfg.act_dim, out, cfg.hidden, cfg.layers) for _ in range(cfg.n_q))
        self.v = mlp(cfg.obs_dim, 1, cfg.hidden, cfg.layers)
        edges = torch.linspace(cfg.v_min, cfg.v_max, cfg.bins + 1)
        self.register_buffer("edges", edges, persistent=False)
        self.register_buffer("centers", (edges[1:] + edges[:-1]) / 2, persistent=False)
        self.target_qs = copy.deepcopy(self.qs).requires_grad_(False)

    # ---- values ------------------------------------------------------------------------------------
    def _q_logits(self, heads: nn.ModuleList, obs: torch.Tensor, act: torch.Tensor) -> list[torch.Tensor]:
        x = torch.cat([obs, act], dim=-1)
        return [h(x) for h in heads]

    def _to_value(self, out: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_loss == "hlgauss":
            return (out.softmax(-1) * self.centers).sum(-1)
        return out.squeeze(-1)

    def q(self, obs: torch.Tensor, act: torch.Tensor, target: bool = False) -> torch.Tensor:
        """min over the ensemble: (B,)"""
        outs = self._q_logits(self.target_qs if target else self.qs, obs, act)
        return torch.stack([self._to_value(o) for o in outs]).min(0).values

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.v(obs).squeeze(-1)

    def advantage(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.q(obs, act, target=True) - self.value(obs)

    # ---- IQL losses ----------------------------------------------------------------------------------
    def losses(self, obs, act, ret, discount, next_obs) -> tuple[torch.Tensor, dict[str, float]]:
        """V: expectile of target-Q − V; Q: r + γᵏ V(s') (discount is 0 at a terminal step)."""
        cfg = self.cfg
        with torch.no_grad():
            q_t = self.q(obs, act, target=True)
            y = ret + discount * self.value(next_obs)
        diff = q_t - self.value(obs)
        weight = torch.where(diff > 0, cfg.expectile, 1 - cfg.expectile)
        v_loss = (weight * diff**2).mean()
        outs = self._q_logits(self.qs, obs, act)
        if cfg.q_loss == "hlgauss":
            sigma = cfg.sigma_ratio * (cfg.v_max - cfg.v_min) / cfg.bins
            tgt = hl_gauss_target(y, self.edges, sigma)
            q_loss = sum(F.cross_entropy(o, tgt) for o in outs) / len(outs)
        else:
            q_loss = sum(F.mse_loss(o.squeeze(-1), y) for o in outs) / len(outs)
        return v_loss + q_loss, {"v_loss": v_loss.item(), "q_loss": q_loss.item(), "q_mean": q_t.mean().item()}

    @torch.no_grad()
    def update_target(self) -> None:
        for pt, ps in zip(self.target_qs.parameters(), self.qs.parameters()):
            pt.lerp_(ps, self.cfg.target_tau)

    # ---- persistence: safetensors + JSON, never pickle ---------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / "critic.safetensors"))
        (path / "critic.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ChunkCritic:
        path = Path(path)
        if not (path / "critic.json").exists():
            raise ValueError(f"critic {path}: no critic.json (expected a folder written by ChunkCritic.save)")
        critic = cls(CriticConfig(**json.loads((path / "critic.json").read_text())))
        critic.load_state_dict(load_file(str(path / "critic.safetensors")))
        return critic.to(device)
