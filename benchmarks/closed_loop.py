"""Closed loop through ROS 2 vs in process, same checkpoint, same seeds (100000…, disjoint from the
demonstrations): success in process, through the graph in lock-step (must match episode for episode)
and in real time (paced to the wall clock), observation-to-target latency, deadline misses (targets
whose time had passed when their chunk arrived, per 1000 targets), policy inference time, real-time
factor and CPU seconds per node. Default ≥ 20 episodes, about 5 minutes on 2 cores; --full 100.

    python benchmarks/closed_loop.py [--ckpt reports/demo/learn/student] [--episodes 20] [--full]

The default checkpoint is the one-step student `make demo` trains on `reach`.
"""
# ruff: noqa: I001

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 100000
DEFAULT_CKPT = ROOT / "reports" / "demo" / "learn" / "student"  # the student `make demo` trains


def in_process(ckpt: str, episodes: int) -> dict:
    from robot_rl.learning.evaluate import ChunkAgent
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rollout import run_episodes
    from robot_rl.sim.registry import make_env

    policy = load_policy(ckpt)
    task = policy.checkpoint_config.get("task", "reach")
    env = make_env(task)
    t0 = time.perf_counter()
    s = run_episodes(env, ChunkAgent(policy, "cm1"), episodes, SEED, task, "cm1", progress=False)
    env.close()
    return {"success_rate": s.success_rate, "per_episode": [int(x) for x in s.per_episode],
            "wall_s": round(time.perf_counter() - t0, 1)}


def through_ros(ckpt: str, episodes: int, mode: str, work: Path) -> dict:
    out = work / mode
    env = {**os.environ, "ROS_DOMAIN_ID": str(70 + os.getpid() % 25), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "MUJOCO_GL": "egl"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "run", f"ckpt={ckpt}", f"episodes={episodes}",
                        f"mode={mode}", f"out={out}"], env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"robot-rl run ({mode}) failed: {r.stderr.strip()[-500:]}")
    wall = time.perf_counter() - t0
    res = json.loads((out / "run.json").read_text())
    sim_s = sum(e["sim_s"] for e in res["per_episode"])
    ep_wall = sum(e["wall_s"] for e in res["per_episode"])
    diag = res["diagnostics"]
    ex, srv, world = diag.get("action_executor", {}), diag.get("policy_server", {}), diag.get("sim_world", {})
    targets, late = float(ex.get("targets", 0)), float(ex.get("late_targets", 0))
    return {
        "success_rate": res["successes"] / res["episodes"],
        "per_episode": [int(e["success"]) for e in res["per_episode"]],
        "realtime_factor": round(sim_s / max(ep_wall, 1e-9), 3),
        "latency": {"p50_ms": float(ex.get("obs_to_target_p50_ms", "nan")),
                    "p99_ms": float(ex.get("obs_to_target_p99_ms", "nan"))},
        "inference": {"p50_ms": float(srv.get("inference_p50_ms", "nan")), "p99_ms": float(srv.get("inference_p99_ms", "nan"))},
        "deadline_misses_per_1000": round(1000.0 * late / targets, 2) if targets else None,
        "watchdog_holds": int(float(world["watchdog_holds"])) if "watchdog_holds" in world else None,
        "cpu_s_per_node": res["cpu_s"], "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=str(DEFAULT_CKPT))
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--full", action="store_true", help="100 episodes")
    args = ap.parse_args()
    episodes = 100 if args.full else args.episodes
    if not (Path(args.ckpt) / "config.json").exists():
        raise SystemExit(f"no checkpoint at {args.ckpt}: run `make demo` (it trains reports/demo/learn/student) "
                         "or pass --ckpt <folder>")
    t0 = time.perf_counter()
    figures: dict = {"episodes": episodes, "ckpt": os.path.relpath(args.ckpt, ROOT)}
    figures["inproc"] = in_process(args.ckpt, episodes)
    print("inproc", figures["inproc"], file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("lockstep", "realtime"):
            figures[mode] = through_ros(args.ckpt, episodes, mode, Path(tmp))
            print(mode, json.dumps(figures[mode]), file=sys.stderr, flush=True)
    rt, ls, ip = figures["realtime"], figures["lockstep"], figures["inproc"]
    figures["lockstep_matches_inproc"] = ls["per_episode"] == ip["per_episode"]
    figures["realtime_vs_inproc"] = {"only_inproc": sum(a > b for a, b in zip(ip["per_episode"], rt["per_episode"])),
                                     "only_realtime": sum(b > a for a, b in zip(ip["per_episode"], rt["per_episode"]))}
    figures["ros"] = {"success_rate": rt["success_rate"]}  # the real-time run is "the robot"
    figures.update({"realtime_factor": rt["realtime_factor"], "latency": rt["latency"],
                    "deadline_misses_per_1000": rt["deadline_misses_per_1000"]})
    figures["wall_s"] = round(time.perf_counter() - t0, 1)  # the whole benchmark (budget: 300 s at 20 episodes)
    for m in ("lockstep", "realtime", "inproc"):
        figures[m].pop("per_episode")
    cmd = "python benchmarks/closed_loop.py" + (" --full" if args.full else f" --episodes {episodes}")
    if Path(args.ckpt).resolve() != DEFAULT_CKPT.resolve():
        cmd += f" --ckpt {figures['ckpt']}"
    emit("closed_loop", figures, cmd)


if __name__ == "__main__":
    main()
