"""The imitation pipeline end to end: scripted demonstrations -> episode store -> diffusion
teacher -> one-step consistency student -> teacher and student evaluated on the same seeds.
Used by `make demo` (small budget) and `benchmarks/imitation.py` (the budgets of the results).
Each stage is skipped when its output already exists, so long runs resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robot_rl.learning.evaluate import EvalResult, evaluate
from robot_rl.learning.train import LoopConfig, build_dataset, distill, train_diffusion
from robot_rl.policies.checkpoint import load_policy
from robot_rl.policies.diffusion import DiffusionPolicy


@dataclass
class PipelineConfig:
    task: str
    setup: dict = field(default_factory=dict)
    demos: int = 50
    demo_seed: int = 0
    images: bool = False
    net: dict = field(default_factory=dict)
    train: LoopConfig = field(default_factory=LoopConfig)
    distill: LoopConfig = field(default_factory=LoopConfig)
    distill_dropout: float = 0.1
    eval_episodes: int = 50
    eval_seed: int = 100_000
    evals: tuple[tuple[str, str], ...] = (("teacher", "ddim10"), ("student", "cm1"), ("student", "cm3"))
    video: bool = True
    progress: bool = True


def collect_demos(cfg: PipelineConfig, out: Path) -> Path:
    """The scripted demonstrations of `cfg` in `out`'s store (topped up to `cfg.demos`), prepared."""
    from robot_rl.rollout import EpisodeRecorder, make_policy, run_episodes
    from robot_rl.sim import make_env
    from robot_rl.store import EpisodeStore
    from robot_rl.store.tools import prepare

    store = Path(out) / f"{cfg.task.replace('/', '_')}_demos.zarr"
    have = EpisodeStore(store).n_episodes if (store / "zarr.json").exists() else 0
    if have < cfg.demos:
        setup = {**cfg.setup, **({"obs_mode": "image"} if cfg.images else {})}
        env = make_env(cfg.task, **setup)
        rec = EpisodeRecorder(store, env.robot_spec, cfg.task)
        run_episodes(env, make_policy("scripted", env, 0), cfg.demos - have, cfg.demo_seed + have, cfg.task,
                     "scripted demos", progress=cfg.progress, recorder=rec)
        rec.close()
        env.close()
    st = EpisodeStore(store)
    if st.attrs.get("prepared", {}).get("n_steps") != st.n_steps:  # (a cached store is not locked again: runs can share it)
        prepare(store)
    return store


def run_pipeline(cfg: PipelineConfig, out: Path) -> dict:
    from robot_rl.learn_cli import env_factory

    out = Path(out)
    store = collect_demos(cfg, out)
    teacher_dir, student_dir = out / "teacher", out / "student"
    if (teacher_dir / "config.json").exists():
        teacher = load_policy(teacher_dir)
    else:
        teacher, _ = train_diffusion([str(store)], teacher_dir, cfg.net, cfg.train, use_images=cfg.images, task=cfg.task,
                                     progress=cfg.progress, resume=True)
    if cfg.distill.steps <= 0:  # the teacher alone (its evaluations only)
        student = None
    elif (student_dir / "config.json").exists():
        student = load_policy(student_dir)
    else:
        student, _ = distill(teacher_dir, student_dir, cfg.distill, dropout=cfg.distill_dropout, progress=cfg.progress,
                             resume=True)
    rows: list[dict] = []
    results: list[EvalResult] = []
    for label, sampler in cfg.evals:
        pol = teacher if label == "teacher" else student
        if pol is None:
            raise ValueError(f"imitation pipeline: evaluating the student ({sampler}) needs distill steps > 0")
        env = env_factory(cfg.task, cfg.setup, teacher.spec_subset)()
        video = out / f"{cfg.task.replace('/', '_')}_{label}_{sampler}.gif" if cfg.video else None
        r = evaluate(pol, env, cfg.task, cfg.eval_episodes, cfg.eval_seed, sampler, video_path=video, progress=cfg.progress)
        env.close()
        results.append(r)
        rows.append({"policy": label, **r.to_dict()})
    gap = None if student is None else sampler_gap(student, teacher, [str(store)])
    return {"task": cfg.task, "rows": rows, "store": str(store), "teacher": str(teacher_dir), "student": str(student_dir),
            "paired": _paired(results), "cm1_vs_ddim10": gap}


@torch.no_grad()
def sampler_gap(student: DiffusionPolicy, teacher: DiffusionPolicy, stores: list[str], sampler: str = "cm1",
                teacher_sampler: str = "ddim10", windows: int = 256, seed: int = 0) -> float:
    """How closely a distilled student copies its teacher, noise for noise: the mean |student chunk -
    teacher chunk| drawn from the same initial noise on demonstration windows, over the executed steps
    and the action dimensions the task uses (normalised units, so 2 spans an action's whole range)."""
    cfg = teacher.cfg
    ds, _ = build_dataset(stores, cfg.n_obs_steps, cfg.horizon, [*cfg.state_keys, *cfg.image_keys])
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(ds), (windows,), generator=g).tolist()
    device = teacher.alphas_cumprod.device
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in ds[rows].items()}
    z = torch.randn((windows, cfg.horizon, cfg.action_dim), generator=g).to(device)
    student.eval()
    chunks = [p.sample_normalized(p.condition(batch), name, noise=z)
              for p, name in ((student, sampler), (teacher.eval(), teacher_sampler))]
    start, mask = cfg.n_obs_steps - 1, torch.tensor(teacher.spec_subset["action"]["mask"], device=device)
    return float((chunks[0] - chunks[1])[:, start:start + cfg.n_action_steps][..., mask].abs().mean())


def _paired(results: list[EvalResult]) -> dict:
    """Per pair of evaluations on the same seeds: episodes where exactly one of them succeeded."""
    out = {}
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            only_a = sum(x and not y for x, y in zip(a.per_episode, b.per_episode))
            only_b = sum(y and not x for x, y in zip(a.per_episode, b.per_episode))
            out[f"{a.sampler} vs {b.sampler}"] = {"only_first": only_a, "only_second": only_b}
    return out
