"""A learned success detector for rewards where the world has no reward function (HIL-SERL's
reward classifier, Luo et al. 2024): a binary classifier over one step's observation — cameras
through the policies' ResNet-18 / spatial-softmax encoder, low-dimensional keys through an MLP —
trained from the operator's episode labels. Positives are the last `positive_steps` steps of
successful episodes; negatives are every step of failed episodes and the steps of successful
episodes that end more than `margin_steps` before the positives (the frames just before success
are ambiguous and left out). Saved as safetensors + JSON, never pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from robot_rl.policies.nets import ObsEncoder
from robot_rl.policies.normalizer import Normalizer
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class RewardClassifierConfig:
    state_keys: tuple[str, ...] = ()
    image_keys: tuple[str, ...] = ()
    state_dims: dict[str, int] = field(default_factory=dict)
    image_crop: int = 76
    image_feature_dim: int = 64
    hidden: int = 256
    positive_steps: int = 3
    margin_steps: int = 3
    threshold: float = 0.5

    @classmethod
    def from_dict(cls, d: dict) -> RewardClassifierConfig:
        d = dict(d)
        for k in ("state_keys", "image_keys"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)


def step_labels(lengths: np.ndarray, success: np.ndarray, positive_steps: int, margin_steps: int) -> np.ndarray:
    """Per step of consecutive episodes: 1 positive, 0 negative, -1 left out (ambiguous)."""
    out = []
    for n, ok in zip(lengths, success):
        lab = np.zeros(int(n), np.int8)
        if ok:
            lab[max(0, n - positive_steps):] = 1
            lab[max(0, n - positive_steps - margin_steps):max(0, n - positive_steps)] = -1
        out.append(lab)
    return np.concatenate(out) if out else np.zeros(0, np.int8)


class RewardClassifier(nn.Module):
    kind = "reward_classifier"

    def __init__(self, cfg: RewardClassifierConfig, normalizer: Normalizer):
        super().__init__()
        self.cfg, self.normalizer = cfg, normalizer
        state_dim = sum(cfg.state_dims[k] for k in cfg.state_keys)
        self.encoder = ObsEncoder(state_dim, cfg.image_keys, cfg.image_crop, cfg.image_feature_dim)
        self.head = nn.Sequential(nn.Linear(self.encoder.step_dim, cfg.hidden), nn.Mish(), nn.Linear(cfg.hidden, 1))

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """batch: one-step windows {key: (B, 1, ...)} as WindowDataset gives them -> (B,)"""
        state = None
        if self.cfg.state_keys:
            state = torch.cat([self.normalizer.normalize(k, batch[k].float()).flatten(2) for k in self.cfg.state_keys], -1)
        images = {k: batch[k] for k in self.cfg.image_keys}
        return self.head(self.encoder(state, images)).squeeze(-1)

    @torch.no_grad()
    def success_probability(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.eval()
        return torch.sigmoid(self.logits(batch))

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        cfg = {"kind": self.kind, "classifier": asdict(self.cfg), "normalizer_keys": self.normalizer.keys, **(extra or {})}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> RewardClassifier:
        path = Path(path)
        f = path / "config.json"
        cfg = json.loads(f.read_text()) if f.exists() else {}
        if cfg.get("kind") != cls.kind:
            raise ValueError(f"reward classifier {path}: not a reward classifier folder (config.json kind "
                             f"{cfg.get('kind')!r}); train one with robot-rl train policy=reward_classifier")
        state = load_file(str(path / "model.safetensors"))
        clf = cls(RewardClassifierConfig.from_dict(cfg["classifier"]), Normalizer.from_state_dict(state, cfg["normalizer_keys"]))
        clf.load_state_dict(state)
        clf.config = cfg
        return clf.to(device).eval()
