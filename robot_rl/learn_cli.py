"""`robot-rl train | distill | eval | finetune`: imitation, distillation, closed-loop evaluation and
RL fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from robot_rl.store import StoreError


class LearnError(StoreError):
    pass


def _loop(cfg: DictConfig, section: DictConfig):
    from robot_rl.learning.train import LoopConfig

    t = cfg.train
    return LoopConfig(steps=int(section.steps), batch_size=int(t.batch_size), lr=float(t.lr), warmup_steps=int(t.warmup_steps),
                      eval_every=int(t.eval_every), eval_episodes=int(t.eval_episodes), eval_seed=int(t.eval_seed),
                      ckpt_every=int(t.ckpt_every), num_workers=int(t.num_workers), seed=int(cfg.seed), device=cfg.device)


def _stores(cfg: DictConfig, positional: str | None) -> list[str]:
    v = positional or cfg.store
    if v is None:
        raise LearnError("training needs demonstrations: store=<store> (record them with robot-rl sim rollout ... record=)")
    return [str(x) for x in v] if isinstance(v, (list, ListConfig)) else [str(v)]


def _ensure_prepared(stores: list[str], console) -> None:
    from robot_rl.store import EpisodeStore
    from robot_rl.store.tools import prepare

    for s in stores:
        st = EpisodeStore(s)
        p = st.attrs.get("prepared")
        if not p or p.get("n_steps") != st.n_steps:
            console.print(f"preparing {s} (policy-resolution images, normalisation statistics)")
            prepare(s)


def env_factory(task_name: str, setup: dict, spec_subset: dict | None = None):
    """A zero-argument env constructor whose observations feed the checkpoint (image sizes from its subset)."""
    from robot_rl.sim import make_env

    setup = dict(setup)
    if spec_subset is not None:
        imgs = [o for o in spec_subset["observations"] if o["name"].startswith("image.")]
        if imgs:
            h, w = imgs[0]["shape"][:2]
            setup.update(obs_mode="image", camera_width=w, camera_height=h,
                         cameras=[o["name"].split(".", 1)[1] for o in imgs])
    return lambda: make_env(task_name, **setup)


def cmd_train(cfg: DictConfig, positional: str | None, console, task_setup) -> int:
    from robot_rl.learning.train import train_diffusion

    if cfg.policy not in ("diffusion", "reward_classifier"):
        raise LearnError(f"robot-rl train trains policy=diffusion or policy=reward_classifier (got policy={cfg.policy}); "
                         "distil a diffusion teacher afterwards with robot-rl distill teacher=<ckpt>")
    stores = _stores(cfg, positional)
    _ensure_prepared(stores, console)
    if cfg.policy == "reward_classifier":
        return _train_reward_classifier(cfg, stores, console)
    name, setup = task_setup(cfg)
    keys = list(cfg.train.obs_keys) if cfg.train.obs_keys else None
    pcfg = OmegaConf.to_container(cfg.net, resolve=True)
    images = bool(cfg.train.images) or bool(keys and any(k.startswith("image.") for k in keys))
    make = None
    if cfg.train.eval_episodes > 0:
        from robot_rl.store import EpisodeStore

        st = EpisodeStore(stores[0])
        from robot_rl.learning.train import default_obs_keys

        used = keys or default_obs_keys(st.spec, images)
        make = env_factory(name, setup, st.spec.policy_subset(used))
    policy, hist = train_diffusion(stores, cfg.train.out, pcfg, _loop(cfg, cfg.train), keys, images, make, name,
                                   progress=cfg.progress, resume=bool(cfg.train.resume))
    ok = f", success {100 * hist.success[-1]:.0f}% (ddim10, {cfg.train.eval_episodes} episodes)" if hist.success else ""
    console.print(f"teacher -> {cfg.train.out} (final loss {hist.loss[-1]:.4f}{ok}); curves: {cfg.train.out}/curves.png")
    return 0


def _train_reward_classifier(cfg: DictConfig, stores: list[str], console) -> int:
    """A success detector from the stores' episode labels (cameras + proprioception by default)."""
    from robot_rl.learning.reward import train_reward_classifier
    from robot_rl.learning.train import default_obs_keys
    from robot_rl.store import EpisodeStore

    spec = EpisodeStore(stores[0]).spec
    keys = list(cfg.train.obs_keys) if cfg.train.obs_keys else default_obs_keys(spec, bool(spec.image_keys))
    _, report = train_reward_classifier(stores, cfg.train.out, keys, steps=int(cfg.train.steps),
                                        batch_size=int(cfg.train.batch_size), lr=float(cfg.train.lr), seed=int(cfg.seed),
                                        device=str(cfg.device), progress=bool(cfg.progress))
    v = report["val"]
    console.print(f"reward classifier -> {cfg.train.out} on {keys}: held-out accuracy {100 * v['accuracy']:.1f}%, "
                  f"precision {100 * v['precision']:.1f}%, recall {100 * v['recall']:.1f}% "
                  f"({v['positives']} positive / {v['negatives']} negative steps)")
    return 0


def cmd_distill(cfg: DictConfig, positional: str | None, console, task_setup) -> int:
    from robot_rl.learning.train import distill
    from robot_rl.policies.checkpoint import read_config

    teacher = cfg.teacher or positional
    if not teacher:
        raise LearnError("robot-rl distill needs teacher=<checkpoint folder> (from robot-rl train)")
    tcfg = read_config(teacher)
    task = tcfg.get("task")
    make = None
    if cfg.train.eval_episodes > 0 and task:
        make = env_factory(task, task_setup_for(task), tcfg["spec_subset"])
    stores = _stores(cfg, None) if cfg.store else None
    _, hist = distill(teacher, cfg.distill.out, _loop(cfg, cfg.distill), stores, float(cfg.distill.dropout),
                      int(cfg.distill.skip), make, task, progress=cfg.progress, resume=bool(cfg.train.resume))
    ok = f", success {100 * hist.success[-1]:.0f}% (cm1)" if hist.success else ""
    console.print(f"student -> {cfg.distill.out} (final loss {hist.loss[-1]:.4f}{ok})")
    return 0


def task_setup_for(task: str) -> dict:
    from robot_rl.cli import compose, task_setup

    return task_setup(compose([f"task={task}"]))[1]


def cmd_eval(cfg: DictConfig, positional: str | None, console, task_setup) -> int:
    from rich.table import Table

    from robot_rl.learning.evaluate import evaluate, resolve_device
    from robot_rl.policies.checkpoint import default_sampler, load_policy
    from robot_rl.spec import check_compatible

    ckpt = cfg.ckpt or positional
    if not ckpt:
        raise LearnError("robot-rl eval needs ckpt=<checkpoint folder>")
    device = resolve_device(cfg.device)
    policy = load_policy(ckpt, device)
    pcfg = policy.checkpoint_config
    name, setup = task_setup(cfg)
    if pcfg.get("task") and pcfg["task"] != name:
        console.print(f"[yellow]note[/]: checkpoint was trained on task '{pcfg['task']}', evaluating on '{name}'")
    seed = int(cfg.train.eval_seed)
    seeds = pcfg.get("train_seeds")
    if seeds and seeds[0] <= seed + cfg.episodes - 1 and seed <= seeds[1]:
        raise LearnError(f"evaluation seeds {seed}..{seed + cfg.episodes - 1} overlap the demonstration seeds "
                         f"{seeds[0]}..{seeds[1]}; set train.eval_seed beyond them")
    make = env_factory(name, setup, pcfg["spec_subset"])
    env = make()
    check_compatible(pcfg["spec_subset"], env.robot_spec, hardware=False)
    default = default_sampler(policy.kind)
    samplers = cfg.sampler if cfg.sampler is not None else default
    samplers = [str(s) for s in samplers] if isinstance(samplers, (list, ListConfig)) else [str(samplers)]
    out = Path(cfg.out)
    results = []
    recorder = None
    if cfg.record:
        from robot_rl.rollout import EpisodeRecorder

        recorder = EpisodeRecorder(cfg.record, env.robot_spec, name, "policy", cfg.data.image_codec or "blosc_zstd")
    try:
        for s in samplers:
            video = out / f"{name.replace('/', '_')}_{s}.gif" if cfg.video else None
            results.append(evaluate(policy, env, name, int(cfg.episodes), seed, s, device, video, progress=cfg.progress,
                                    recorder=recorder))
    finally:
        if recorder is not None:
            recorder.close()
        env.close()
    t = Table(title=f"eval {ckpt} on {name} (seeds {seed}..{seed + cfg.episodes - 1}, paired across samplers)")
    for c in ("sampler", "episodes", "success", "95% CI", "p50 ms/chunk", "p99 ms/chunk", "solutions"):
        t.add_column(c)
    for r in results:
        ci = f"[{100 * r.ci95[0]:.1f}, {100 * r.ci95[1]:.1f}]"
        sol = ", ".join(f"{k} {v}" for k, v in sorted(r.solutions.items()))
        t.add_row(r.sampler, str(r.episodes), f"{100 * r.success_rate:.1f}%", ci, f"{r.latency_p50_ms:.2f}",
                  f"{r.latency_p99_ms:.2f}", sol)
    console.print(t)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return 0


def finetune_config(cfg: DictConfig):
    from robot_rl.learning.finetune import FinetuneConfig

    f = cfg.finetune
    keys = ("reward", "gamma", "extraction", "advantage", "normalize_advantage", "weighting", "beta", "max_weight",
            "q_weight", "batch_size", "critic_lr", "policy_lr", "critic_steps", "policy_steps", "gate_every",
            "gate_threshold", "redistill_steps", "rounds", "episodes_per_round", "max_env_steps", "explore_std",
            "select_n", "utd", "policy_every", "demo_ratio", "warm_start", "eval_episodes", "eval_every",
            "reward_classifier", "operator", "learner_threads")
    try:
        return FinetuneConfig(**{k: f[k] for k in keys}, critic={"q_loss": str(f.q_loss)}, seed=int(cfg.seed),
                              device=str(cfg.device), eval_seed=int(cfg.train.eval_seed),
                              sampler=str(cfg.sampler) if cfg.sampler else None)
    except ValueError as e:
        raise LearnError(f"finetune: {e}") from None


def _check_cell_reward(hw, task: str, setup: dict) -> None:
    """On a robot cell the episodes run unattended only with the cell's own reward, and it must score
    the task the policy learnt (the same point)."""
    import numpy as np

    if hw.is_sim:
        return
    r = hw.reward
    if r.kind == "none":
        raise LearnError(f"finetune actor=ros on the real cell '{hw.source}' needs the cell's own reward for "
                         "unattended episodes: add `reward: {kind: reach, goal: [x, y, z]}` to its hardware config")
    goal = setup.get("goal")
    if goal is None or task != "reach_point" or not np.allclose(np.asarray(list(goal), float), r.goal, atol=1e-6):
        raise LearnError(f"the cell's reward ({r.kind} to {list(r.goal)}) does not score task '{task}'"
                         f"{' to ' + str(list(goal)) if goal is not None else ''}: fine-tune a reach_point policy "
                         "whose task.goal is the cell's reward.goal")


def cmd_finetune(cfg: DictConfig, positional: str | None, console, task_setup) -> int:
    from rich.table import Table

    from robot_rl.hardware import load_hardware_config
    from robot_rl.learning.finetune import finetune_offline, finetune_online
    from robot_rl.policies.checkpoint import read_config

    ckpt = cfg.ckpt or positional
    if not ckpt:
        raise LearnError("robot-rl finetune needs ckpt=<checkpoint folder> (a teacher or a distilled student)")
    mode = cfg.mode or "online"
    if mode not in ("online", "offline"):
        raise LearnError(f"finetune mode '{mode}' is not online or offline")
    if cfg.finetune.actor not in ("sim", "ros"):
        raise LearnError(f"finetune actor '{cfg.finetune.actor}' is not sim or ros")
    pcfg = read_config(ckpt)
    name, setup = task_setup(cfg)
    if pcfg.get("task") and pcfg["task"] != name:  # the task the checkpoint was trained on
        name, setup = pcfg["task"], task_setup_for(pcfg["task"])
    if cfg.finetune.actor == "ros":
        _check_cell_reward(load_hardware_config(cfg.hardware_config), name, setup)
    make = env_factory(name, setup, pcfg["spec_subset"])
    fcfg = finetune_config(cfg)
    stores = _stores(cfg, None) if cfg.store else [str(s) for s in pcfg.get("stores", [])]
    out = Path(cfg.finetune.out)
    if mode == "offline" and not stores:
        raise LearnError("offline fine-tuning needs stores with rewards: store=<store> (or a checkpoint that names them)")
    try:
        if mode == "offline":
            report = finetune_offline(ckpt, stores, out, fcfg, progress=cfg.progress, make_env=make, task=name)
        else:
            actor = None
            if cfg.finetune.actor == "ros":
                from robot_rl.learning.ros_actor import RosActor

                def actor(path, store, sampler, first_round):
                    return RosActor(cfg, name, path, store, fcfg, sampler, first_round, out, console)
            report = finetune_online(ckpt, name, make, stores, out, fcfg, progress=cfg.progress, actor=actor)
    except ValueError as e:  # a policy the chosen update cannot use (ddpg_bc on a teacher, cameras), bad stores
        raise LearnError(str(e)) from None
    if mode == "offline":
        verdict = "kept" if report["kept"] else "rejected (the estimate did not improve by the threshold)"
        console.print(f"offline update {verdict}: E[Q(s0, pi(s0))] {report['ope_before']:.4f} -> {report['ope_best']:.4f}")
    rows = [(k, report["eval"][k]) for k in ("before", "after")] if "eval" in report else \
        [(k, report[k]) for k in ("before", "after") if report.get(k)]
    if rows:
        t = Table(title=f"finetune {mode} on {name}: {fcfg.eval_episodes} paired episodes from seed {fcfg.eval_seed}")
        for c in ("policy", "success", "95% CI"):
            t.add_column(c)
        for label, r in rows:
            t.add_row(label, f"{100 * r['success_rate']:.1f}%", f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]")
        console.print(t)
    console.print(f"report: {out / 'report.json'}; policy: {report.get('policy', '(unchanged)')}"
                  + (f"; curves: {out / 'curves.png'}, TensorBoard: {out / 'tensorboard'}" if mode == "online" else ""))
    return 0


COMMANDS = {"train": cmd_train, "distill": cmd_distill, "eval": cmd_eval, "finetune": cmd_finetune}
