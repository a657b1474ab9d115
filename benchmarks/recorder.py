"""Recording demonstrations through the ROS 2 graph (`robot-rl record`, launch/sim_teleop) at the
default cell's resolution — 2 cameras × 640×480 × 30 Hz, arm state at 100 Hz — with the scripted
operator on the keyboard path, next to the in-process baseline (the scripted expert recorded
straight from MuJoCo into a store at the same resolution, where nothing can arrive late). Reports
late/lost samples per key (the recorder counts every one), steps and frames written per second,
CPU seconds per node, store size, and how closely each recorded episode replays (final
end-effector and object error, success reproduced).

    python benchmarks/recorder.py [--task lift] [--episodes 5]
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

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def store_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)


def through_ros(task: str, episodes: int, work: Path) -> dict:
    from robot_rl.store import EpisodeStore

    store, out = work / "ros.zarr", work / "rec"
    env = {**os.environ, "ROS_DOMAIN_ID": str(70 + os.getpid() % 25), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "MUJOCO_GL": "egl"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "record", f"task={task}", "teleop=keyboard",
                        "operator=scripted", f"episodes={episodes}", f"record={store}", f"out={out}",
                        "console.port=8497"], env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"robot-rl record failed: {r.stderr.strip()[-800:]}")
    wall = time.perf_counter() - t0
    res = json.loads((out / "record.json").read_text())
    st = EpisodeStore(store)
    dropped: dict[str, int] = {}
    for m in st.meta:
        for k, n in m.get("dropped", {}).items():
            dropped[k] = dropped.get(k, 0) + n
    replays = []
    for k in range(st.n_episodes):
        rp = subprocess.run([sys.executable, "-m", "robot_rl.cli", "replay", str(store), f"episode={k}", "video=false",
                             f"out={work / 'replay'}"], env=env, capture_output=True, text=True, cwd=ROOT)
        if rp.returncode != 0:
            raise SystemExit(f"robot-rl replay failed: {rp.stderr.strip()[-500:]}")
        replays.append(json.loads((work / "replay" / f"replay_{k}.json").read_text()))
    objects = [v for r_ in replays for key, v in r_["final_error_m"].items() if key.startswith("state.object.")]
    n_cams = len(st.spec.image_keys)
    return {
        "episodes": st.n_episodes, "successes": sum(bool(m["success"]) for m in st.meta), "steps": st.n_steps,
        "image_frames": st.n_steps * n_cams, "dropped_samples": dropped,
        "dropped_image_frames": sum(n for k, n in dropped.items() if k.startswith("image.")),
        "steps_per_wall_s": round(st.n_steps / wall, 2), "wall_s": round(wall, 1), "store_mb": store_mb(store),
        "cpu_s_per_node": res["cpu_s"],
        "replay": {"ee_final_error_mm_max": round(1e3 * max(r_["final_error_m"]["state.ee_pose"] for r_ in replays), 2),
                   "object_final_error_mm_mean": round(1e3 * float(np.mean(objects)), 2) if objects else None,
                   "object_final_error_mm_max": round(1e3 * max(objects), 2) if objects else None,
                   "success_reproduced": sum(r_["replayed_success"] == r_["recorded_success"] for r_ in replays)},
    }


def in_process(task: str, episodes: int, work: Path) -> dict:
    from robot_rl.hardware import load_hardware_config
    from robot_rl.rollout import EpisodeRecorder, make_policy, run_episodes
    from robot_rl.sim import make_env

    cam = load_hardware_config("sim").cameras[0]
    env = make_env(task, obs_mode="image", camera_width=cam.width, camera_height=cam.height)
    store = work / "inproc.zarr"
    rec = EpisodeRecorder(store, env.robot_spec, task)
    t0 = time.perf_counter()
    s = run_episodes(env, make_policy("scripted", env, 0), episodes, 0, task, "scripted", progress=False, recorder=rec)
    rec.close()
    env.close()
    wall = time.perf_counter() - t0
    return {"episodes": s.episodes, "successes": s.successes, "steps": s.steps,
            "image_frames": s.steps * len(env.robot_spec.image_keys), "dropped_image_frames": 0,
            "steps_per_wall_s": round(s.steps / wall, 2), "wall_s": round(wall, 1), "store_mb": store_mb(store)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="lift")
    ap.add_argument("--episodes", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ros = through_ros(args.task, args.episodes, work)
        base = in_process(args.task, args.episodes, work)
    emit("recorder", {"task": args.task, "cameras": "2 x 640x480 @ 30 Hz", "ros": ros, "inproc": base},
         f"python benchmarks/recorder.py --task {args.task} --episodes {args.episodes}")


if __name__ == "__main__":
    main()
