"""Closed-loop evaluation of learned policies in simulation: chunked execution, paired seeds,
success with a Wilson interval, latency per chunk (p50 / p99), a rendered rollout.

`ChunkAgent` is the in-process twin of the ROS policy server + executor: it keeps the last
`n_obs_steps` observations (the first repeated at episode start), plans `horizon` actions and
executes `n_action_steps` of them starting at index `n_obs_steps - 1`. Camera frames are encoded
once each and the features reused across overlapping observation windows.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robot_rl.policies.diffusion import DiffusionPolicy


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ChunkAgent:
    """Runs a chunked policy step by step: plans a chunk when the queue is empty, executes its first
    `n_action_steps`. `explore_std` > 0 adds Gaussian noise (action units) to every planned chunk
    (the RL actor's exploration; the executed, clipped actions are what gets recorded)."""

    def __init__(self, policy: DiffusionPolicy, sampler: str, device: torch.device | str = "cpu",
                 n_action_steps: int | None = None, explore_std: float = 0.0):
        self.policy = policy.eval()
        self.sampler, self.explore_std = sampler, float(explore_std)
        self.device = torch.device(device)
        cfg = policy.cfg
        self.n_obs, self.n_act = cfg.n_obs_steps, n_action_steps or cfg.n_action_steps
        self.keys = [*cfg.state_keys, *cfg.image_keys]
        self.latencies_ms: list[float] = []
        self.encoded_frames = 0

    def reset(self, rng: np.random.Generator) -> None:
        self.obs: deque = deque(maxlen=self.n_obs)
        self.queue: deque = deque()
        self.t = 0
        self.features: OrderedDict = OrderedDict()  # (step, image key) -> features, each frame once
        self.generator = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
        self.noise_rng = np.random.default_rng(int(rng.integers(2**31)))

    def swap_policy(self, policy: DiffusionPolicy) -> None:
        """New weights between two steps (same architecture): the window's frames are re-encoded with
        the new encoder; the queued actions of the current chunk still run."""
        self.policy = policy.eval()
        self.features.clear()
        for step, obs in self.obs:
            self._encode(step, obs)

    def _window(self) -> list[tuple[int, dict]]:
        items = list(self.obs)
        while len(items) < self.n_obs:  # episode start: repeat the first observation
            items.insert(0, items[0])
        return items

    @torch.no_grad()
    def _encode(self, step: int, obs: dict) -> None:
        """Encode this step's camera frames now, once; later windows reuse the features."""
        for k in self.policy.cfg.image_keys:
            frame = torch.as_tensor(obs[k])[None].to(self.device)
            self.features[(step, k)] = self.policy.encoder.encode_frames(k, frame)[0]
            self.encoded_frames += 1
        while len(self.features) > self.n_obs * max(1, len(self.policy.cfg.image_keys)):
            self.features.popitem(last=False)

    @torch.no_grad()
    def plan(self) -> np.ndarray:
        cfg = self.policy.cfg
        window = self._window()
        batch = {k: torch.as_tensor(np.stack([o[k] for _, o in window]))[None].to(self.device) for k in cfg.state_keys}
        feats = {k: torch.stack([self.features[(step, k)] for step, _ in window])[None] for k in cfg.image_keys}
        noise = torch.randn((1, cfg.horizon, cfg.action_dim), generator=self.generator).to(self.device)
        cond = self.policy.condition(batch, feats)
        actions = self.policy.normalizer.unnormalize("action", self.policy.sample_normalized(cond, self.sampler, None, noise))
        return actions[0].cpu().numpy()

    def observe(self, obs: dict) -> None:
        """Take in a step's observation without acting (a human drives this step)."""
        self.obs.append((self.t, {k: obs[k] for k in self.keys}))
        self._encode(self.t, obs)
        self.t += 1

    def act(self, obs: dict) -> np.ndarray:
        t0 = time.perf_counter()
        self.observe(obs)
        if not self.queue:
            chunk = self.plan()
            if self.explore_std > 0:
                chunk = chunk + self.noise_rng.normal(0.0, self.explore_std, chunk.shape)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            # observation-to-chunk latency: this step's frames encoded + the denoising head
            self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            start = self.n_obs - 1
            self.queue.extend(chunk[start:start + self.n_act])
        return np.clip(self.queue.popleft(), -1.0, 1.0).astype(np.float32)


@dataclass
class EvalResult:
    task: str
    sampler: str
    episodes: int
    successes: int
    ci95: tuple[float, float]
    latency_p50_ms: float
    latency_p99_ms: float
    solutions: dict = field(default_factory=dict)
    video: str | None = None
    per_episode: list[bool] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.successes / max(1, self.episodes)

    def to_dict(self) -> dict:
        return {"task": self.task, "sampler": self.sampler, "episodes": self.episodes, "successes": self.successes,
                "success_rate": self.success_rate, "ci95": list(self.ci95), "latency_p50_ms": self.latency_p50_ms,
                "latency_p99_ms": self.latency_p99_ms, "solutions": self.solutions, "video": self.video}


def evaluate(policy: DiffusionPolicy, env, task: str, episodes: int, seed: int, sampler: str,
             device: torch.device | str = "cpu", video_path: str | Path | None = None, progress: bool = False,
             recorder=None) -> EvalResult:
    """`recorder` (rollout.EpisodeRecorder) writes the policy's episodes to a store (source "policy")."""
    from robot_rl.rollout import run_episodes

    agent = ChunkAgent(policy, sampler, device)
    s = run_episodes(env, agent, episodes, seed, task, sampler, video_path=video_path, progress=progress,
                     recorder=recorder)
    lat = np.asarray(agent.latencies_ms[1:] or agent.latencies_ms or [0.0])  # the first call warms up
    return EvalResult(task, sampler, s.episodes, s.successes, s.ci95, float(np.percentile(lat, 50)),
                      float(np.percentile(lat, 99)), dict(s.solutions), s.video, s.per_episode)
