"""Sim throughput per task: env steps/s in state mode, with both cameras at 84x84 and 640x480,
a 2-worker async vector env, and the raw mj_step rate of the same model in the same run.

`<task>.overhead_vs_physics` = (state-mode env step time) / (physics substeps per step x mj_step
time), mj_step timed from snapshots of the same trajectory (same contacts). Target <= 1.5.

    python benchmarks/sim_throughput.py [--steps 150] [--tasks reach,lift]
"""
# ruff: noqa: I001

from __future__ import annotations

import argparse
import copy
import sys
import time

import robot_rl  # noqa: F401  (sets MUJOCO_GL=egl before mujoco loads: keep first)
import mujoco
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402
from robot_rl.sim import TASKS, make_env, make_expert, make_vec_env  # noqa: E402


def drive(env, steps: int, seed: int = 0, snapshots: list | None = None) -> float:
    """env.step() calls per second (expert and reset time excluded); optionally keeps MjData snapshots."""
    expert = make_expert(env)
    obs, _ = env.reset(seed=seed)
    expert.reset(np.random.default_rng(seed))
    every = max(1, steps // 10)
    stepping, ep = 0.0, 0
    for i in range(steps):
        a = expert.act(obs)
        t0 = time.perf_counter()
        obs, r, term, trunc, info = env.step(a)
        stepping += time.perf_counter() - t0
        if snapshots is not None and i % every == 0:
            snapshots.append(copy.copy(env.unwrapped.data))
        if term or trunc:
            ep += 1
            obs, _ = env.reset(seed=seed + ep)
            expert.reset(np.random.default_rng(seed + ep))
    return steps / stepping


def mj_step_seconds(model, snapshots, n: int = 300) -> float:
    total, count = 0.0, 0
    for snap in snapshots:
        d = copy.copy(snap)
        t0 = time.perf_counter()
        for _ in range(n):
            mujoco.mj_step(model, d)
        total += time.perf_counter() - t0
        count += n
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    out: dict[str, float | int] = {}
    for task in args.tasks.split(","):
        env = make_env(task)
        drive(env, 10)  # warm-up: numba cache, first-touch allocations
        snaps: list = []
        state_sps = drive(env, args.steps, snapshots=snaps)
        substeps = int(round(env.dt / env.model.opt.timestep))
        step_s = mj_step_seconds(env.model, snaps)
        out[f"{task}.state_steps_per_s"] = round(state_sps, 1)
        out[f"{task}.mj_step_per_s"] = round(1.0 / step_s, 1)
        out[f"{task}.physics_substeps_per_step"] = substeps
        out[f"{task}.overhead_vs_physics"] = round((1.0 / state_sps) / (substeps * step_s), 3)
        for w, h in ((84, 84), (640, 480)):
            ienv = make_env(task, obs_mode="image", camera_width=w, camera_height=h)
            drive(ienv, 3)
            out[f"{task}.image{w}x{h}_steps_per_s"] = round(drive(ienv, max(10, args.steps // (3 if w < 100 else 8))), 1)
            ienv.close()
        venv = make_vec_env(task, num_envs=2, mode="async")
        venv.reset(seed=[0, 1])
        zeros = np.zeros((2, 7), np.float32)
        venv.step(zeros)
        t0 = time.perf_counter()
        n = max(20, args.steps // 2)
        for _ in range(n):
            venv.step(zeros)
        out[f"{task}.vec2_steps_per_s"] = round(2 * n / (time.perf_counter() - t0), 1)
        venv.close()
        mine = {k.split(".", 1)[1]: v for k, v in out.items() if k.startswith(task + ".")}
        print(task, mine, file=sys.stderr, flush=True)
    out["max_overhead_vs_physics"] = max(v for k, v in out.items() if k.endswith("overhead_vs_physics"))
    emit("sim_throughput", out, "python benchmarks/sim_throughput.py")


if __name__ == "__main__":
    main()
