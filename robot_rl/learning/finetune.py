"""Reinforcement-learning fine-tuning of chunked diffusion / consistency policies.

Critics: IQL over action chunks (`robot_rl.policies.critic.ChunkCritic`; MSE or HL-Gauss Q heads).
A transition is "execute the first `n_action_steps` actions of the chunk from this observation
window": its reward is the discounted sum over those steps, the next window is `n_action_steps`
later, the discount is γᵏ (0 when the episode terminated inside the chunk).

Policy update (`extraction`): **advantage-weighted regression** on the policy's own training loss
(AWR, Peng et al. 2019; the weighted-denoising form used for diffusion policies by EDP / IDQL-style
methods): each window's loss is weighted by exp(β·A(s, a)), clipped and normalised to mean 1, A
from the IQL critics. Chosen over PPO inside the denoising chain (DPPO, RL-100) because it is
off-policy: one update rule serves offline data, demonstrations, interventions and online rollouts
in one batch (RLPD-style mixing), it never leaves the data's support, and it applies unchanged to
the one-step consistency student — the policy that runs on the robot is the one fine-tuned online,
with no re-distillation in the loop. On-policy PPO would need thousands of fresh episodes per
update on two CPU cores. `extraction=ddpg_bc` (one-step students only) adds −q_weight·Q(s, π(s))
/ mean|Q| to the loss, differentiating the critic through the student's one-step jump (DDPG+BC,
which Park et al. 2024 find a stronger extractor than AWR; FQL's form for one-step policies). It
is experimental: with q_weight 1 on `reach` the IQL critic's values of unseen actions pulled the
student to 0 % within three rounds. The actor can also rank `select_n` sampled chunks by the
critic (IDQL's selection).

Advantages: `advantage=iql` (Q − V from the critics) or `mc` (the episode's Monte-Carlo return-to-go
− V); `normalize_advantage` standardises them over the batch so β is scale-free — under the sparse
0/1 task reward the raw IQL advantages are ~0.01, and exp(10·A) kept every weight within 1.6× of
uniform (the default update was, in effect, behaviour cloning).

Measured so far (`benchmarks/finetune.py`, RESULTS.md; benchmarks/NOTES.md): on `reach` (10 demos,
start 14 %, one seed, 50 paired episodes) no variant has yet beaten the uniform-weight control
(22 % at 5 k environment steps; 22 % at 9 k with utd 0.25, lr 1e-4): raw-β AWR 26 % (an earlier
run, from 12 %), standardised IQL advantages β = 1 24 % (20 % at 9 k), Monte-Carlo advantages 18 %
— all within noise of each other, the exploring policy still succeeding in ~10–20 % of episodes.
On the calibrated lift start (44 %, ~4 k steps) control, standardised IQL and `weighting=binary` (CRR's
1[A > 0]) all reach 70 %. Where the weighting did matter: a good reach_point start (65 %) fine-tuned on six
episodes at policy_lr 3e-4 falls to 30–35 % with exp weights (cloning its own failed rollouts), keeps 60 %
with `weighting=binary`. The issue's budgets (150 k steps, three seeds, lift and peg_insert) have not been run.

- **offline** (`finetune_offline`): critics from the stores, AW update of the checkpoint, **gated by
  off-policy evaluation**: the estimate is the critic's value of the policy's own chunks from the
  stores' episode-start windows, E_s0[Q(s0, π(s0))] with fixed sampling noise; the update is kept
  only if it improves on the starting policy's estimate by `gate_threshold`. A kept teacher is then
  re-distilled into a one-step student.
- **online** (`finetune_online`): an actor runs the policy (its own sampling noise plus Gaussian
  exploration) in simulation and records every episode into its own zarr store (source `policy`); the
  learner re-reads the stores (demonstrations / interventions and online data mixed `demo_ratio`
  : 1 − `demo_ratio`, RLPD's 50/50 by default), updates critics and policy, checkpoints, and the
  actor swaps the new weights in. WSRL-style warm start (`warm_start`): offline data only
  pre-trains the critics; online updates use online data only. Rewards: the task's, RLIF's
  intervention reward (`reward=rlif`), or a learned success classifier's (`reward=classifier`,
  HIL-SERL; `robot_rl.learning.reward`). Resumes from the last round's checkpoint and the store.
  The actor is in-process (`SimActor`, fastest) or the ROS 2 graph (`robot_rl.learning.ros_actor`:
  the policy server explores, the recorder node writes the online store, a person can take over from
  the web console, the learner's weights are hot-reloaded each round).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from robot_rl.learning.evaluate import ChunkAgent, evaluate, resolve_device
from robot_rl.policies.checkpoint import default_sampler, load_policy, save_policy
from robot_rl.policies.critic import ChunkCritic, CriticConfig
from robot_rl.policies.diffusion import DiffusionPolicy
from robot_rl.store import EpisodeStore, StoreError
from robot_rl.store.sampler import WindowConfig, WindowDataset


@dataclass
class FinetuneConfig:
    gamma: float = 0.99
    reward: str = "task"  # task | rlif | classifier
    reward_classifier: str | None = None  # reward=classifier: the folder from robot-rl train policy=reward_classifier
    critic: dict = field(default_factory=dict)  # CriticConfig overrides (q_loss: hlgauss, hidden, expectile, …)
    extraction: str = "awr"  # awr | ddpg_bc (one-step students only; experimental, see the module docstring)
    beta: float = 10.0  # AWR temperature (0: uniform weights, plain BC on the mixed data)
    advantage: str = "iql"  # iql: Q(s, a) − V(s) from the critics | mc: the episode's Monte-Carlo return-to-go − V(s)
    normalize_advantage: bool = False  # standardise the advantage over each batch before exp(β·A)
    weighting: str = "exp"  # exp: exp(β·A) (AWR) | binary: 1[A > 0] (CRR's binary filter: clone only what beats V)
    max_weight: float = 100.0
    q_weight: float = 0.1  # ddpg_bc: weight of −Q(s, π(s)) / mean|Q| against the behaviour-cloning term
    batch_size: int = 256
    critic_lr: float = 3e-4
    policy_lr: float = 3e-5
    critic_steps: int = 2000  # critic pre-training on the offline stores
    sampler: str | None = None  # the actor's / OPE's sampler (None: cm1 for a student, ddim10 for a teacher)
    seed: int = 0
    device: str = "auto"
    # offline
    policy_steps: int = 1000
    gate_every: int = 250
    gate_threshold: float = 0.005
    ope_windows: int = 512
    redistill_steps: int = 400
    # online
    rounds: int = 10
    episodes_per_round: int = 10
    max_env_steps: int = 150_000
    explore_std: float = 0.1  # Gaussian noise on the executed actions (action units, clipped to the action box)
    select_n: int = 1  # the actor samples this many chunks and runs the one the critic values most
    operator: str | None = None  # scripted: a scripted operator takes over when the policy strays (InterveningActor)
    utd: float = 1.0  # critic updates per environment step
    policy_every: int = 2  # one policy update per this many critic updates
    demo_ratio: float = 0.5
    warm_start: bool = False
    train_seed: int = 10_000_000  # online episode seeds: disjoint from demonstrations (0…) and evaluation (100000…)
    eval_episodes: int = 50
    eval_seed: int = 100_000
    eval_every: int = 0  # rounds; 0 = only before and after
    learner_threads: int = 0  # torch CPU threads of the learner (0: torch's default); 1 leaves the other cores to a
    # robot graph on the same host (its 1 kHz arm loop must never starve: libfranka aborts after 20 lost cycles)

    def __post_init__(self) -> None:
        if self.reward not in ("task", "rlif", "classifier"):
            raise ValueError(f"finetune reward '{self.reward}' is not task, rlif or classifier")
        if self.operator not in (None, "scripted"):
            raise ValueError(f"finetune operator '{self.operator}' is not scripted (or null: no human in sim)")
        if self.reward == "classifier" and not self.reward_classifier:
            raise ValueError("reward=classifier needs reward_classifier=<folder> (robot-rl train policy=reward_classifier)")
        if self.extraction not in ("awr", "ddpg_bc"):
            raise ValueError(f"finetune extraction '{self.extraction}' is not awr or ddpg_bc")
        if self.weighting not in ("exp", "binary"):
            raise ValueError(f"finetune weighting '{self.weighting}' is not exp or binary")
        if self.advantage not in ("iql", "mc"):
            raise ValueError(f"finetune advantage '{self.advantage}' is not iql or mc")
        if not 0.0 <= self.demo_ratio <= 1.0:
            raise ValueError(f"finetune demo_ratio {self.demo_ratio} must lie in [0, 1]")


# ---- chunk-level transitions from the stores ----------------------------------------------------------
class ChunkData:
    """Every step of the stores as a chunk transition, in RAM on `device`, normalised with the
    policy's normaliser. `batch(ids)` gives the policy's training windows, the rest the critic's."""

    def __init__(self, stores: list[str | Path], policy: DiffusionPolicy, gamma: float, reward: str = "task",
                 device: torch.device | str = "cpu", online: list[str | Path] = (), classifier=None):
        cfg = policy.cfg
        if cfg.image_keys:
            raise StoreError(f"finetune: the policy reads cameras {list(cfg.image_keys)}; RL fine-tuning supports "
                             "state-observation policies (train one with train.images=false)")
        opened = [EpisodeStore(s) for s in [*stores, *online]]
        ds = WindowDataset(opened, WindowConfig(n_obs_steps=cfg.n_obs_steps, horizon=cfg.horizon,
                                                obs_keys=tuple(cfg.state_keys)))
        if len(ds) == 0:
            raise StoreError(f"finetune: the stores {[str(s.path) for s in opened]} hold no steps")
        ids = np.arange(len(ds))
        w = ds[ids]
        pos, n = ds.t - ds.start, ds.end - ds.start
        if reward == "classifier":  # a learned success detector labels each step (HIL-SERL)
            from robot_rl.learning.reward import classifier_rewards

            rewards = classifier_rewards(classifier, [*stores, *online], device)
        else:
            rewards = ds.step_rewards(reward)
        term = ds.step_values("terminated").astype(bool)
        k_exec = cfg.n_action_steps
        ret = np.zeros(len(ds), np.float32)
        for i in range(k_exec):
            inside = pos + i < n
            ret[inside] += gamma**i * rewards[ids[inside] + i]
        steps = np.minimum(k_exec, n - pos)
        reaches_end = pos + k_exec >= n
        ended_terminal = term[ids - pos + n - 1]
        self.discount = torch.as_tensor(gamma**steps * ~(reaches_end & ended_terminal), dtype=torch.float32, device=device)
        self.ret = torch.as_tensor(ret, device=device)
        to_go = np.zeros(len(ds), np.float32)  # Monte-Carlo discounted return from each step to its episode's end
        for i in range(len(ds) - 1, -1, -1):
            to_go[i] = rewards[i] + (gamma * to_go[i + 1] if pos[i] + 1 < n[i] else 0.0)
        self.mc_return = torch.as_tensor(to_go, device=device)
        self.next_ids = torch.as_tensor(ids + np.minimum(k_exec, n - 1 - pos), device=device)
        self.windows = {k: torch.as_tensor(w[k], device=device) for k in [*cfg.state_keys, "action", "action_is_pad"]}
        first = cfg.n_obs_steps - 1
        with torch.no_grad():
            self.obs = policy.state_tensor(self.windows).flatten(1)
            self.act = policy.normalizer.normalize("action", self.windows["action"][:, first:first + k_exec]).flatten(1)
        self.start_ids = np.flatnonzero(pos == 0)
        offline_mask = ds.src < len(stores)  # the offline stores; then the policy's own (online) stores
        offline_mask[ds.ids_where(intervention=True)] = True  # HIL-SERL: the human's segments count as demonstrations
        self.offline_ids, self.online_ids = np.flatnonzero(offline_mask), np.flatnonzero(~offline_mask)
        self.n = len(ds)

    def batch(self, ids) -> dict[str, torch.Tensor]:
        return {k: v[ids] for k, v in self.windows.items()}

    def critic_inputs(self, ids):
        return self.obs[ids], self.act[ids], self.ret[ids], self.discount[ids], self.obs[self.next_ids[ids]]

    def sample(self, rng: np.random.Generator, size: int, demo_ratio: float) -> np.ndarray:
        """RLPD mixing: `demo_ratio` of the batch from offline data, the rest online (whichever exists)."""
        if not len(self.online_ids) or not len(self.offline_ids):
            return rng.integers(0, self.n, size)
        k = int(round(size * demo_ratio))
        return np.concatenate([rng.choice(self.offline_ids, k), rng.choice(self.online_ids, size - k)])


def reward_classifier(cfg: FinetuneConfig, device):
    if cfg.reward != "classifier":
        return None
    from robot_rl.policies.reward import RewardClassifier

    return RewardClassifier.load(cfg.reward_classifier, device)


def awr_weights(adv: torch.Tensor, beta: float, max_weight: float, normalize: bool = False,
                mode: str = "exp") -> torch.Tensor:
    """exp(β·A) clipped and normalised to mean 1; `normalize` first standardises A over the batch, so
    that β does not depend on the reward's scale, γ or the chunk length (raw IQL advantages of a
    sparse 0/1 reward are ~0.01: exp(10·A) stayed within 1.6 of uniform, plain behaviour cloning).
    `mode="binary"`: 1[A > 0] over the batch's mean (CRR's binary filter; zero if nothing beats V)."""
    if normalize:
        adv = (adv - adv.mean()) / adv.std().clamp(min=1e-6)
    w = (adv > 0).float() if mode == "binary" else torch.exp(beta * adv).clamp(max=max_weight)
    return w / w.mean().clamp(min=1e-8)


# ---- the learner ------------------------------------------------------------------------------------------
class Learner:
    """Critic + policy optimisers; `critic_step` / `policy_step` take sample ids of a ChunkData."""

    def __init__(self, policy: DiffusionPolicy, critic: ChunkCritic, cfg: FinetuneConfig):
        self.policy, self.critic, self.cfg = policy, critic, cfg
        if cfg.extraction == "ddpg_bc" and policy.kind != "consistency":
            raise ValueError(f"extraction ddpg_bc differentiates Q through a one-step policy; this checkpoint is a "
                             f"{policy.kind} policy (distil it first, or use extraction=awr)")
        self.opt_c = torch.optim.Adam([p for p in critic.parameters() if p.requires_grad], lr=cfg.critic_lr)
        self.opt_p = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.policy_lr,
                                       weight_decay=1e-6)
        self.last: dict[str, float] = {}

    @staticmethod
    def new_critic(policy: DiffusionPolicy, data: ChunkData, cfg: FinetuneConfig) -> ChunkCritic:
        ccfg = CriticConfig(obs_dim=data.obs.shape[1], act_dim=data.act.shape[1], gamma=cfg.gamma, **cfg.critic)
        return ChunkCritic(ccfg).to(data.obs.device)

    def critic_step(self, data: ChunkData, ids) -> None:
        loss, info = self.critic.losses(*data.critic_inputs(ids))
        self.opt_c.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 10.0)
        self.opt_c.step()
        self.critic.update_target()
        self.last.update(info)

    def policy_step(self, data: ChunkData, ids) -> None:
        self.policy.train()
        if self.cfg.advantage == "mc":
            with torch.no_grad():
                adv = data.mc_return[ids] - self.critic.value(data.obs[ids])
        else:
            adv = self.critic.advantage(data.obs[ids], data.act[ids])
        weights = awr_weights(adv, self.cfg.beta, self.cfg.max_weight, self.cfg.normalize_advantage,
                              self.cfg.weighting)
        batch = data.batch(ids)
        loss = self.policy.compute_loss(batch, weights)
        self.last.update(bc_loss=loss.item(), adv_mean=adv.mean().item(), weight_max=weights.max().item())
        if self.cfg.extraction == "ddpg_bc":
            q = self.critic.q(data.obs[ids], self.one_step_actions(batch))
            q_loss = -q.mean() / q.abs().mean().detach().clamp(min=1e-3)
            loss = loss + self.cfg.q_weight * q_loss
            self.last.update(q_policy=q.mean().item())
        self.opt_p.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt_p.step()

    def one_step_actions(self, batch) -> torch.Tensor:
        """The student's executed chunk from fresh noise, differentiable (what cm1 runs)."""
        from robot_rl.policies.consistency import start_time

        p, cfg = self.policy, self.policy.cfg
        cond = p.condition(batch)
        z = torch.randn((cond.shape[0], cfg.horizon, cfg.action_dim), device=cond.device)
        t0 = torch.full((cond.shape[0],), start_time(cfg.num_train_timesteps), device=cond.device)
        chunk = p.consistency_fn(p.net, z, t0, cond).clamp(-1, 1)
        first = cfg.n_obs_steps - 1
        return chunk[:, first:first + cfg.n_action_steps].flatten(1)


@torch.no_grad()
def ope_estimate(policy: DiffusionPolicy, critic: ChunkCritic, data: ChunkData, ids: np.ndarray, sampler: str,
                 seed: int = 0) -> float:
    """E[Q(s, π(s))] over the windows `ids`, with fixed sampling noise (two policies compared on the
    same noise and states)."""
    policy.eval()
    cfg = policy.cfg
    noise = torch.randn((len(ids), cfg.horizon, cfg.action_dim), generator=torch.Generator().manual_seed(seed))
    cond = policy.condition(data.batch(ids))
    chunk = policy.sample_normalized(cond, sampler, None, noise.to(cond.device))
    first = cfg.n_obs_steps - 1
    act = chunk[:, first:first + cfg.n_action_steps].flatten(1)
    return float(critic.q(data.obs[ids], act).mean())


def _save(policy: DiffusionPolicy, path: Path, source: str | Path, info: dict) -> Path:
    keep = {k: v for k, v in policy.checkpoint_config.items()
            if k not in ("kind", "policy", "normalizer_keys", "spec_subset", "spec_hash", "weights_sha256")}
    return save_policy(policy, path, policy.spec_subset, {**keep, "finetuned_from": str(source), **info})


def _pretrain_critic(learner: Learner, data: ChunkData, steps: int, rng: np.random.Generator, progress: bool,
                     label: str = "critic") -> None:
    from rich.progress import track

    for _ in track(range(steps), description=label, disable=not progress):
        learner.critic_step(data, rng.integers(0, data.n, learner.cfg.batch_size))


# ---- offline ----------------------------------------------------------------------------------------------
def finetune_offline(ckpt: str | Path, stores: list[str], out: str | Path, cfg: FinetuneConfig, progress: bool = True,
                     make_env=None, task: str | None = None) -> dict:
    """Critics from the stores, an AW update gated by OPE; a kept teacher is re-distilled. Returns the report."""
    from rich.progress import track

    out = Path(out)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = load_policy(ckpt, device)
    policy = copy.deepcopy(start)
    sampler = cfg.sampler or default_sampler(policy.kind)
    data = ChunkData(stores, policy, cfg.gamma, cfg.reward, device, classifier=reward_classifier(cfg, device))
    learner = Learner(policy, Learner.new_critic(policy, data, cfg), cfg)
    _pretrain_critic(learner, data, cfg.critic_steps, rng, progress)
    gate_ids = data.start_ids[rng.permutation(len(data.start_ids))[: cfg.ope_windows]]
    before = ope_estimate(start, learner.critic, data, gate_ids, sampler, cfg.seed)
    best, best_state, trace = -np.inf, None, [(0, before)]  # the best candidate of the update
    for step in track(range(1, cfg.policy_steps + 1), description="policy (AWR)", disable=not progress):
        learner.policy_step(data, rng.integers(0, data.n, cfg.batch_size))
        if step % cfg.gate_every == 0 or step == cfg.policy_steps:
            est = ope_estimate(policy, learner.critic, data, gate_ids, sampler, cfg.seed)
            trace.append((step, est))
            if est > best:
                best, best_state = est, copy.deepcopy(policy.state_dict())
    kept = bool(best >= before + cfg.gate_threshold)
    report = {"mode": "offline", "ckpt": str(ckpt), "stores": [str(s) for s in stores], "sampler": sampler,
              "ope_before": before, "ope_best": best, "ope_trace": trace, "gate_threshold": cfg.gate_threshold,
              "kept": kept, "config": asdict(cfg)}
    learner.critic.save(out / "critic")
    if kept:
        policy.load_state_dict(best_state)
        _save(policy, out / "policy", ckpt, {"stage": "finetune offline", "ope": best})
        report["policy"] = str(out / "policy")
        if policy.kind == "diffusion" and cfg.redistill_steps > 0:
            from robot_rl.learning.train import LoopConfig, distill

            loop = LoopConfig(steps=cfg.redistill_steps, batch_size=cfg.batch_size, lr=3e-4, warmup_steps=20,
                              eval_episodes=0, ckpt_every=0, seed=cfg.seed, device=cfg.device, log_every=20)
            distill(out / "policy", out / "student", loop, [str(s) for s in stores], progress=progress)
            report["student"] = str(out / "student")
    if make_env is not None and cfg.eval_episodes > 0:  # the gate's verdict next to the simulator's, paired seeds
        report["eval"] = {name: _eval(p, make_env, task, cfg, sampler, device)
                          for name, p in (("before", start), ("after", policy if kept else start))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _eval(policy, make_env, task, cfg: FinetuneConfig, sampler: str, device) -> dict:
    env = make_env()
    try:
        r = evaluate(policy, env, task, cfg.eval_episodes, cfg.eval_seed, sampler, device)
    finally:
        env.close()
    return {"success_rate": r.success_rate, "successes": r.successes, "episodes": r.episodes, "ci95": list(r.ci95),
            "per_episode": r.per_episode}


# ---- online -----------------------------------------------------------------------------------------------
class ExploringAgent(ChunkAgent):
    """The actor: the policy's own sampling noise plus Gaussian noise on each planned chunk
    (`ChunkAgent.explore_std`). With a critic and `select_n` > 1 it samples that many chunks and
    executes the one the critic values most (IDQL's selection, Hansen-Estruch et al. 2023): every
    candidate comes from the policy, so the critic only ranks actions inside the policy's support.
    It acts alone (`act`), never batched with other agents (`act_batch` of several skips `plan`)."""

    def __init__(self, policy, sampler, device, std: float, critic: ChunkCritic | None = None, select_n: int = 1):
        super().__init__(policy, sampler, device, explore_std=std)
        self.critic, self.select_n = critic, select_n if critic is not None else 1

    @torch.no_grad()
    def plan(self) -> np.ndarray:
        if self.select_n <= 1:
            return super().plan()
        p, cfg, n = self.policy, self.policy.cfg, self.select_n
        batch, feats, _ = self._inputs()
        noise = torch.randn((n, cfg.horizon, cfg.action_dim), generator=self.generator).to(self.device)
        cond = p.condition(batch, feats).expand(n, -1)
        chunks = p.sample_normalized(cond, self.sampler, None, noise)
        first = cfg.n_obs_steps - 1
        q = self.critic.q(p.state_tensor(batch).flatten(1).expand(n, -1),
                          chunks[:, first:first + cfg.n_action_steps].flatten(1))
        return p.normalizer.unnormalize("action", chunks[int(q.argmax())])[None][0].cpu().numpy()


class InterveningActor:
    """The in-process human in the loop: a scripted operator (drivers.teleop.ScriptedOperator's
    hysteresis, the rule `HilOperator` applies on the ROS path) watches the policy against the
    scripted expert's path for the episode's seed; while it drives, the scripted expert acts from
    the current state and the steps are flagged as interventions (recorded, routed to the
    demonstration share, RLIF's −1 before each takeover); at hand-back the policy plans afresh."""

    def __init__(self, agent: ChunkAgent, env, task: str):
        from robot_rl.sim import make_expert

        self.agent, self.env, self.task = agent, env, task
        self.expert = make_expert(env)
        self.takeovers, self.intervening = 0, False

    def begin(self, seed: int) -> None:
        from robot_rl.drivers.teleop import ScriptedOperator
        from robot_rl.operator import expert_path
        from robot_rl.rollout import policy_rng

        self.path = [pose[:3] for pose, _ in expert_path(self.task, seed)]
        self.expert.reset(policy_rng(seed))
        self.op, self.k, self.intervening = ScriptedOperator(), 0, False

    def reset(self, rng: np.random.Generator) -> None:
        self.agent.reset(rng)

    def act(self, obs: dict) -> np.ndarray:
        ee = self.env.unwrapped.arm.ee_pose[:3]
        driving, _ = self.op.decide(ee, self.path[min(self.k, len(self.path) - 1)])
        self.k += 1
        self.takeovers += int(driving and not self.intervening)
        if self.intervening and not driving:
            self.agent.queue.clear()  # control comes back: the policy plans from here
        self.intervening = driving
        if not driving:
            return self.agent.act(obs)
        self.agent.observe(obs)
        return np.asarray(self.expert.act(obs), dtype=np.float32)


@dataclass
class RoundResult:
    """What one actor round did: episodes run and recorded into the online store."""
    episodes: int
    successes: int
    steps: int
    takeovers: int = 0


class SimActor:
    """The in-process actor: the exploring policy (and the scripted operator, `operator=scripted`)
    steps a MuJoCo env; every episode is recorded into the online store (source `policy`)."""

    def __init__(self, make_env, task: str, store: Path, cfg: FinetuneConfig, sampler: str, device):
        self.env, self.task, self.store, self.cfg, self.sampler, self.device = make_env(), task, store, cfg, sampler, device

    def round(self, policy, critic: ChunkCritic | None, rnd: int) -> RoundResult:
        from robot_rl.rollout import EpisodeRecorder, run_episodes

        cfg = self.cfg
        agent = ExploringAgent(policy, self.sampler, self.device, cfg.explore_std, critic, cfg.select_n)
        actor = InterveningActor(agent, self.env, self.task) if cfg.operator == "scripted" else agent
        rec = EpisodeRecorder(self.store, self.env.robot_spec, self.task, source="policy")
        try:
            s = run_episodes(self.env, actor, cfg.episodes_per_round, cfg.train_seed + rnd * cfg.episodes_per_round,
                             self.task, f"round {rnd}", progress=False, recorder=rec)
        finally:
            rec.close()
        return RoundResult(s.episodes, s.successes, s.steps, getattr(actor, "takeovers", 0))

    def summary(self) -> dict:
        return {"kind": "sim"}

    def close(self) -> None:
        self.env.close()


@dataclass
class OnlineHistory:
    rounds: list[int] = field(default_factory=list)
    env_steps: list[int] = field(default_factory=list)
    success: list[float] = field(default_factory=list)
    ret: list[float] = field(default_factory=list)
    interventions: list[float] = field(default_factory=list)
    updates_per_s: list[float] = field(default_factory=list)
    eval_env_steps: list[int] = field(default_factory=list)
    eval_success: list[float] = field(default_factory=list)


def finetune_online(ckpt: str | Path, task: str, make_env, stores: list[str], out: str | Path, cfg: FinetuneConfig,
                    progress: bool = True, actor=None) -> dict:
    """Actor/learner rounds; every episode lands in `out/online.zarr`. Resumable. `actor(policy_path,
    online_store, sampler, first_round)` builds another actor than the in-process `SimActor` (the ROS
    graph: `robot_rl.learning.ros_actor.RosActor`); it is given each round's policy and returns a
    `RoundResult`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.learner_threads > 0:
        torch.set_num_threads(cfg.learner_threads)
    online_store, last, state_file = out / "online.zarr", out / "last", out / "state.json"
    start = load_policy(ckpt, device)
    sampler = cfg.sampler or default_sampler(start.kind)
    resumed = state_file.exists()
    if resumed:  # a crash or a stop: weights and critics of the last finished round, data from the store
        state = json.loads(state_file.read_text())
        policy = load_policy(last / "policy", device)
        critic = ChunkCritic.load(last / "critic", device)
        hist = OnlineHistory(**state["history"])
        first_round, env_steps = state["round"] + 1, state["env_steps"]
        before = state["before"]
    else:
        policy, critic, hist, first_round, env_steps = copy.deepcopy(start), None, OnlineHistory(), 0, 0
        before = _eval(start, make_env, task, cfg, sampler, device) if cfg.eval_episodes else None
    clf = reward_classifier(cfg, device)
    torch.manual_seed(cfg.seed + first_round)
    rng = np.random.default_rng([cfg.seed, first_round])
    offline = [str(s) for s in stores]
    if critic is None:
        critic_data = ChunkData(offline, policy, cfg.gamma, cfg.reward, device, classifier=clf) if offline else None
        critic = Learner.new_critic(policy, critic_data, cfg) if critic_data else None
    learner = Learner(policy, critic, cfg) if critic is not None else None
    if learner is not None and not resumed:
        _pretrain_critic(learner, critic_data, cfg.critic_steps, rng, progress, "critic (offline data)")
    tb = _tensorboard(out / "tensorboard")
    runner = SimActor(make_env, task, online_store, cfg, sampler, device) if actor is None else \
        actor(last / "policy" if resumed else Path(ckpt), online_store, sampler, first_round)
    try:
        for rnd in range(first_round, cfg.rounds):
            if env_steps >= cfg.max_env_steps:
                break
            s = runner.round(policy, learner and learner.critic, rnd)
            env_steps += s.steps
            data = ChunkData([] if cfg.warm_start else offline, policy, cfg.gamma, cfg.reward, device, [online_store], clf)
            if learner is None:
                learner = Learner(policy, Learner.new_critic(policy, data, cfg), cfg)
            n_updates, t0 = max(1, int(cfg.utd * s.steps)), time.perf_counter()
            for u in range(n_updates):
                ids = data.sample(rng, cfg.batch_size, 0.0 if cfg.warm_start else cfg.demo_ratio)
                learner.critic_step(data, ids)
                if u % cfg.policy_every == 0:
                    learner.policy_step(data, ids)
            ups = n_updates / max(1e-9, time.perf_counter() - t0)
            online_rewards = EpisodeStore(online_store)
            hist.rounds.append(rnd)
            hist.env_steps.append(env_steps)
            hist.success.append(s.successes / max(1, s.episodes))
            hist.ret.append(_mean_return(online_rewards, s.episodes))
            hist.interventions.append(s.takeovers / max(1, s.episodes))
            hist.updates_per_s.append(ups)
            if cfg.eval_every and (rnd + 1) % cfg.eval_every == 0 and rnd + 1 < cfg.rounds:
                hist.eval_env_steps.append(env_steps)
                hist.eval_success.append(_eval(policy, make_env, task, cfg, sampler, device)["success_rate"])
            for key in ("success", "ret", "interventions", "updates_per_s"):
                tb.add_scalar(f"online/{key}", getattr(hist, key)[-1], env_steps)
            for key, v in learner.last.items():
                tb.add_scalar(f"learner/{key}", v, env_steps)
            tb.flush()
            _save(policy, last / "policy", ckpt, {"stage": "finetune online", "round": rnd, "env_steps": env_steps})
            learner.critic.save(last / "critic")
            state_file.write_text(json.dumps({"round": rnd, "env_steps": env_steps, "before": before,
                                              "history": asdict(hist)}))
            if progress:
                print(f"round {rnd}: {s.successes}/{s.episodes} ok (exploring), {env_steps} env steps, "
                      f"{n_updates} updates at {ups:.0f}/s, {learner.last}")
    finally:
        runner.close()
        tb.close()
    _save(policy, out / "policy", ckpt, {"stage": "finetune online", "env_steps": env_steps})
    after = _eval(policy, make_env, task, cfg, sampler, device) if cfg.eval_episodes else None
    if after is not None:
        hist.eval_env_steps.append(env_steps)
        hist.eval_success.append(after["success_rate"])
    if before is not None:
        hist.eval_env_steps.insert(0, 0)
        hist.eval_success.insert(0, before["success_rate"])
    plot_online(hist, out / "curves.png", task)
    report = {"mode": "online", "ckpt": str(ckpt), "task": task, "sampler": sampler, "policy": str(out / "policy"),
              "env_steps": env_steps, "before": before, "after": after, "history": asdict(hist), "config": asdict(cfg),
              "actor": runner.summary()}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _mean_return(store: EpisodeStore, last_n: int) -> float:
    rewards = store.load("reward")
    ends = store.ends[-last_n:]
    starts = store.starts[-last_n:]
    return float(np.mean([rewards[a:b].sum() for a, b in zip(starts, ends)])) if len(ends) else 0.0


def _tensorboard(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def plot_online(hist: OnlineHistory, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(16, 3.5))
    ax[0].plot(hist.env_steps, [100 * s for s in hist.success], marker=".", label="exploring rollouts")
    ax[0].plot(hist.eval_env_steps, [100 * s for s in hist.eval_success], marker="o", label="evaluation")
    ax[0].set_ylabel("success %")
    ax[0].set_ylim(-5, 105)
    ax[0].legend()
    for a, y, name in ((ax[1], hist.ret, "return"), (ax[2], hist.interventions, "interventions / episode"),
                       (ax[3], hist.updates_per_s, "updates / s")):
        a.plot(hist.env_steps, y, marker=".")
        a.set_ylabel(name)
    for a in ax:
        a.set_xlabel("environment steps")
    fig.suptitle(f"online fine-tuning: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
