"""Full-resolution image transport: 2 cameras × 640×480 RGB at 30 Hz from `camera_node` (mujoco
backend) to a subscriber's numpy view, while `sim_world` renders and steps physics in real time.
Latency = subscriber receive time − publish time (cameras stamp with the wall clock at publish).
Drops = frames whose CameraInfo (small, published right after each image with the same stamp)
arrived but whose image did not, counted over the measured window. Side by side in one run:

- naive: Fast DDS default profile, normal priority, the subscriber takes `sensor_msgs/Image` objects;
- fast:  robot_rl's path — 64 MB SHM segment profile, SCHED_FIFO for camera and subscriber processes,
         the subscriber views the raw CDR bytes in place (robot_rl.nodes.image_transport);
- fast_no_rt (with --ablation): the fast path at normal priority, to show what the scheduler buys.

    python benchmarks/transport.py [--seconds 60] [--ablation]
"""
# ruff: noqa: I001

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAMERAS = ("front", "wrist")
WARMUP_S = 3.0


def subscribe(mode: str, seconds: float, out: str) -> None:
    """The measuring subscriber (its own process)."""
    from robot_rl.nodes.common import qos, set_realtime_priority, use_fast_transport

    if mode != "naive":
        use_fast_transport()
    if mode == "fast":
        set_realtime_priority(10)
    import rclpy
    from sensor_msgs.msg import CameraInfo, Image

    from robot_rl.nodes.image_transport import decode_image

    rclpy.init()
    node = rclpy.create_node("transport_probe")
    got = {c: [] for c in CAMERAS}  # (receive wall ns, latency ms, stamp ns)
    infos = {c: [] for c in CAMERAS}  # stamp ns of every CameraInfo

    def cb_for(cam: str):
        if mode == "naive":
            def cb(m):
                pixels = np.frombuffer(m.data, np.uint8).reshape(m.height, m.width, 3)
                now, stamp = time.time_ns(), m.header.stamp.sec * 10**9 + m.header.stamp.nanosec
                got[cam].append((now, (now - stamp) / 1e6, stamp, pixels.shape))
        else:
            def cb(raw):
                view = decode_image(raw)
                now = time.time_ns()
                got[cam].append((now, (now - view.stamp_ns) / 1e6, view.stamp_ns, view.pixels.shape))
        return cb

    subs = [node.create_subscription(Image, f"/{c}/image_raw", cb_for(c), qos("image"), raw=(mode != "naive"))
            for c in CAMERAS]
    subs += [node.create_subscription(CameraInfo, f"/{c}/camera_info",
                                      lambda m, c=c: infos[c].append(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec),
                                      qos("state")) for c in CAMERAS]
    Path(out + ".ready").touch()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.1)
    del subs
    result = {c: {"received": len(v), "latency_ms": [x[1] for x in v], "stamp_ns": [x[2] for x in v],
                  "info_ns": infos[c], "shape": list(v[-1][3]) if v else None} for c, v in got.items()}
    Path(out).write_text(json.dumps(result))
    node.destroy_node()
    rclpy.shutdown()


def _node(module: str, params: dict[str, str], env: dict[str, str], log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", f"robot_rl.nodes.{module}", "--ros-args"]
    for k, v in params.items():
        cmd += ["-p", f"{k}:={v}"]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_mode(mode: str, seconds: float, domain: int, work: Path) -> dict:
    cfg = (ROOT / "hardware_configs" / "sim.yaml").read_text()
    profile, rt = ("none", 0) if mode == "naive" else ("shm", 10 if mode == "fast" else 0)
    cfg = re.sub(r"rt_priority: \d+", f"rt_priority: {rt}", cfg)
    cfg = re.sub(r"fastdds_profile: \w+", f"fastdds_profile: {profile}", cfg)
    hw = work / f"{mode}.yaml"
    hw.write_text(cfg)
    env = {k: v for k, v in os.environ.items() if k != "FASTDDS_DEFAULT_PROFILES_FILE"}
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", MUJOCO_GL="egl", PYTHONUNBUFFERED="1")
    out = work / f"{mode}.json"
    total = WARMUP_S + seconds
    log = open(work / f"{mode}.log", "w")
    sub = subprocess.Popen([sys.executable, __file__, "--subscribe", mode, "--seconds", str(total + 8), "--out", str(out)],
                           env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not Path(str(out) + ".ready").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    world = _node("sim_world", {"hardware_config": str(hw)}, env, log)
    cams = [_node("camera_node", {"hardware_config": str(hw), "camera": c, "stamp_source": "wall"}, env, log)
            for c in CAMERAS]
    t_start = time.time_ns()
    time.sleep(total + 3)  # node start-up (~3 s) + warm-up + the measured window
    _stop([world])  # frames stop at the source first, so none is in flight when a camera node exits
    t_cams_stopped = time.time_ns()
    time.sleep(1.0)
    _stop(cams)
    sub.wait(60)
    log.close()
    text = (work / f"{mode}.log").read_text()
    published = {m[0]: int(m[1]) for m in re.findall(r"camera '(\w+)': published (\d+) frames", text)}
    res = json.loads(out.read_text())
    lat, received, dropped, window_frames = [], 0, 0, 0
    for c in CAMERAS:
        r = res[c]
        received += r["received"]
        info = np.array(r["info_ns"], dtype=np.int64)
        if not len(info):
            dropped = None
            continue
        lo, hi = info[0] + WARMUP_S * 1e9, info[-1] - 1e9  # steady state: after warm-up, before shutdown
        in_window = info[(info >= lo) & (info <= hi)]
        seen = set(r["stamp_ns"])
        window_frames += len(in_window)
        if dropped is not None:
            dropped += int(sum(s not in seen for s in in_window))
        lat += [x for x, s in zip(r["latency_ms"], r["stamp_ns"]) if lo <= s <= hi]
    n_pub = sum(published.values())
    lat = np.array(lat)
    wall = (t_cams_stopped - t_start) / 1e9
    return {
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "max_ms": round(float(lat.max()), 2) if len(lat) else None,
        "dropped": dropped, "window_frames": window_frames, "published": n_pub, "received": received,
        "fps_per_camera": round(n_pub / len(CAMERAS) / max(wall - 3.0, 1e-9), 1),
        "shape": res[CAMERAS[0]]["shape"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--subscribe")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.subscribe:
        return subscribe(args.subscribe, args.seconds, args.out)
    domain = 60 + os.getpid() % 30
    figures = {"cameras": len(CAMERAS), "resolution": "640x480", "rate_hz": 30, "seconds": args.seconds}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("naive", "fast", *(("fast_no_rt",) if args.ablation else ())):
            figures[mode] = run_mode(mode, args.seconds, domain, Path(tmp))
            print(mode, json.dumps(figures[mode]), file=sys.stderr, flush=True)
    f = figures["fast"]
    figures["budget_met"] = bool(f["p99_ms"] is not None and f["p99_ms"] <= 3.0 and f["dropped"] == 0)
    emit("transport", figures, "python benchmarks/transport.py" + (" --ablation" if args.ablation else ""))


if __name__ == "__main__":
    main()
