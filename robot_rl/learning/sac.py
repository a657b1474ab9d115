"""The RLPD baseline for RL fine-tuning: Gaussian soft actor-critic on single-step actions, trained
from scratch with the demonstration stores mixed into every batch (Ball et al. 2023, "Efficient
Online Reinforcement Learning with Offline Data"): symmetric sampling (`demo_ratio` of each batch
from the offline transitions, the rest from online ones), LayerNorm critics in an ensemble (the
target is the minimum over a random pair), Polyak-averaged targets, an automatically tuned entropy
temperature, `utd` updates per environment step. It is the side-by-side reference of
`benchmarks/finetune.py`: the same tasks, observation keys, demonstrations and step budget as the
chunked fine-tuning of `robot_rl.learning.finetune`, evaluated on the same seeds.

Observations are the state keys concatenated at the current step, standardised with the offline
data's mean and standard deviation; actions are the task's normalised action box [-1, 1] (tanh-
squashed Gaussian)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.store import EpisodeStore, StoreError


@dataclass
class SACConfig:
    hidden: int = 256
    n_critics: int = 2  # RLPD uses 10 with a random pair in the target; 2 keeps the CPU cost down
    gamma: float = 0.99
    tau: float = 0.005
    lr: float = 3e-4
    batch_size: int = 256
    utd: int = 1  # updates per environment step (RLPD: 20 on a GPU)
    init_temperature: float = 0.1
    demo_ratio: float = 0.5
    max_env_steps: int = 20_000
    eval_every: int = 5_000  # environment steps
    eval_episodes: int = 50
    eval_seed: int = 100_000
    train_seed: int = 10_000_000
    seed: int = 0


def _mlp(n_in: int, n_out: int, hidden: int, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in ((n_in, hidden), (hidden, hidden)):
        layers += [nn.Linear(a, b), *([nn.LayerNorm(b)] if norm else []), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, n_out))


class Transitions:
    """(obs, action, reward, next obs, done) rows in growing numpy arrays; `sample` draws uniformly."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int = 4096):
        self.obs_dim, self.act_dim, self.n = obs_dim, act_dim, 0
        dims = {"obs": obs_dim, "act": act_dim, "rew": 0, "next": obs_dim, "done": 0}
        self.arrays = {k: np.zeros((capacity, d) if d else capacity, np.float32) for k, d in dims.items()}

    def add(self, obs, act, rew, nxt, done) -> None:
        if self.n == len(self.arrays["rew"]):
            self.arrays = {k: np.concatenate([v, np.zeros_like(v)]) for k, v in self.arrays.items()}
        for k, v in zip(self.arrays, (obs, act, rew, nxt, done)):
            self.arrays[k][self.n] = v
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        ids = rng.integers(0, self.n, n)
        return {k: v[ids] for k, v in self.arrays.items()}


def flat_obs(obs: dict, keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(obs[k], np.float32).ravel() for k in keys])


def store_transitions(stores: list[str | Path], keys: list[str], act_dim: int) -> Transitions:
    """Every step of the stores whose next observation is known: inside an episode, or its last step
    when the episode terminated (no bootstrap needed); a truncated episode's last step is left out."""
    out: Transitions | None = None
    for path in stores:
        st = EpisodeStore(path)
        missing = [k for k in keys if k not in st.keys()]
        if missing:
            raise StoreError(f"store {path} has no {missing}; the SAC baseline reads {keys}")
        obs = np.concatenate([st.load(k).reshape(st.n_steps, -1) for k in keys], axis=1).astype(np.float32)
        act, rew, term = st.load("action"), st.load("reward"), st.load("terminated").astype(bool)
        out = out or Transitions(obs.shape[1], act_dim)
        for s, e in zip(st.starts, st.ends):
            for t in range(int(s), int(e)):
                last = t == e - 1
                if last and not term[t]:
                    continue
                out.add(obs[t], act[t], rew[t], obs[t if last else t + 1], float(last))
    if out is None or not len(out):
        raise StoreError(f"the stores {[str(s) for s in stores]} hold no transitions")
    return out


class SAC(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig, obs_mean: np.ndarray, obs_std: np.ndarray):
        super().__init__()
        self.cfg, self.act_dim = cfg, act_dim
        self.register_buffer("mean", torch.as_tensor(obs_mean, dtype=torch.float32))
        # a key constant in the demonstrations (the gripper, a still wrench) must not blow up online
        self.register_buffer("std", torch.as_tensor(np.maximum(obs_std, 1e-2), dtype=torch.float32))
        self.actor = _mlp(obs_dim, 2 * act_dim, cfg.hidden, norm=False)
        self.critics = nn.ModuleList(_mlp(obs_dim + act_dim, 1, cfg.hidden, norm=True) for _ in range(cfg.n_critics))
        self.targets = copy.deepcopy(self.critics).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(float(np.log(cfg.init_temperature))))
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), cfg.lr)
        self.opt_critic = torch.optim.Adam(self.critics.parameters(), cfg.lr)
        self.opt_alpha = torch.optim.Adam([self.log_alpha], cfg.lr)
        self.last: dict[str, float] = {}

    def _norm(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.mean) / self.std).clamp(-10.0, 10.0)

    def policy(self, obs: torch.Tensor, deterministic: bool = False):
        """A tanh-squashed Gaussian action and its log-probability."""
        mu, log_std = self.actor(self._norm(obs)).chunk(2, -1)
        log_std = log_std.clamp(-5.0, 2.0)
        u = mu if deterministic else mu + log_std.exp() * torch.randn_like(mu)
        a = torch.tanh(u)
        logp = (-0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        return a, logp - torch.log(1 - a.pow(2) + 1e-6).sum(-1)

    def q(self, nets, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self._norm(obs), act], -1)
        return torch.stack([n(x).squeeze(-1) for n in nets])

    def update(self, b: dict[str, torch.Tensor], rng: np.random.Generator) -> None:
        cfg, alpha = self.cfg, self.log_alpha.exp().detach()
        with torch.no_grad():
            a2, logp2 = self.policy(b["next"])
            pair = rng.choice(cfg.n_critics, 2, replace=False)
            q2 = self.q([self.targets[i] for i in pair], b["next"], a2).min(0).values
            y = b["rew"] + cfg.gamma * (1 - b["done"]) * (q2 - alpha * logp2)
        critic_loss = F.mse_loss(self.q(self.critics, b["obs"], b["act"]), y.expand(cfg.n_critics, -1))
        self.opt_critic.zero_grad()
        critic_loss.backward()
        self.opt_critic.step()
        a, logp = self.policy(b["obs"])
        actor_loss = (alpha * logp - self.q(self.critics, b["obs"], a).mean(0)).mean()
        self.opt_actor.zero_grad()
        actor_loss.backward()
        self.opt_actor.step()
        alpha_loss = -(self.log_alpha * (logp.detach() - self.act_dim).mean())  # target entropy −|A|
        self.opt_alpha.zero_grad()
        alpha_loss.backward()
        self.opt_alpha.step()
        with torch.no_grad():
            for t, c in zip(self.targets.parameters(), self.critics.parameters()):
                t.lerp_(c, cfg.tau)
        self.last = {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(), "alpha": alpha.item()}


class SACAgent:
    """The trained actor as a rollout policy (deterministic: tanh of the mean)."""

    def __init__(self, sac: SAC, keys: list[str], deterministic: bool = True):
        self.sac, self.keys, self.deterministic = sac, keys, deterministic

    def reset(self, rng: np.random.Generator) -> None:
        torch.manual_seed(int(rng.integers(2**31)))

    @torch.no_grad()
    def act(self, obs: dict) -> np.ndarray:
        x = torch.as_tensor(flat_obs(obs, self.keys))[None]
        return self.sac.policy(x, self.deterministic)[0][0].numpy()


def evaluate_sac(sac: SAC, keys: list[str], make_env, task: str, episodes: int, seed: int) -> float:
    from robot_rl.rollout import run_episodes

    env = make_env()
    try:
        return run_episodes(env, SACAgent(sac, keys), episodes, seed, task, "sac", progress=False).success_rate
    finally:
        env.close()


def train_rlpd(task: str, make_env, stores: list[str | Path], keys: list[str], cfg: SACConfig,
               progress: bool = False) -> dict:
    """Online SAC with the stores' transitions in every batch. Returns the evaluation curve, the
    environment steps to 80 % success (None if never) and the final success rate."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    env = make_env()
    act_dim = int(np.prod(env.action_space.shape))
    offline = store_transitions(stores, keys, act_dim)
    data = offline.sample(rng, min(len(offline), 50_000))
    sac = SAC(offline.obs_dim, act_dim, cfg, data["obs"].mean(0), data["obs"].std(0))
    online = Transitions(offline.obs_dim, act_dim)
    explore = SACAgent(sac, keys, deterministic=False)
    curve, steps, episode, t0 = [(0, evaluate_sac(sac, keys, make_env, task, cfg.eval_episodes, cfg.eval_seed))], 0, 0, \
        time.perf_counter()
    try:
        while steps < cfg.max_env_steps:
            obs, _ = env.reset(seed=cfg.train_seed + episode)
            episode += 1
            done = False
            while not done and steps < cfg.max_env_steps:
                a = explore.act(obs)
                nxt, r, terminated, truncated, _ = env.step(a)
                online.add(flat_obs(obs, keys), a, r, flat_obs(nxt, keys), float(terminated))
                obs, done, steps = nxt, terminated or truncated, steps + 1
                for _ in range(cfg.utd):
                    k = int(round(cfg.batch_size * cfg.demo_ratio))
                    parts = [offline.sample(rng, k), online.sample(rng, cfg.batch_size - k)]
                    b = {key: torch.as_tensor(np.concatenate([p[key] for p in parts])) for key in parts[0]}
                    sac.update(b, rng)
                if steps % cfg.eval_every == 0:
                    curve.append((steps, evaluate_sac(sac, keys, make_env, task, cfg.eval_episodes, cfg.eval_seed)))
                    if progress:
                        print(f"sac {steps} steps: {100 * curve[-1][1]:.0f} % ({sac.last})", flush=True)
    finally:
        env.close()
    if curve[-1][0] != steps:
        curve.append((steps, evaluate_sac(sac, keys, make_env, task, cfg.eval_episodes, cfg.eval_seed)))
    to80 = next((s for s, v in curve if v >= 0.8), None)
    return {"curve": curve, "steps_to_80": to80, "final": curve[-1][1], "env_steps": steps,
            "wall_min": round((time.perf_counter() - t0) / 60, 1), "last": sac.last}
