"""Min-max normalisation to [-1, 1] per key, stored with the weights (buffers in the checkpoint).
Dimensions that never vary (e.g. masked action dimensions) pass through with scale 1."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def _name(key: str) -> str:
    return key.replace(".", "__")


class Normalizer(nn.Module):
    def __init__(self, keys_dims: Mapping[str, int] | None = None):
        super().__init__()
        self.keys: list[str] = []
        for k, d in (keys_dims or {}).items():
            self._add(k, torch.ones(d), torch.zeros(d))

    def _add(self, key: str, scale: torch.Tensor, offset: torch.Tensor) -> None:
        self.register_buffer(f"{_name(key)}_scale", scale.float())
        self.register_buffer(f"{_name(key)}_offset", offset.float())
        if key not in self.keys:
            self.keys.append(key)

    @classmethod
    def from_stats(cls, stats: Mapping[str, Mapping[str, list]], keys) -> Normalizer:
        """From the store's prepared statistics ({key: {min, max, ...}})."""
        n = cls()
        for k in keys:
            if k not in stats:
                raise KeyError(f"no normalisation statistics for '{k}'; run robot-rl data prepare on the store")
            lo, hi = np.asarray(stats[k]["min"], np.float64), np.asarray(stats[k]["max"], np.float64)
            rng = hi - lo
            const = rng < 1e-6
            scale = np.where(const, 1.0, 2.0 / np.where(const, 1.0, rng))
            offset = np.where(const, -lo, -1.0 - lo * scale)
            n._add(k, torch.as_tensor(scale), torch.as_tensor(offset))
        return n

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], keys, prefix: str = "normalizer.") -> Normalizer:
        """The normaliser saved inside a model's weights (buffers carry their real sizes)."""
        n = cls()
        for k in keys:
            n._add(k, state[f"{prefix}{_name(k)}_scale"], state[f"{prefix}{_name(k)}_offset"])
        return n

    def _params(self, key: str):
        return getattr(self, f"{_name(key)}_scale"), getattr(self, f"{_name(key)}_offset")

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) in physical units -> [-1, 1]."""
        s, o = self._params(key)
        return x * s + o

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        s, o = self._params(key)
        return (y - o) / s
