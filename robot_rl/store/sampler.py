"""Training windows from episode stores: `n_obs_steps` observations ending at step t and `horizon`
actions starting at the first observed step (Diffusion Policy's alignment), never crossing an
episode boundary. Padding at the edges depends on what an action dimension means:

- absolute dimensions (an absolute gripper command, joint targets) repeat the edge value;
- delta dimensions (end-effector deltas) pad with zero motion: repeating a delta would command
  the robot to keep moving past the end of the demonstration.

`WindowDataset` is a map-style PyTorch dataset that takes a *list* of sample ids per call (use it
with a BatchSampler and `batch_size=None`), so one call gathers a whole batch vectorised.
`MixedBatchSampler` draws fixed shares from named subsets (demo / intervention / online), as
RLPD and HIL-SERL do: `ids_where(intervention=True)` routes the human's intervention segments into
the demonstration share (HIL-SERL), `step_rewards("rlif")` gives RLIF's intervention reward.
`RingBuffer` is the in-RAM, fixed-capacity variant for online RL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robot_rl.spec import RobotSpec
from robot_rl.store.format import StoreError
from robot_rl.store.frames import FrameReader
from robot_rl.store.reader import EpisodeStore


@dataclass(frozen=True)
class WindowConfig:
    n_obs_steps: int = 2
    horizon: int = 16
    obs_keys: tuple[str, ...] = ()  # () = every state key of the spec plus prepared images
    image_source: str = "prepared"  # prepared (policy resolution) | data (full resolution)
    action_key: str = "action"


def delta_dims(spec: RobotSpec) -> np.ndarray:
    """Boolean mask over action dims: True where the dimension is a delta (pads with zero)."""
    a = spec.action
    if a.kind == "ee_delta":
        return np.array([n != "gripper" or a.gripper != "absolute" for n in a.names])
    return np.zeros(a.dim, dtype=bool)


def window_indices(t: np.ndarray, start: np.ndarray, end: np.ndarray, n_obs_steps: int, horizon: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For current steps t (global) of episodes [start, end): clamped observation indices (B, n_obs),
    clamped action indices (B, horizon) and a validity mask for the actions (False = padding)."""
    t = np.asarray(t)[:, None]
    s, e = np.asarray(start)[:, None], np.asarray(end)[:, None]
    obs = np.clip(t + np.arange(-n_obs_steps + 1, 1), s, e - 1)
    raw = t + np.arange(-n_obs_steps + 1, -n_obs_steps + 1 + horizon)
    valid = (raw >= s) & (raw < e)
    return obs, np.clip(raw, s, e - 1), valid


def pad_actions(actions: np.ndarray, valid: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Actions gathered at clamped indices: edge values stand already; zero the delta dims outside."""
    out = actions.copy()
    out[~valid] *= ~deltas  # delta dims -> 0 (no motion), absolute dims keep the repeated edge
    return out


def rlif_rewards(intervention: np.ndarray) -> np.ndarray:
    """RLIF: −1 on the step before each takeover (a step whose successor is the first of an
    intervention), 0 elsewhere. Per episode: pass one episode's flags."""
    f = np.asarray(intervention, dtype=bool)
    r = np.zeros(len(f), np.float32)
    if len(f) > 1:
        r[:-1][~f[:-1] & f[1:]] = -1.0
    return r


def intervention_segments(intervention: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) step ranges where a human was in control (HIL-SERL routes them into the
    demonstration set as well)."""
    f = np.concatenate([[False], np.asarray(intervention, dtype=bool), [False]])
    edges = np.flatnonzero(f[1:] != f[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


@dataclass
class _Source:
    path: Path
    episodes: np.ndarray
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class WindowDataset:
    """Windows from one or more stores (same spec). `sample ids` enumerate every step of the
    selected episodes; `groups` names subsets of those ids (by source, intervention, …)."""

    def __init__(self, stores: Sequence[str | Path | EpisodeStore], cfg: WindowConfig = WindowConfig(),
                 episodes: Sequence[Sequence[int] | None] | None = None):
        self.cfg = cfg
        opened = [s if isinstance(s, EpisodeStore) else EpisodeStore(s) for s in stores]
        if not opened:
            raise StoreError("WindowDataset needs at least one store")
        self.spec = opened[0].spec
        read = list(cfg.obs_keys or self.spec.keys())  # stores mix when they agree on what is read (keys, action, rate)
        for st in opened[1:]:
            missing = sorted(set(read) - set(st.spec.keys()))
            if missing or st.spec.policy_hash(read) != self.spec.policy_hash(read):
                raise StoreError(f"store {st.path}: spec '{st.spec.name}' differs from {opened[0].path}'s "
                                 f"{f'(no {missing})' if missing else 'in the keys read, the action or the rate'}; "
                                 "mix stores of one robot cell only")
        self.deltas = delta_dims(self.spec)
        self.state_keys = [k for k in (cfg.obs_keys or self.spec.state_keys) if not k.startswith("image.")]
        self.image_keys = [k for k in (cfg.obs_keys or self.spec.image_keys) if k.startswith("image.")]
        src, t_glob, ep_start, ep_end, meta_rows = [], [], [], [], []
        self.sources: list[_Source] = []
        self._state: list[dict[str, np.ndarray]] = []
        for si, st in enumerate(opened):
            eps = np.arange(st.n_episodes) if episodes is None or episodes[si] is None else np.asarray(episodes[si])
            self.sources.append(_Source(st.path, eps, st.starts[eps], st.ends[eps]))
            for e in eps:
                s, t_end = int(st.starts[e]), int(st.ends[e])
                n = t_end - s
                src.append(np.full(n, si))
                t_glob.append(np.arange(s, t_end))
                ep_start.append(np.full(n, s))
                ep_end.append(np.full(n, t_end))
                meta_rows.append((si, int(e), n))
            self._state.append({k: st.load(k) for k in [*self.state_keys, cfg.action_key, "intervention"]})
            if self.image_keys and cfg.image_source == "prepared":
                missing = [k for k in self.image_keys if f"prepared/{k}" not in st.root]
                if missing:
                    raise StoreError(f"store {st.path}: no prepared arrays for {missing}; run robot-rl data prepare {st.path}")
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))  # noqa: E731
        self.src, self.t, self.start, self.end = cat(src), cat(t_glob), cat(ep_start), cat(ep_end)
        self.episode_rows = meta_rows
        self._opened = opened
        self._readers: dict[tuple[int, str], FrameReader] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.t)

    # ---- subsets for mixing -----------------------------------------------------------------------
    def ids_where(self, source: str | None = None, intervention: bool | None = None,
                  success: bool | None = None) -> np.ndarray:
        """Sample ids whose episode matches source/success, or whose step is (not) an intervention."""
        keep = np.ones(len(self), dtype=bool)
        if source is not None or success is not None:
            ok_ep = np.zeros(len(self), dtype=bool)
            offset = 0
            for si, e, n in self.episode_rows:
                m = self._opened[si].meta[e]
                ok = (source is None or m.get("source") == source) and (success is None or m.get("success") == success)
                ok_ep[offset:offset + n] = ok
                offset += n
            keep &= ok_ep
        if intervention is not None:
            flags = np.concatenate([self._state[si]["intervention"][self.t[self.src == si]] for si in range(len(self.sources))])
            keep &= flags == intervention
        return np.flatnonzero(keep)

    def step_rewards(self, kind: str = "task") -> np.ndarray:
        """Per sample id, the reward of its step: `task` (as recorded) or `rlif` (−1 on the step
        before each takeover, from the intervention flags, per episode)."""
        if kind not in ("task", "rlif"):
            raise StoreError(f"reward '{kind}' is not task or rlif")
        if kind == "task":
            return self.step_values("reward").astype(np.float32)
        return self._per_episode(lambda si, st, s, t_end: rlif_rewards(self._state[si]["intervention"][s:t_end]),
                                 np.float32)

    def step_values(self, key: str) -> np.ndarray:
        """Per sample id, a per-step array of the stores (reward, terminated, truncated, intervention)."""
        return self._per_episode(lambda si, st, s, t_end: st.load(key)[s:t_end], None)

    def _per_episode(self, fn, dtype) -> np.ndarray:
        out = [fn(si, st, int(st.starts[e]), int(st.ends[e]))
               for si, st in enumerate(self._opened) for e in self.sources[si].episodes]
        return np.concatenate(out) if out else np.zeros(0, dtype or np.float32)

    # ---- gathering ------------------------------------------------------------------------------------
    def _frame_readers(self) -> dict[tuple[int, str], FrameReader]:
        if self._readers is None or self._pid != os.getpid():  # reopen in each DataLoader worker
            prefix = "prepared" if self.cfg.image_source == "prepared" else "data"
            self._readers = {(si, k): FrameReader(st.root[f"{prefix}/{k}"], st.path / prefix / k)
                             for si, st in enumerate(self._opened) for k in self.image_keys}
            self._pid = os.getpid()
        return self._readers

    def __getitem__(self, ids: Sequence[int] | int) -> dict[str, Any]:
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        cfg = self.cfg
        obs_i, act_i, valid = window_indices(self.t[ids], self.start[ids], self.end[ids], cfg.n_obs_steps, cfg.horizon)
        out: dict[str, Any] = {}
        src = self.src[ids]
        for si in np.unique(src):
            rows = np.flatnonzero(src == si)
            arrays = self._state[si]
            for k in self.state_keys:
                out.setdefault(k, np.empty((len(ids), cfg.n_obs_steps, *arrays[k].shape[1:]), arrays[k].dtype))[rows] = \
                    arrays[k][obs_i[rows]]
            act = arrays[cfg.action_key][act_i[rows]]
            out.setdefault("action", np.empty((len(ids), cfg.horizon, act.shape[-1]), np.float32))[rows] = \
                pad_actions(act, valid[rows], self.deltas)
            for k in self.image_keys:
                frames = self._frame_readers()[(si, k)].read(obs_i[rows].reshape(-1))
                out.setdefault(k, np.empty((len(ids), cfg.n_obs_steps, *frames.shape[1:]), np.uint8))[rows] = \
                    frames.reshape(len(rows), cfg.n_obs_steps, *frames.shape[1:])
        out["action_is_pad"] = ~valid
        return out


class MixedBatchSampler:
    """Batches drawing fixed shares from named id subsets, e.g. {"demo": (ids, 0.5), "online": (ids, 0.5)}.
    Shares are exact per batch (largest-remainder rounding); each subset is sampled with replacement."""

    def __init__(self, groups: Mapping[str, tuple[np.ndarray, float]], batch_size: int, n_batches: int, seed: int = 0):
        total = sum(r for _, r in groups.values())
        if total <= 0:
            raise ValueError("mixed sampler: ratios must sum to > 0")
        for name, (ids, r) in groups.items():
            if r > 0 and len(ids) == 0:
                raise ValueError(f"mixed sampler: group '{name}' has ratio {r} but no samples")
        shares = {k: batch_size * r / total for k, (_, r) in groups.items()}
        counts = {k: int(np.floor(v)) for k, v in shares.items()}
        for k in sorted(shares, key=lambda k: shares[k] - counts[k], reverse=True)[: batch_size - sum(counts.values())]:
            counts[k] += 1
        self.counts = counts
        self.groups = {k: np.asarray(ids) for k, (ids, _) in groups.items()}
        self.n_batches = n_batches
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(self.n_batches):
            parts = [self.rng.choice(self.groups[k], n) for k, n in self.counts.items() if n]
            yield np.concatenate(parts)


class RingBuffer:
    """Fixed-capacity in-RAM step buffer for online RL: whole episodes, oldest evicted first,
    sampled with the same windows and padding as the stores."""

    def __init__(self, spec: RobotSpec, capacity: int, keys: Sequence[str] | None = None):
        self.spec, self.capacity = spec, int(capacity)
        self.keys = list(keys or spec.state_keys)
        self.deltas = delta_dims(spec)
        self.data: dict[str, np.ndarray] = {k: np.zeros((capacity, *spec.key(k).shape), np.float32) for k in self.keys}
        a = spec.action.dim
        for k, shape in (("action", (a,)), ("reward", ()), ("intervention", ()), ("terminated", ())):
            self.data[k] = np.zeros((capacity, *shape), np.float32)
        self.episodes: list[tuple[int, int]] = []  # (start, length) in the circular buffer
        self.head = 0
        self.size = 0

    def add_episode(self, steps: Mapping[str, np.ndarray]) -> None:
        n = len(steps["action"])
        if n > self.capacity:
            raise ValueError(f"ring buffer: episode of {n} steps exceeds capacity {self.capacity}")
        while self.episodes and self.size + n > self.capacity:
            _, length = self.episodes.pop(0)
            self.size -= length
        idx = (self.head + np.arange(n)) % self.capacity
        for k, arr in self.data.items():
            arr[idx] = steps[k] if k in steps else 0
        self.episodes.append((self.head, n))
        self.head = (self.head + n) % self.capacity
        self.size += n

    def sample(self, batch_size: int, n_obs_steps: int, horizon: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if not self.episodes:
            raise ValueError("ring buffer is empty")
        lengths = np.array([n for _, n in self.episodes])
        ep = rng.choice(len(lengths), batch_size, p=lengths / lengths.sum())
        local = (rng.random(batch_size) * lengths[ep]).astype(np.int64)
        zeros = np.zeros(batch_size, np.int64)
        obs_i, act_i, valid = window_indices(local, zeros, lengths[ep], n_obs_steps, horizon)
        base = np.array([s for s, _ in self.episodes])[ep][:, None]
        out = {k: self.data[k][(base + obs_i) % self.capacity] for k in self.keys}
        out["action"] = pad_actions(self.data["action"][(base + act_i) % self.capacity], valid, self.deltas)
        out["action_is_pad"] = ~valid
        return out
