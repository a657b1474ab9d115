"""Imitation results: scripted demos -> diffusion teacher -> one-step student, evaluated on paired
seeds (disjoint from the demonstration seeds), per task; on the two-solution task also a
deterministic MSE behaviour-cloning baseline on the same data, with the share of episodes that
took each solution. Resumable: each stage is cached under --out and skipped when present.

    python benchmarks/imitation.py                                   # reach_around, multimodality
    # the issue's budgets (teacher ~57 min, distillation ~30 min on 2 cores); also peg_insert, metaworld/push-v3
    python benchmarks/imitation.py --tasks lift --demos 50 --train-steps 12000 --distill-steps 1200 \\
        --episodes 100 --name imitation_lift
    python benchmarks/imitation.py --tasks lift --train-steps 18000 --distill-steps 0 \
        --evals teacher:ddim10 --name imitation_h100                 # the teacher alone (the H100 record)
    # the budgets in minutes: step counts fitted to this host (2-core VMs differ ~2x per step)
    python benchmarks/imitation.py --tasks metaworld/push-v3 --teacher-minutes 57 --distill-minutes 28 \
        --episodes 100 --name imitation_push
"""
# ruff: noqa: I001

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import robot_rl  # noqa: F401  (sets MUJOCO_GL=egl before mujoco loads: keep first)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

from robot_rl.cli import compose, task_setup  # noqa: E402
from robot_rl.learning.evaluate import evaluate  # noqa: E402
from robot_rl.learning.pipeline import PipelineConfig, collect_demos, run_pipeline  # noqa: E402
from robot_rl.learning.train import LoopConfig, distill, train_diffusion  # noqa: E402
from robot_rl.policies.checkpoint import load_policy  # noqa: E402
from robot_rl.policies.diffusion import BCPolicy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="reach_around")
    ap.add_argument("--demos", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--distill-steps", type=int, default=400)
    ap.add_argument("--teacher-minutes", type=float, default=0.0,
                    help="instead of --train-steps: the steps that fit these minutes on this host (timed once)")
    ap.add_argument("--distill-minutes", type=float, default=0.0, help="the same for --distill-steps")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--images", action="store_true")
    ap.add_argument("--evals", default="teacher:ddim10,student:cm1,student:cm3",
                    help="policy:sampler pairs to evaluate (--distill-steps 0: teacher only)")
    ap.add_argument("--name", default="imitation", help="the record's name in benchmarks/results/")
    ap.add_argument("--out", default="outputs/bench_imitation")
    args = ap.parse_args()
    out: dict[str, object] = {}
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        name, setup = task_setup(compose([f"task={task}"]))
        work = Path(args.out) / name.replace("/", "_")
        cfg = PipelineConfig(task=name, setup=setup, demos=args.demos, images=args.images,
                             train=LoopConfig(steps=args.train_steps, lr=3e-4, warmup_steps=200, eval_episodes=0,
                                              ckpt_every=500),
                             distill=LoopConfig(steps=args.distill_steps, lr=3e-4, warmup_steps=50, eval_episodes=0,
                                                ckpt_every=200),
                             eval_episodes=args.episodes, progress=False,
                             evals=tuple(tuple(e.split(":")) for e in args.evals.split(",")))
        if args.teacher_minutes or args.distill_minutes:
            cfg = fit_budget(cfg, work, args.teacher_minutes, args.distill_minutes)
        res = run_pipeline(cfg, work)
        rows = {f"{r['policy']}_{r['sampler']}": r for r in res["rows"]}
        if name == "reach_around":  # the deterministic baseline on the same data and seeds
            bc_dir = work / "bc"
            bc = load_policy(bc_dir) if (bc_dir / "config.json").exists() else train_diffusion(
                [res["store"]], bc_dir, {}, cfg.train, task=name, progress=False, resume=True, cls=BCPolicy)[0]
            from robot_rl.sim import make_env

            env = make_env(name, **setup)
            rows["bc"] = {"policy": "bc", **evaluate(bc, env, name, args.episodes, cfg.eval_seed, "bc").to_dict()}
            env.close()
        for key, r in rows.items():
            out[f"{name}.{key}.success"] = round(r["success_rate"], 3)
            out[f"{name}.{key}.ci95"] = [round(x, 3) for x in r["ci95"]]
            out[f"{name}.{key}.p50_ms"] = round(r["latency_p50_ms"], 2)
            out[f"{name}.{key}.failed"] = round(r["failures"] / r["episodes"], 3)
            for sol, n in r["solutions"].items():
                out[f"{name}.{key}.solution_{sol}"] = round(n / r["episodes"], 3)
        out[f"{name}.paired"] = res["paired"]
        if res["cm1_vs_ddim10"] is not None:
            out[f"{name}.cm1_vs_ddim10"] = round(res["cm1_vs_ddim10"], 4)
        out[f"{name}.budget"] = {"demos": args.demos, "train_steps": cfg.train.steps, "distill_steps": cfg.distill.steps,
                                 "episodes": args.episodes, "images": args.images,
                                 "wall_min": round((time.perf_counter() - t0) / 60, 1),
                                 **stage_minutes(work, cfg.train.steps, cfg.distill.steps)}
        print(name, {k: v for k, v in out.items() if k.startswith(name)}, file=sys.stderr, flush=True)
    steps = (f"--teacher-minutes {args.teacher_minutes:g}" if args.teacher_minutes else f"--train-steps {args.train_steps}") \
        + (f" --distill-minutes {args.distill_minutes:g}" if args.distill_minutes else f" --distill-steps {args.distill_steps}")
    cmd = (f"python benchmarks/imitation.py --tasks {args.tasks} --demos {args.demos} {steps} "
           f"--episodes {args.episodes}" + (" --images" if args.images else "")
           + (f" --evals {args.evals}" if args.evals != ap.get_default("evals") else "")
           + (f" --name {args.name}" if args.name != "imitation" else ""))
    emit(args.name, out, cmd)


PROBE_STEPS = 30


def fit_budget(cfg: PipelineConfig, work: Path, teacher_minutes: float, distill_minutes: float) -> PipelineConfig:
    """`cfg` with the step counts that fit the minute budgets on this host: each stage timed once
    (PROBE_STEPS steps on the task's own demonstrations, the warm-up included) and the counts kept in
    `work/budget.json`, so a resumed run keeps the schedule it started with. A zero budget keeps the steps."""
    path = work / "budget.json"
    if not path.exists():
        store, probe = str(collect_demos(cfg, work)), work / "probe"
        train_diffusion([store], probe / "teacher", cfg.net, replace(cfg.train, steps=PROBE_STEPS, ckpt_every=0),
                        use_images=cfg.images, task=cfg.task, progress=False)
        distill(probe / "teacher", probe / "student", replace(cfg.distill, steps=PROBE_STEPS // 3, ckpt_every=0),
                dropout=cfg.distill_dropout, progress=False)
        per_step = {}
        for stage in ("teacher", "student"):
            hist = json.loads((probe / stage / "history.json").read_text())
            per_step[stage] = hist["train_s"] / hist["timed_steps"]
        shutil.rmtree(probe)
        path.write_text(json.dumps({
            "teacher_s_per_step": round(per_step["teacher"], 3), "distill_s_per_step": round(per_step["student"], 3),
            "train_steps": int(teacher_minutes * 60 / per_step["teacher"]) if teacher_minutes else cfg.train.steps,
            "distill_steps": int(distill_minutes * 60 / per_step["student"]) if distill_minutes else cfg.distill.steps},
            indent=2))
    budget = json.loads(path.read_text())
    print(f"{cfg.task}: budget {budget}", file=sys.stderr, flush=True)
    return replace(cfg, train=replace(cfg.train, steps=budget["train_steps"]),
                   distill=replace(cfg.distill, steps=budget["distill_steps"]))


def stage_minutes(work: Path, train_steps: int, distill_steps: int) -> dict[str, float]:
    """Each stage's training time on this host, summed over resumes (its own clock, not this run's wall time:
    cached stages cost nothing here). A stage resumed from a checkpoint that predates the clock is timed over
    the steps after it and scaled to all its steps."""
    minutes = {}
    for stage, label, steps in (("teacher", "teacher_min", train_steps), ("student", "distill_min", distill_steps)):
        path = work / stage / "history.json"
        hist = json.loads(path.read_text()) if path.exists() else {}
        if hist.get("timed_steps"):
            minutes[label] = round(hist["train_s"] / hist["timed_steps"] * steps / 60, 1)
    return minutes


if __name__ == "__main__":
    main()
