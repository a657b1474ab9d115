"""`robot-rl record task=<task> teleop=<keyboard|spacemouse|spacenav|joy> episodes=N [record=<store>]
[operator=<name>|scripted]`: demonstrations recorded through the ROS 2 graph (`launch/sim_teleop`:
sim, drivers, teleop node, intervention mux, safety filter, recorder) into a zarr episode store.

The operator is guided episode by episode: `o` resets and starts the next episode, `y` / `n` stop it
as a success / failure, `b` aborts it (not stored). With the keyboard the same terminal drives the
arm (its keys go to the teleop node through a FIFO). `operator=scripted` drives the keyboard path
itself (drivers.teleop.ScriptedOperator following the task's scripted expert): for tests, benchmarks
and a demo without a person.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from robot_rl.operator import KeyPipe, WebJoystick, expert_path, waypoints
from robot_rl.run_cli import Graph, RunError, _cpu_seconds, terminal

OPERATOR_KEYS = "o: reset + start   y: success   n: failure   b: abort (not stored)"
SCRIPTED_TOLERANCE_M = 0.004
GRIPPER_WAIT_S = 1.0  # sim seconds the scripted operator waits for the gripper


def record(cfg: DictConfig, console) -> int:
    from geometry_msgs.msg import PoseStamped
    from rich.table import Table
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header, String
    from std_srvs.srv import SetBool, Trigger

    from robot_rl.drivers.teleop import KEY_HELP, ScriptedOperator
    from robot_rl.hardware import load_hardware_config
    from robot_rl.nodes.common import msg_to_pose, qos, stamp_to_sec
    from robot_rl.sim.registry import TASKS, _load

    hw = load_hardware_config(cfg.hardware_config)
    task, teleop, operator = cfg.task.name, str(cfg.teleop), str(cfg.operator or "")
    scripted = operator == "scripted"
    if not hw.is_sim:
        raise RunError(f"hardware config '{cfg.hardware_config}' is a real cell: record with `robot-rl launch "
                       f"robot_teleop hardware_config:={cfg.hardware_config} store:=<store>` and the episode services "
                       "(robot-rl record drives the simulated cell)")
    if task not in TASKS:
        raise RunError(f"task '{task}' is not a robot_rl MuJoCo task; the ROS graph runs {sorted(TASKS)}")
    if teleop not in ("keyboard", "spacemouse", "spacenav", "joy", "web"):
        raise RunError(f"teleop '{teleop}' must be keyboard, spacemouse, spacenav, joy or web")
    if scripted and teleop not in ("keyboard", "web"):
        raise RunError("operator=scripted drives the keyboard or the web path: use teleop=keyboard or teleop=web")
    if not scripted and not sys.stdin.isatty():
        raise RunError("robot-rl record needs a terminal for the operator's keys (or operator=scripted)")
    max_steps = cfg.task.get("max_steps") or _load(TASKS[task].entry_point).default_max_steps
    dt, seed = 1.0 / hw.rates.policy_hz, int(cfg.seed)
    limit_s = float(cfg.record_seconds or 3 * max_steps * dt)  # a person needs longer than a policy
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(cfg.record or out / f"{task}.zarr").resolve()
    fifo = out.resolve() / "keys.fifo"
    if teleop == "keyboard":
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo)
    args = ["sim_teleop", f"hardware_config:={hw.source}", f"task:={task}", f"seed:={seed}", f"store:={store}",
            f"operator:={operator}", f"teleop:={teleop}", f"teleop_input:={fifo if teleop == 'keyboard' else ''}",
            f"console_host:={cfg.console.host}", f"console_port:={cfg.console.port}",
            f"console_token:={cfg.console.token}"]
    url = f"http://{cfg.console.host}:{cfg.console.port}"
    g = Graph(args, out / "record_launch.log", "robot_rl_record")
    state: dict = {}
    status: dict = {}
    seen = {"pose": None, "t": 0.0}
    g.node.create_subscription(String, "episode/state", lambda m: state.update(json.loads(m.data)), qos("latched"))
    g.node.create_subscription(String, "recorder/status", lambda m: status.update(json.loads(m.data)), qos("latched"))
    g.node.create_subscription(PoseStamped, "arm/ee_pose", lambda m: seen.update(pose=msg_to_pose(m.pose)), qos("state"))
    g.node.create_subscription(Clock, "/clock", lambda m: seen.update(t=stamp_to_sec(m.clock)), qos("clock"))
    # the first episode starts once every camera streams and the mux says who drives
    streams = {f"{c.name}/image_policy": 0 for c in hw.cameras} | {"intervention": 0}
    for topic in streams:
        g.node.create_subscription(Header if topic == "intervention" else Image, topic,
                                   lambda _m, t=topic: streams.__setitem__(t, streams[t] + 1),
                                   qos("state" if topic == "intervention" else "image"))
    results: list[dict] = []
    try:
        keys = KeyPipe(fifo, g.spin_until) if teleop == "keyboard" else None
        g.spin_until(lambda: status.get("streams_ready"), 120, "the recorder receiving every stream "
                     "(recorder/status says which it waits for)")
        g.spin_until(lambda: all(n > 5 for n in streams.values()), 120, f"the streams {sorted(streams)}")
        console.print(f"recording {task} into {store} with the {teleop}" + (" (scripted operator)" if scripted else "")
                      + f"; operator console: {url}/")
        with (contextlib.nullcontext(lambda: b"") if scripted else terminal()) as read_keys:
            if not scripted:
                console.print(f"operator keys: {OPERATOR_KEYS}" + (f"\narm keys: {KEY_HELP}" if keys else ""))
            for k in range(int(cfg.episodes)):
                before = (status["episodes"], status.get("discarded", 0))
                started = ""
                if not scripted:
                    console.print(f"episode {k + 1}/{cfg.episodes}: press o to reset and start (or use the console)")
                    started = _wait_key(g, read_keys, keys, "o", lambda: state.get("state") == "running")
                if scripted or started:
                    g.call(Trigger, "episode/reset", Trigger.Request(), f"reset of episode {k}")
                    g.call(Trigger, "episode/start", Trigger.Request(), f"start of episode {k}")
                ep = g.spin_until(lambda: state.get("state") == "running" and dict(state), 30, f"episode {k} running")
                t_end = float(ep["t"]) + limit_s
                if scripted:
                    device = keys if keys is not None else WebJoystick(url, str(cfg.console.token))
                    label = _drive(g, device, ScriptedOperator(tolerance_m=SCRIPTED_TOLERANCE_M),
                                   waypoints(expert_path(task, seed + ep["episode"])), seen, state, t_end)
                else:  # y / n / b here, or the console's stop buttons
                    key = _wait_key(g, read_keys, keys, "ynb", lambda: state.get("state") == "stopped")
                    label = {"y": "success", "n": "failure", "b": "abort"}.get(key) or state.get("label") or "abort"
                if state.get("state") == "running" and label == "abort":
                    g.call(Trigger, "episode/abort", Trigger.Request(), f"abort of episode {k}")
                elif state.get("state") == "running":
                    g.call(SetBool, "episode/stop", SetBool.Request(data=label == "success"), f"stop of episode {k}")
                g.spin_until(lambda b=before: (status["episodes"], status.get("discarded", 0)) != b and
                             not status.get("recording"), 60, f"the recorder storing episode {k}")
                stored = status["episodes"] > before[0]
                results.append({"episode": k, "seed": seed + ep["episode"], "label": label, "stored": stored,
                                "steps": status.get("steps")})
                console.print(f"episode {k + 1}: {label}, " + (f"stored ({status['steps']} steps in the store)"
                                                               if stored else "not stored"))
        cpu = _cpu_seconds(out / "record_launch.log")
    finally:
        g.close()
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
    table = Table(title=f"record {task} with the {teleop} into {store}")
    for c in ("episodes", "stored", "successes", "steps in the store", "dropped samples"):
        table.add_column(c)
    table.add_row(str(len(results)), str(sum(r["stored"] for r in results)),
                  str(sum(r["label"] == "success" and r["stored"] for r in results)), str(status.get("steps")),
                  str(status.get("dropped")))
    console.print(table)
    (out / "record.json").write_text(json.dumps({"task": task, "store": str(store), "teleop": teleop,
                                                 "operator": operator, "episodes": results, "recorder": status,
                                                 "cpu_s": cpu}, indent=2))
    return 0


def _spin_for(g: Graph, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        g.ex.spin_once(timeout_sec=0.01)


def _wait_key(g: Graph, read_keys, keys: KeyPipe | None, wanted: str, done_elsewhere) -> str:
    """Forward the terminal's keys to the teleop node until one of `wanted` is pressed (returned), or
    `done_elsewhere()` (the operator used the web console instead: '')."""
    while True:
        g.ex.spin_once(timeout_sec=0.02)
        if done_elsewhere():
            return ""
        data = read_keys()
        if keys is not None and data:
            keys.send(data)
        for ch in data.decode("ascii", errors="ignore").lower():
            if ch in wanted:
                return ch


def _drive(g: Graph, device, op, waypoints, seen: dict, state: dict, t_end: float) -> str:
    """The scripted operator on a device (keyboard or web joystick): waypoint after waypoint, toggling
    the gripper where the expert did; 'success' once the task reports it and the path is finished (a
    demonstration ends at its goal, not on the task's success threshold), 'failure' when the
    episode's time is up without success."""
    i = 0
    while True:
        _spin_for(g, 0.05)
        if (state.get("success") and i >= len(waypoints)) or seen["t"] >= t_end or state.get("failed"):
            device.halt()
            return "success" if state.get("success") else "failure"
        if seen["pose"] is None or i >= len(waypoints):
            device.halt()
            continue
        target, grip = waypoints[i]
        err = op.pose_error(target, seen["pose"])  # position and yaw
        if op.reached(err):
            device.halt()
            if grip is not None:  # the gripper closes (opens) in sim time, however slow the host
                device.set_gripper(grip)
                t_grip = seen["t"]
                while seen["t"] < t_grip + GRIPPER_WAIT_S:
                    _spin_for(g, 0.02)
            i += 1
            continue
        device.drive(op, err)


def replay(cfg: DictConfig, positional: str | None, console) -> int:
    """`robot-rl replay <store> episode=K`: the episode's recorded actions on the sim robot, from the
    recorded seed; reports how far the replayed end effector and objects end from the recorded ones."""
    from rich.table import Table

    from robot_rl.rollout import write_video
    from robot_rl.sim import make_env
    from robot_rl.store import EpisodeStore

    if not positional:
        raise RunError("robot-rl replay needs a store: robot-rl replay <store> episode=K")
    st = EpisodeStore(positional)
    k = int(cfg.episode)
    if not 0 <= k < st.n_episodes:
        raise RunError(f"store {positional}: episode {k} out of range (0..{st.n_episodes - 1})")
    meta = st.meta[k]
    if not meta.get("task") or meta.get("seed") is None:
        raise RunError(f"store {positional} episode {k}: no task or seed in its metadata (recorded on a robot?); "
                       "only simulated episodes replay")
    keys = [k_ for k_ in st.keys() if k_ == "state.ee_pose" or k_.startswith("state.object.")]
    ep = st.episode(k, ["action", *keys])
    env = make_env(meta["task"])
    obs, _ = env.reset(seed=int(meta["seed"]))
    frames = [env.render()] if cfg.video else []
    errors = {key: [] for key in keys}
    succeeded = False  # latched, as the episode manager latches it
    for i, action in enumerate(ep["action"]):
        for key in keys:
            errors[key].append(float(np.linalg.norm(obs[key][:3] - ep[key][i][:3])))
        obs, _, _, _, info = env.step(action)
        succeeded = succeeded or bool(info.get("success"))
        if cfg.video:
            frames.append(env.render())
    env.close()
    table = Table(title=f"replay of {positional} episode {k} ({meta['task']}, seed {meta['seed']}, {len(ep['action'])} steps)")
    for c in ("key", "final error (mm)", "max error (mm)"):
        table.add_column(c)
    for key, e in errors.items():
        table.add_row(key, f"{1e3 * e[-1]:.1f}", f"{1e3 * max(e):.1f}")
    console.print(table)
    console.print(f"recorded: {'success' if meta.get('success') else 'failure'}; replayed: "
                  f"{'success' if succeeded else 'failure'}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"store": str(positional), "episode": k, "task": meta["task"], "seed": meta["seed"],
              "recorded_success": meta.get("success"), "replayed_success": succeeded,
              "final_error_m": {key: e[-1] for key, e in errors.items()},
              "max_error_m": {key: max(e) for key, e in errors.items()}}
    if frames:
        result["video"] = str(write_video(frames, out / f"replay_{k}.gif", fps=10))
    (out / f"replay_{k}.json").write_text(json.dumps(result, indent=2))
    return 0
