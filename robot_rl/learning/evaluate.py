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


PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune")  # reduce-overhead: CUDA graphs on a GPU


def accelerate(policy: DiffusionPolicy, compile_mode: str = "") -> DiffusionPolicy:
    """`torch.compile` the denoising network and each camera's encoder (in place; inference only: the
    compiled modules' state-dict keys change). '' leaves the policy eager."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile mode '{compile_mode}' is not one of {list(COMPILE_MODES)} ('' = eager)")
    if compile_mode:
        policy.net = torch.compile(policy.net, mode=compile_mode)
        for key in list(policy.encoder.cams):
            policy.encoder.cams[key] = torch.compile(policy.encoder.cams[key], mode=compile_mode)
    return policy


class ChunkAgent:
    """Runs a chunked policy step by step: plans a chunk when the queue is empty, executes its first
    `n_action_steps`. `explore_std` > 0 adds Gaussian noise (action units) to every planned chunk
    (the RL actor's exploration; the executed, clipped actions are what gets recorded).

    `precision` fp16 / bf16 runs the encoder and the denoiser under `torch.autocast` (weights stay
    fp32; on a GPU, the policy server's half-precision flag). Several agents sharing one policy (one
    per robot) plan together in one batch: `act_batch`."""

    def __init__(self, policy: DiffusionPolicy, sampler: str, device: torch.device | str | None = None,
                 n_action_steps: int | None = None, explore_std: float = 0.0, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision '{precision}' is not one of {list(PRECISIONS)}")
        self.policy = policy.eval()
        self.sampler, self.explore_std, self.precision = sampler, float(explore_std), precision
        # the policy's own device unless told (a policy trained on a GPU is evaluated there)
        self.device = torch.device(device) if device is not None else next(policy.parameters()).device
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

    def autocast(self):
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision] or torch.float32,
                              enabled=self.precision != "fp32")

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
            with self.autocast():
                self.features[(step, k)] = self.policy.encoder.encode_frames(k, frame)[0].float()
            self.encoded_frames += 1
        while len(self.features) > self.n_obs * max(1, len(self.policy.cfg.image_keys)):
            self.features.popitem(last=False)

    def _inputs(self) -> tuple[dict, dict, torch.Tensor]:
        """This agent's batch row: state window, cached image features, the chunk's initial noise."""
        cfg = self.policy.cfg
        window = self._window()
        batch = {k: torch.as_tensor(np.stack([o[k] for _, o in window]))[None].to(self.device) for k in cfg.state_keys}
        feats = {k: torch.stack([self.features[(step, k)] for step, _ in window])[None] for k in cfg.image_keys}
        noise = torch.randn((1, cfg.horizon, cfg.action_dim), generator=self.generator).to(self.device)
        return batch, feats, noise

    def plan(self) -> np.ndarray:
        return plan_batch([self])[0]

    def observe(self, obs: dict) -> None:
        """Take in a step's observation without acting (a human drives this step)."""
        self.obs.append((self.t, {k: obs[k] for k in self.keys}))
        self._encode(self.t, obs)
        self.t += 1

    def _enqueue(self, chunk: np.ndarray, t0: float) -> None:
        if self.explore_std > 0:
            chunk = chunk + self.noise_rng.normal(0.0, self.explore_std, chunk.shape)
        # observation-to-chunk latency: this step's frames encoded + the denoising head
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        start = self.n_obs - 1
        self.queue.extend(chunk[start:start + self.n_act])

    def act(self, obs: dict) -> np.ndarray:
        return act_batch([self], [obs])[0]


@torch.no_grad()
def plan_batch(agents: list[ChunkAgent]) -> list[np.ndarray]:
    """One denoising pass for several agents sharing a policy (one robot each): their rows stacked,
    each with its own window and initial noise, so a robot's chunk does not depend on who it was batched
    with. A lone agent's own generator also draws a stochastic sampler's later noise (cm3's re-noising,
    DDPM's steps), so its rollouts repeat exactly; in a batch of several that noise is shared."""
    first = agents[0]
    policy = first.policy
    rows = [a._inputs() for a in agents]
    batch = {k: torch.cat([r[0][k] for r in rows]) for k in policy.cfg.state_keys}
    feats = {k: torch.cat([r[1][k] for r in rows]) for k in policy.cfg.image_keys}
    noise = torch.cat([r[2] for r in rows])
    with first.autocast():
        cond = policy.condition(batch, feats)
        generator = first.generator if len(agents) == 1 else None
        sampled = policy.sample_normalized(cond, first.sampler, generator, noise).float()
    actions = policy.normalizer.unnormalize("action", sampled)
    if first.device.type == "cuda":
        torch.cuda.synchronize()
    return list(actions.cpu().numpy())


def act_batch(agents: list[ChunkAgent], observations: list[dict]) -> list[np.ndarray]:
    """Each agent takes in its observation; those whose queue ran out plan together (`plan_batch`);
    every agent returns its next action."""
    t0 = time.perf_counter()
    for agent, obs in zip(agents, observations):
        agent.observe(obs)
    due = [a for a in agents if not a.queue]
    if due:  # a lone agent plans through its own `plan` (the RL actor's critic-ranked selection overrides it)
        for agent, chunk in zip(due, plan_batch(due) if len(due) > 1 else [due[0].plan()]):
            agent._enqueue(chunk, t0)
    return [np.clip(a.queue.popleft(), -1.0, 1.0).astype(np.float32) for a in agents]


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
    failures: int = 0  # ended by the task's failure condition

    @property
    def success_rate(self) -> float:
        return self.successes / max(1, self.episodes)

    def to_dict(self) -> dict:
        return {"task": self.task, "sampler": self.sampler, "episodes": self.episodes, "successes": self.successes,
                "failures": self.failures, "success_rate": self.success_rate, "ci95": list(self.ci95),
                "latency_p50_ms": self.latency_p50_ms, "latency_p99_ms": self.latency_p99_ms,
                "solutions": self.solutions, "video": self.video}


def evaluate(policy: DiffusionPolicy, env, task: str, episodes: int, seed: int, sampler: str,
             device: torch.device | str | None = None, video_path: str | Path | None = None, progress: bool = False,
             recorder=None) -> EvalResult:
    """`recorder` (rollout.EpisodeRecorder) writes the policy's episodes to a store (source "policy")."""
    from robot_rl.rollout import run_episodes

    agent = ChunkAgent(policy, sampler, device)
    s = run_episodes(env, agent, episodes, seed, task, sampler, video_path=video_path, progress=progress,
                     recorder=recorder)
    lat = np.asarray(agent.latencies_ms[1:] or agent.latencies_ms or [0.0])  # the first call warms up
    return EvalResult(task, sampler, s.episodes, s.successes, s.ci95, float(np.percentile(lat, 50)),
                      float(np.percentile(lat, 99)), dict(s.solutions), s.video, s.per_episode, s.failures)
