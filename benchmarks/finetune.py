"""RL fine-tuning results: a deliberately weak imitation student (few demonstrations, short
training) fine-tuned online in simulation, next to a control that spends the same environment
steps and updates on the same data without any RL signal (uniform weights, no critic term: plain
behaviour cloning on demonstrations + its own rollouts). Both start from the same checkpoint and are
evaluated before and after on the same seeds (disjoint from demonstration and training seeds).
`rl_hil` is the RL arm with the scripted operator in the loop (it takes over when the policy strays
from the expert's path; its steps are flagged and learned from): interventions per episode by round,
and its success next to the RL arm's at (nearly) equal environment steps.
Side by side, the RLPD baseline (robot_rl.learning.sac: Gaussian SAC from scratch, single-step
actions, demonstrations in half of every batch) gets the same keys, demonstrations and environment
steps: its final success and the steps it needed to reach 80 %. Resumable: the start checkpoint and
each chunked arm's run are cached under --out.

    python benchmarks/finetune.py                              # reach, 1 seed (~30 min on 2 cores)
    python benchmarks/finetune.py --tasks lift,peg_insert --seeds 0,1,2 --rounds 40 --episodes 100
    python benchmarks/finetune.py --tasks lift --start-only --name finetune_start   # calibrate the weak start
"""
# ruff: noqa: I001

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import robot_rl  # noqa: F401  (sets MUJOCO_GL=egl before mujoco loads: keep first)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

from robot_rl.cli import compose, task_setup  # noqa: E402
from robot_rl.learn_cli import env_factory  # noqa: E402
from robot_rl.learning.evaluate import evaluate  # noqa: E402
from robot_rl.learning.finetune import FinetuneConfig, finetune_online  # noqa: E402
from robot_rl.learning.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from robot_rl.learning.sac import SACConfig, train_rlpd  # noqa: E402
from robot_rl.learning.train import LoopConfig  # noqa: E402
from robot_rl.policies.checkpoint import load_policy, read_config  # noqa: E402

ARMS = {"rl": {}, "bc_control": {"beta": 0.0, "extraction": "awr"}, "rl_hil": {"operator": "scripted"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="reach")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--demos", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--episodes-per-round", type=int, default=20)
    ap.add_argument("--episodes", type=int, default=50, help="evaluation episodes, before and after")
    ap.add_argument("--set", default="{}", help="FinetuneConfig overrides for the rl arm, as JSON")
    ap.add_argument("--sac-utd", type=int, default=1, help="RLPD baseline: updates per environment step")
    ap.add_argument("--out", default="outputs/bench_finetune")
    ap.add_argument("--start-only", action="store_true",
                    help="build and evaluate the start checkpoint only (calibrating --demos / --train-steps)")
    ap.add_argument("--name", default="finetune", help="the results record's name")
    args = ap.parse_args()
    ARMS["rl"] = json.loads(args.set)
    figures: dict[str, object] = {}
    t_all = time.perf_counter()
    for task in args.tasks.split(","):
        name, setup = task_setup(compose([f"task={task}"]))
        for seed in (int(s) for s in args.seeds.split(",")):
            work = Path(args.out) / name.replace("/", "_") / f"seed{seed}"
            start = PipelineConfig(task=name, setup=setup, demos=args.demos, demo_seed=1000 * seed, evals=(), video=False,
                                   train=LoopConfig(steps=args.train_steps, lr=3e-4, warmup_steps=100, eval_episodes=0,
                                                    ckpt_every=0, seed=seed),
                                   distill=LoopConfig(steps=args.distill_steps, lr=3e-4, warmup_steps=30, eval_episodes=0,
                                                      ckpt_every=0, seed=seed),
                                   progress=False)
            res = run_pipeline(start, work)
            make = env_factory(name, setup, read_config(res["student"])["spec_subset"])
            if args.start_only:  # the start on the evaluation seeds the arms use for "before"
                t0, env = time.perf_counter(), make()
                r = evaluate(load_policy(res["student"]), env, name, args.episodes, FinetuneConfig.eval_seed, "cm1")
                env.close()
                figures[f"{name}.seed{seed}.start"] = {"success": r.success_rate, "ci95": [round(c, 3) for c in r.ci95],
                                                       "eval_min": round((time.perf_counter() - t0) / 60, 1)}
                print(f"{name}.seed{seed}.start", figures[f"{name}.seed{seed}.start"], flush=True)
                continue
            for arm, overrides in ARMS.items():
                t0 = time.perf_counter()
                cfg = FinetuneConfig(rounds=args.rounds, episodes_per_round=args.episodes_per_round,
                                     eval_episodes=args.episodes, seed=seed, **overrides)
                rep = finetune_online(res["student"], name, make, [res["store"]], work / arm, cfg, progress=False)
                key = f"{name}.seed{seed}.{arm}"
                figures[key] = {"before": rep["before"]["success_rate"], "after": rep["after"]["success_rate"],
                                "gain_points": round(100 * (rep["after"]["success_rate"] - rep["before"]["success_rate"]), 1),
                                "env_steps": rep["env_steps"], "wall_min": round((time.perf_counter() - t0) / 60, 1),
                                "exploring_success": rep["history"]["success"],
                                "interventions_per_episode": rep["history"]["interventions"]}
                print(key, figures[key], flush=True)
            # the RLPD baseline: Gaussian SAC from scratch on the same keys, demonstrations and step budget
            budget = max(figures[f"{name}.seed{seed}.{arm}"]["env_steps"] for arm in ARMS)
            keys = list(read_config(res["student"])["policy"]["state_keys"])
            t0 = time.perf_counter()
            sac = train_rlpd(name, make, [res["store"]], keys, SACConfig(
                max_env_steps=budget, eval_every=max(1, budget // args.rounds), eval_episodes=args.episodes,
                utd=args.sac_utd, seed=seed))
            figures[f"{name}.seed{seed}.rlpd_sac"] = {
                "final": sac["final"], "steps_to_80": sac["steps_to_80"], "env_steps": sac["env_steps"],
                "curve": sac["curve"], "wall_min": round((time.perf_counter() - t0) / 60, 1)}
            print(f"{name}.seed{seed}.rlpd_sac", figures[f"{name}.seed{seed}.rlpd_sac"], flush=True)
    figures["wall_min"] = round((time.perf_counter() - t_all) / 60, 1)
    emit(args.name, figures, "python benchmarks/finetune.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
