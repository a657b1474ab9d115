"""Imitation training of the diffusion teacher and consistency distillation of the student.

One loop serves both (`run_loop`): windows from episode stores through a DataLoader, AdamW with
cosine warm-up (diffusers), EMA of the weights (diffusers EMAModel, power 0.75), periodic
in-process evaluation in simulation, checkpoints (safetensors + JSON) with resume, loss and
success curves as PNG.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robot_rl.learning.evaluate import evaluate, resolve_device
from robot_rl.policies.checkpoint import load_policy, load_train_state, save_policy, save_train_state
from robot_rl.policies.consistency import ConsistencyPolicy, Distiller
from robot_rl.policies.diffusion import DiffusionPolicy, PolicyConfig
from robot_rl.policies.normalizer import Normalizer
from robot_rl.store import EpisodeStore, StoreError
from robot_rl.store.sampler import WindowConfig, WindowDataset
from robot_rl.store.tools import stats as store_stats


@dataclass
class LoopConfig:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 500
    ema_power: float = 0.75
    eval_every: int = 0  # 0: only at the end
    eval_episodes: int = 10
    eval_seed: int = 100_000
    ckpt_every: int = 1000
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    log_every: int = 50


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    success: list[float] = field(default_factory=list)
    # wall seconds the loop ran (evaluations and checkpoints included) and the steps they cover, summed over
    # resumes: a run resumed from a checkpoint written before they were kept times only the steps after it
    train_s: float = 0.0
    timed_steps: int = 0


def build_dataset(stores: list[str], n_obs_steps: int, horizon: int, keys: list[str], image_source: str = "prepared"):
    opened = [EpisodeStore(s) for s in stores]
    ds = WindowDataset(opened, WindowConfig(n_obs_steps=n_obs_steps, horizon=horizon, obs_keys=tuple(keys),
                                            image_source=image_source))
    return ds, opened


def default_obs_keys(spec, use_images: bool) -> list[str]:
    """State mode: everything but joint velocities; image mode: cameras + proprioception (no sim-only)."""
    if use_images:
        return [k for k in spec.keys() if k.startswith("image.") or (not spec.key(k).sim_only and k != "state.joint_vel")]
    return [k for k in spec.state_keys if k != "state.joint_vel"]


def train_seed_range(stores: list[EpisodeStore]) -> list[int] | None:
    seeds = [m["seed"] for st in stores for m in st.meta if isinstance(m.get("seed"), int)]
    return [min(seeds), max(seeds)] if seeds else None


def merged_stats(stores: list[EpisodeStore]) -> dict:
    """Normalisation statistics (min / max per key) over several prepared stores."""
    st = store_stats(stores[0])
    for other in stores[1:]:
        o = store_stats(other)
        st = {k: {"min": np.minimum(st[k]["min"], o[k]["min"]).tolist(),
                  "max": np.maximum(st[k]["max"], o[k]["max"]).tolist()} for k in st}
    return st


def make_teacher(stores: list[EpisodeStore], keys: list[str], pcfg: dict, cls=DiffusionPolicy) -> DiffusionPolicy:
    spec = stores[0].spec
    st = merged_stats(stores)
    state_keys = tuple(k for k in keys if not k.startswith("image."))
    image_keys = tuple(k for k in keys if k.startswith("image."))
    cfg = PolicyConfig.from_dict({**pcfg, "state_keys": state_keys, "image_keys": image_keys,
                                  "action_dim": spec.action.dim,
                                  "state_dims": {k: int(np.prod(spec.key(k).shape)) for k in state_keys}})
    return cls(cfg, Normalizer.from_stats(st, [*state_keys, "action"]))


def _loader(ds: WindowDataset, batch_size: int, steps: int, seed: int, workers: int):
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    g = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(RandomSampler(range(len(ds)), replacement=True, num_samples=steps * batch_size, generator=g),
                           batch_size, drop_last=True)
    return DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers,
                      collate_fn=lambda b: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()},
                      persistent_workers=workers > 0)


def run_loop(model: DiffusionPolicy, loss_fn: Callable[[dict], torch.Tensor], ds: WindowDataset, out: Path,
             cfg: LoopConfig, spec_subset: dict, extra: dict, evaluate_fn: Callable[[DiffusionPolicy], float] | None,
             after_step: Callable[[], None] | None = None, progress: bool = True, resume: bool = False) -> History:
    """Train `model` on `loss_fn`; the EMA copy is what gets evaluated and saved."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    device = model.alphas_cumprod.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.95, 0.999), weight_decay=cfg.weight_decay)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(cfg.warmup_steps, cfg.steps // 10 + 1),
                          num_training_steps=cfg.steps)
    ema_model = copy.deepcopy(model).eval()
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, power=cfg.ema_power)
    hist, start = History(), 0
    last = out / "last"
    if resume and (last / "train_state.json").exists():
        state = load_train_state(last, opt)
        model.load_state_dict(load_policy(last / "online").state_dict())
        ema_model.load_state_dict(load_policy(last).state_dict())
        ema.shadow_params = [p.clone().detach() for p in ema_model.parameters()]
        ema.optimization_step = state["ema_step"]
        sched.load_state_dict(state["lr_schedule"])
        start = state["step"]
        hist = History(**state["history"])
        torch.manual_seed(cfg.seed + start)
    else:
        torch.manual_seed(cfg.seed)
    loader = iter(_loader(ds, cfg.batch_size, max(1, cfg.steps - start), cfg.seed + start, cfg.num_workers))
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    running, t0 = [], time.perf_counter()
    timed0 = (hist.train_s, hist.timed_steps)

    def checkpoint(step: int, final: bool = False):
        hist.train_s, hist.timed_steps = timed0[0] + time.perf_counter() - t0, timed0[1] + step - start
        ema.copy_to(ema_model.parameters())
        info = {**extra, "step": step, "history": hist.__dict__}
        save_policy(ema_model, out if final else last, spec_subset, info)
        if not final:
            save_policy(model, last / "online", spec_subset, info)
            save_train_state(last, opt, {"step": step, "ema_step": ema.optimization_step, "lr_schedule": sched.state_dict(),
                                         "history": hist.__dict__})

    model.train()
    with Progress(*cols, disable=not progress) as bar:
        tid = bar.add_task(extra.get("stage", "train"), total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
            loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            ema.step(model.parameters())
            if after_step is not None:
                after_step()
            running.append(loss.item())
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                hist.steps.append(done)
                hist.loss.append(float(np.mean(running)))
                running.clear()
            if evaluate_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                ema.copy_to(ema_model.parameters())
                hist.eval_steps.append(done)
                hist.success.append(evaluate_fn(ema_model))
                model.train()
            if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
                checkpoint(done)
            info = f"loss {hist.loss[-1]:.4f}" if hist.loss else ""
            if hist.success:
                info += f"  success {100 * hist.success[-1]:.0f}%"
            bar.update(tid, completed=done, info=info + f"  {done / max(1e-9, time.perf_counter() - t0):.1f} it/s")
    ema.copy_to(ema_model.parameters())
    if evaluate_fn is not None:
        hist.eval_steps.append(cfg.steps)
        hist.success.append(evaluate_fn(ema_model))
    checkpoint(cfg.steps, final=True)
    checkpoint(cfg.steps)
    plot_history(hist, out / "curves.png", extra.get("stage", "train"))
    (out / "history.json").write_text(json.dumps(hist.__dict__, indent=2))
    return hist


def plot_history(hist: History, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(hist.steps, hist.loss)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss")
    ax[1].plot(hist.eval_steps, [100 * s for s in hist.success], marker="o")
    ax[1].set_ylim(-5, 105)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("success %")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the two stages ----------------------------------------------------------------------------------
def train_diffusion(stores: list[str], out: str | Path, pcfg: dict, loop: LoopConfig, keys: list[str] | None = None,
                    use_images: bool = False, make_env=None, task: str | None = None, progress: bool = True,
                    resume: bool = False, cls=DiffusionPolicy) -> tuple[DiffusionPolicy, History]:
    """Imitation training; `cls=BCPolicy` trains the deterministic MSE baseline on the same data."""
    out = Path(out)
    opened = [EpisodeStore(s) for s in stores]
    spec = opened[0].spec
    keys = keys or default_obs_keys(spec, use_images)
    missing = [k for k in keys if k not in spec.keys()]
    if missing:
        raise StoreError(f"store {opened[0].path}: no keys {missing} (it has {spec.keys()})")
    torch.manual_seed(loop.seed)  # the initial weights depend on the seed only, not on what ran before
    policy = make_teacher(opened, keys, pcfg, cls)
    device = resolve_device(loop.device)
    policy.to(device)
    ds, _ = build_dataset(stores, policy.cfg.n_obs_steps, policy.cfg.horizon, keys)
    subset = spec.policy_subset(keys)
    extra = {"stage": "train diffusion", "task": task, "stores": [str(s) for s in stores],
             "train_seeds": train_seed_range(opened), "seed": loop.seed, "eval_seed": loop.eval_seed}
    evaluate_fn = _eval_fn(make_env, task, loop, "bc" if cls is not DiffusionPolicy else "ddim10", device) if make_env else None
    hist = run_loop(policy, policy.compute_loss, ds, out, loop, subset, extra, evaluate_fn, progress=progress, resume=resume)
    return load_policy(out, device), hist


def distill(teacher_path: str | Path, out: str | Path, loop: LoopConfig, stores: list[str] | None = None,
            dropout: float = 0.1, skip: int = 10, make_env=None, task: str | None = None, progress: bool = True,
            resume: bool = False) -> tuple[ConsistencyPolicy, History]:
    device = resolve_device(loop.device)
    teacher = load_policy(teacher_path, device)
    tcfg = teacher.checkpoint_config
    stores = stores or tcfg["stores"]
    student_cfg = PolicyConfig.from_dict({**teacher.cfg.to_dict(), "dropout": dropout})
    student = ConsistencyPolicy(student_cfg, copy.deepcopy(teacher.normalizer)).to(device)
    student.load_state_dict(teacher.state_dict())  # warm start from the teacher
    keys = [*teacher.cfg.state_keys, *teacher.cfg.image_keys]
    ds, opened = build_dataset(stores, teacher.cfg.n_obs_steps, teacher.cfg.horizon, keys)
    distiller = Distiller(teacher, student, skip=skip)
    extra = {"stage": "distill", "task": task or tcfg.get("task"), "stores": [str(s) for s in stores],
             "teacher": str(teacher_path), "train_seeds": tcfg.get("train_seeds"), "seed": loop.seed,
             "eval_seed": loop.eval_seed}
    evaluate_fn = _eval_fn(make_env, extra["task"], loop, "cm1", device) if make_env else None
    hist = run_loop(student, distiller.loss, ds, Path(out), loop, tcfg["spec_subset"], extra, evaluate_fn,
                    after_step=distiller.update_target, progress=progress, resume=resume)
    return load_policy(out, device), hist


def _eval_fn(make_env, task, loop: LoopConfig, sampler: str, device):
    def fn(policy: DiffusionPolicy) -> float:
        env = make_env()
        try:
            r = evaluate(policy, env, task, loop.eval_episodes, loop.eval_seed, sampler, device)
        finally:
            env.close()
        return r.success_rate
    return fn
