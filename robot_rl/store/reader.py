"""Read-only view of an episode store: the committed episodes only, refreshable while a writer
appends (a learner tails the recorder's store this way)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

import robot_rl.store.codecs  # noqa: F401  (registers the JPEG codec before any array opens)
from robot_rl.spec import RobotSpec, SpecError
from robot_rl.store.format import FORMAT, SCHEMA_VERSION, StoreError


class EpisodeStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"no episode store at {self.path} (missing zarr.json)")
        self._state_cache: dict[str, np.ndarray] = {}
        self.refresh()

    def refresh(self) -> EpisodeStore:
        """Re-read the commit record; episodes committed since are now visible."""
        try:
            self.root = zarr.open_group(self.path, mode="r")
            attrs = self.root.attrs.asdict()
        except Exception as e:  # zarr raises several types for unreadable metadata
            raise StoreError(f"store {self.path}: cannot open ({type(e).__name__}: {e}); run robot-rl data validate") from None
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{self.path} is not a robot_rl episode store (format={attrs.get('format')!r})")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"store {self.path}: schema_version {attrs.get('schema_version')} is not {SCHEMA_VERSION}")
        try:
            self.spec = RobotSpec.from_dict(attrs["spec"])
        except SpecError as e:
            raise StoreError(f"store {self.path}: {e}") from None
        self.attrs = attrs
        try:
            n_ep, n_steps = int(attrs["commit"]["n_episodes"]), int(attrs["commit"]["n_steps"])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"store {self.path}: no valid commit record in zarr.json; run robot-rl data validate") from None
        if n_ep != getattr(self, "n_episodes", -1):
            self._state_cache.clear()
        self.n_episodes, self.n_steps = n_ep, n_steps
        self.ends = np.asarray(self.root["episodes/ends"][:n_ep], dtype=np.int64) if n_ep else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], self.ends[:-1]]).astype(np.int64) if n_ep else np.zeros(0, np.int64)
        metas = self.root["episodes/meta"][:n_ep] if n_ep else []
        self.meta = [json.loads(m) for m in metas]
        return self

    # ---- structure ---------------------------------------------------------------------------------
    @property
    def image_codec(self) -> str:
        return self.attrs.get("image_codec", "blosc_zstd")

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def keys(self) -> list[str]:
        return [*self.spec.keys(), "action", "action_policy", "timestamp", "reward", "intervention", "terminated",
                "truncated"]

    def array(self, key: str) -> zarr.Array:
        try:
            return self.root[f"data/{key}"]
        except KeyError:
            raise StoreError(f"store {self.path}: no key '{key}'; keys: {self.keys()}") from None

    def load(self, key: str) -> np.ndarray:
        """All committed steps of a non-image key, in RAM (cached until the next commit is seen)."""
        if key not in self._state_cache:
            self._state_cache[key] = np.asarray(self.array(key)[: self.n_steps])
        return self._state_cache[key]

    def episode(self, i: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        if not 0 <= i < self.n_episodes:
            raise StoreError(f"store {self.path}: episode {i} out of range (0..{self.n_episodes - 1})")
        s, e = int(self.starts[i]), int(self.ends[i])
        return {k: np.asarray(self.array(k)[s:e]) for k in (keys or self.keys())}

    def episode_slice(self, i: int) -> slice:
        return slice(int(self.starts[i]), int(self.ends[i]))

    def select(self, source: str | None = None, success: bool | None = None, task: str | None = None) -> list[int]:
        out = []
        for i, m in enumerate(self.meta):
            if source is not None and m.get("source") != source:
                continue
            if success is not None and m.get("success") != success:
                continue
            if task is not None and m.get("task") != task:
                continue
            out.append(i)
        return out

    def stream(self, key: str, episode: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, stamps) of a native-rate stream for one episode."""
        m = self.meta[episode]
        end = m["stream_ends"][key]
        prev = self.meta[episode - 1]["stream_ends"].get(key, 0) if episode else 0
        g = self.root[f"streams/{key}"]
        return np.asarray(g["value"][prev:end]), np.asarray(g["stamp"][prev:end])

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def summary(self) -> dict[str, Any]:
        sources: dict[str, int] = {}
        succ = [m.get("success") for m in self.meta]
        for m in self.meta:
            sources[m.get("source", "?")] = sources.get(m.get("source", "?"), 0) + 1
        labelled = [s for s in succ if s is not None]
        return {"path": str(self.path), "spec": self.spec.name, "episodes": self.n_episodes, "steps": self.n_steps,
                "sources": sources, "success_rate": (sum(labelled) / len(labelled)) if labelled else None,
                "interventions": int(self.load("intervention").sum()) if self.n_steps else 0,
                "image_codec": self.image_codec, "keys": self.spec.keys(), "size_bytes": self.size_bytes(),
                "tasks": sorted({m.get("task", "") for m in self.meta})}
