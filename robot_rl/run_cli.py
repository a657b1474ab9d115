"""`robot-rl run ckpt=<ckpt> [hardware_config=sim] [mode=lockstep|realtime] episodes=N`: a policy drives
the cell through the ROS 2 graph (`launch/sim_policy`), episode after episode through the episode
manager's services, and a success table is printed at the end. It wraps the launch file: the nodes run
as separate processes exactly as `robot-rl launch` starts them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from robot_rl.launcher import die_with_parent
from robot_rl.stats import wilson_interval

STALL_S = 60.0  # an episode whose sim clock does not move for this long (wall) is a stalled graph


class RunError(ValueError):
    """One line for the user."""


def _client(domain: int):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from robot_rl.nodes.common import use_fast_transport

    use_fast_transport()
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = rclpy.create_node("robot_rl_run", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    return rclpy, ctx, node, ex


def _cpu_seconds(launch_log: Path) -> dict[str, float]:
    """CPU seconds (user + system) each node process has used so far, from /proc."""
    import re

    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", launch_log.read_text()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = round((int(fields[11]) + int(fields[12])) / tick, 2)
        except (OSError, IndexError, ValueError):
            pass
    return out


def run(cfg: DictConfig, console) -> int:
    from diagnostic_msgs.msg import DiagnosticArray
    from rich.table import Table
    from rosgraph_msgs.msg import Clock
    from std_msgs.msg import String
    from std_srvs.srv import SetBool, Trigger

    from robot_rl.hardware import load_hardware_config
    from robot_rl.nodes.common import qos, stamp_to_sec
    from robot_rl.policies.checkpoint import read_config
    from robot_rl.sim.registry import TASKS, _load

    if not cfg.ckpt:
        raise RunError("robot-rl run needs ckpt=<checkpoint folder>")
    pcfg = read_config(cfg.ckpt)
    hw = load_hardware_config(cfg.hardware_config)
    if not hw.is_sim:
        raise RunError(f"hardware config '{cfg.hardware_config}' is a real cell: start it with `robot-rl launch "
                       f"robot_policy ckpt:={cfg.ckpt} hardware_config:={cfg.hardware_config}` and run episodes with "
                       "/episode/reset, /start, /stop (robot-rl run drives unattended sim episodes only; the operator "
                       "workflow comes with `robot-rl record`)")
    if cfg.mode not in ("lockstep", "realtime"):
        raise RunError(f"mode '{cfg.mode}' is not lockstep or realtime")
    task = pcfg.get("task") or cfg.task.name
    if task not in TASKS:
        raise RunError(f"checkpoint task '{task}' is not a robot_rl MuJoCo task; the ROS graph runs {sorted(TASKS)}")
    max_steps = cfg.task.get("max_steps") or _load(TASKS[task].entry_point).default_max_steps
    dt = 1.0 / hw.rates.policy_hz
    seed = int(cfg.train.eval_seed)
    domain = int(os.environ.get("ROS_DOMAIN_ID", "0"))
    args = [sys.executable, "-m", "robot_rl.cli", "launch", "sim_policy", f"ckpt:={Path(cfg.ckpt).resolve()}",
            f"hardware_config:={hw.source}", f"task:={task}", f"mode:={cfg.mode}", f"seed:={seed}",
            f"sampler:={cfg.sampler or 'auto'}", f"device:={cfg.device}",
            # real time: the next chunk is planned one step early, so it is there before the current one ends
            f"plan_ahead:={1 if cfg.mode == 'realtime' else 0}"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "run_launch.log", "w")
    launch = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=die_with_parent)
    rclpy, ctx, node, ex = _client(domain)
    state: dict = {}
    clock = {"t": 0.0}
    node.create_subscription(String, "episode/state", lambda m: state.update(json.loads(m.data)), qos("latched"))
    node.create_subscription(Clock, "/clock", lambda m: clock.update(t=stamp_to_sec(m.clock)), qos("clock"))
    diagnostics: dict[str, dict[str, str]] = {}  # the newest values per node
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diagnostics.update(
        {st.name.lstrip("/"): {kv.key: kv.value for kv in st.values} for st in m.status}), 10)
    clients = {n: node.create_client(Trigger, f"episode/{n}") for n in ("reset", "start")}
    stop_client = node.create_client(SetBool, "episode/stop")

    def spin_until(pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ex.spin_once(timeout_sec=0.02)
            if pred():
                return
            if launch.poll() is not None:
                log.flush()
                last = ((out / "run_launch.log").read_text().strip().splitlines() or [""])[-1]
                raise RunError(f"the ROS graph stopped while waiting for {what} ({out / 'run_launch.log'}): {last}")
        raise RunError(f"timed out after {timeout:.0f} s waiting for {what}; see {out / 'run_launch.log'}")

    def call(client, request, what: str):
        spin_until(client.service_is_ready, 120, f"service {client.srv_name}")
        fut = client.call_async(request)
        spin_until(fut.done, 60, what)
        if not fut.result().success:
            raise RunError(f"{what}: {fut.result().message}")
        return fut.result()

    results = []
    try:
        for k in range(int(cfg.episodes)):
            call(clients["reset"], Trigger.Request(), f"reset of episode {k}")
            call(clients["start"], Trigger.Request(), f"start of episode {k}")
            spin_until(lambda k=k: state.get("episode") == k and state.get("state") == "running", 30, "running")
            t_start, t0 = time.monotonic(), state["t"]
            t_end = t0 + max_steps * dt
            seen = {"t": clock["t"], "wall": time.monotonic()}

            def over(t_end=t_end, seen=seen) -> bool:
                if clock["t"] != seen["t"]:
                    seen.update(t=clock["t"], wall=time.monotonic())
                elif time.monotonic() - seen["wall"] > STALL_S:
                    raise RunError(f"the sim clock stopped at {clock['t']:.2f} s for {STALL_S:.0f} s (a stalled node?); "
                                   f"see {out / 'run_launch.log'}")
                return bool(state.get("success") or state.get("failed") or clock["t"] >= t_end)

            spin_until(over, max(600.0, 20 * max_steps * dt), f"episode {k}")
            success = bool(state.get("success"))
            call(stop_client, SetBool.Request(data=success), f"stop of episode {k}")
            results.append({"episode": k, "seed": seed + k, "success": success,
                            "sim_s": round(clock["t"] - t0, 2), "wall_s": round(time.monotonic() - t_start, 2)})
            console.print(f"episode {k} (seed {seed + k}): {'success' if success else 'failure'} "
                          f"in {results[-1]['sim_s']} s sim, {results[-1]['wall_s']} s wall")
        t_diag = time.monotonic() + 1.5  # one more round of /diagnostics, with the final counters
        spin_until(lambda: time.monotonic() >= t_diag, 3.0, "final diagnostics")
        cpu = _cpu_seconds(out / "run_launch.log")
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGINT)
            try:
                launch.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(launch.pid, signal.SIGKILL)
        log.close()
    n, s = len(results), sum(r["success"] for r in results)
    lo, hi = wilson_interval(s, n)
    table = Table(title=f"run {cfg.ckpt} on {task} through ROS 2 ({cfg.mode}, seeds {seed}..{seed + n - 1})")
    for c in ("episodes", "success", "95% CI", "mean sim s", "mean wall s"):
        table.add_column(c)
    table.add_row(str(n), f"{100 * s / max(n, 1):.1f}%", f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                  f"{np.mean([r['sim_s'] for r in results]):.2f}", f"{np.mean([r['wall_s'] for r in results]):.2f}")
    console.print(table)
    (out / "run.json").write_text(json.dumps({"task": task, "mode": cfg.mode, "episodes": n, "successes": s,
                                              "ci95": [lo, hi], "per_episode": results, "cpu_s": cpu,
                                              "diagnostics": diagnostics}, indent=2))
    return 0
