"""`robot-rl run ckpt=<ckpt> [hardware_config=sim] [mode=lockstep|realtime] episodes=N`: a policy drives
the cell through the ROS 2 graph (`launch/sim_policy`), episode after episode through the episode
manager's services, and a success table is printed at the end. It wraps the launch file: the nodes run
as separate processes exactly as `robot-rl launch` starts them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
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


class Graph:
    """A launch file running as a subprocess (`robot-rl launch ...`, its log in `log`) and a client
    node in this process to watch topics and call services, with deadlines that name what was awaited
    and the graph's last log line when it stopped."""

    def __init__(self, launch_args: list[str], log: Path, name: str = "robot_rl_cli"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        from robot_rl.nodes.common import use_fast_transport

        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "robot_rl.cli", "launch", *launch_args], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        use_fast_transport()
        self.rclpy, self.ctx = rclpy, rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=int(os.environ.get("ROS_DOMAIN_ID", "0")))
        self.node = rclpy.create_node(name, context=self.ctx)
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)
        self._clients: dict = {}

    def spin_until(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ex.spin_once(timeout_sec=0.02)
            if (out := pred()):
                return out
            if self.proc.poll() is not None:
                self._log.flush()
                last = (self.log_path.read_text().strip().splitlines() or [""])[-1]
                raise RunError(f"the ROS graph stopped while waiting for {what} ({self.log_path}): {last}")
        raise RunError(f"timed out after {timeout:.0f} s waiting for {what}; see {self.log_path}")

    def call(self, srv_type, name: str, request, what: str, timeout: float = 60):
        if name not in self._clients:
            self._clients[name] = self.node.create_client(srv_type, name)
        client = self._clients[name]
        self.spin_until(client.service_is_ready, 120, f"service {name}")
        fut = client.call_async(request)
        self.spin_until(fut.done, timeout, what)
        if not fut.result().success:
            raise RunError(f"{what}: {fut.result().message}")
        return fut.result()

    def close(self) -> None:
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.ctx)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


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


@contextlib.contextmanager
def terminal():
    """The terminal in cbreak mode (keys one by one, not echoed); restored on the way out."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield lambda: os.read(fd, 64) if select.select([fd], [], [], 0)[0] else b""
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


class HilSession:
    """`robot-rl run hil=true`: the policy drives through `launch/sim_hil` (real time) and a person
    beside it takes over when needed — on the keyboard in this terminal, the web console, or another
    teleop device — or, with `operator=scripted`, robot_rl.operator.HilOperator does. Every episode
    is recorded with its intervention flags; the summary counts takeovers and the intervention rate."""

    def __init__(self, cfg: DictConfig, out: Path):
        self.cfg, self.teleop = cfg, str(cfg.teleop)
        self.scripted = cfg.operator == "scripted"
        if self.teleop not in ("keyboard", "spacemouse", "spacenav", "joy", "web"):
            raise RunError(f"teleop '{self.teleop}' must be keyboard, spacemouse, spacenav, joy or web")
        if self.scripted and self.teleop not in ("keyboard", "web"):
            raise RunError("operator=scripted drives the keyboard or the web path: use teleop=keyboard or teleop=web")
        if self.teleop == "keyboard" and not self.scripted and not sys.stdin.isatty():
            raise RunError("hil=true with the keyboard needs a terminal (or teleop=web, or operator=scripted)")
        self.store = Path(cfg.record or out / "hil.zarr").resolve()
        self.fifo = out.resolve() / "keys.fifo"
        self.url = f"http://{cfg.console.host}:{cfg.console.port}"
        self.pose, self.status, self.operator, self.last_tick = None, {}, None, 0.0
        self.stack = contextlib.ExitStack()
        self.read_keys = lambda: b""

    def launch_args(self) -> list[str]:
        if self.teleop == "keyboard":
            with contextlib.suppress(FileNotFoundError):
                self.fifo.unlink()
            os.mkfifo(self.fifo)
        c = self.cfg.console
        return [f"store:={self.store}", f"operator:={self.cfg.operator or ''}", f"teleop:={self.teleop}",
                f"teleop_input:={self.fifo if self.teleop == 'keyboard' else ''}", f"console_host:={c.host}",
                f"console_port:={c.port}", f"console_token:={c.token}"]

    def attach(self, g: Graph, console) -> None:
        from geometry_msgs.msg import PoseStamped
        from std_msgs.msg import String

        from robot_rl.nodes.common import msg_to_pose, qos
        from robot_rl.operator import KeyPipe, WebJoystick

        g.node.create_subscription(PoseStamped, "arm/ee_pose", lambda m: setattr(self, "pose", msg_to_pose(m.pose)),
                                   qos("state"))
        g.node.create_subscription(String, "recorder/status", lambda m: self.status.update(json.loads(m.data)),
                                   qos("latched"))
        self.device = KeyPipe(self.fifo, g.spin_until) if self.teleop == "keyboard" else (
            WebJoystick(self.url, str(self.cfg.console.token)) if self.teleop == "web" else None)
        g.spin_until(lambda: self.status.get("streams_ready"), 120, "the recorder receiving every stream")
        if self.teleop == "keyboard" and not self.scripted:
            from robot_rl.drivers.teleop import KEY_HELP

            self.read_keys = self.stack.enter_context(terminal())
            console.print(f"take over with t, hand back with t; {KEY_HELP}")
        console.print(f"operator console: {self.url}/ ; episodes are recorded into {self.store}")

    def start_episode(self, task: str, seed: int, t0: float, dt: float) -> None:
        if self.scripted:
            from robot_rl.drivers.teleop import ScriptedOperator
            from robot_rl.operator import HilOperator, expert_path

            self.operator = HilOperator(self.device, ScriptedOperator(), expert_path(task, seed), t0, dt)

    def tick(self, t: float) -> None:
        """Called while an episode runs: forward the terminal's keys, or let the scripted operator act."""
        if (data := self.read_keys()) and self.device is not None:
            self.device.send(data)
        if self.operator is not None and self.pose is not None and time.monotonic() - self.last_tick >= 0.05:
            self.last_tick = time.monotonic()
            self.operator.tick(t, self.pose[:3])

    def end_episode(self, g: Graph, k: int, before: int) -> None:
        if self.operator is not None and self.operator.engaged:
            self.operator.device.takeover()  # hand back: the episode ends with the policy in control
        self.operator = None
        g.spin_until(lambda: self.status.get("episodes", 0) + self.status.get("discarded", 0) > before
                     and not self.status.get("recording"), 60, f"the recorder storing episode {k}")

    def summary(self, n: int) -> dict:
        from robot_rl.store import EpisodeStore
        from robot_rl.store.sampler import intervention_segments

        st = EpisodeStore(self.store)
        eps = range(max(0, st.n_episodes - n), st.n_episodes)
        flags = [np.asarray(st.episode(e, ["intervention"])["intervention"], bool) for e in eps]
        return {"store": str(self.store), "takeovers_per_episode": [len(intervention_segments(f)) for f in flags],
                "intervention_rate": float(np.mean(np.concatenate(flags))) if flags else 0.0}

    def close(self) -> None:
        self.stack.close()
        with contextlib.suppress(FileNotFoundError):
            self.fifo.unlink()


class EpisodeRunner:
    """Episodes through the graph's episode manager, one after another: reset, start, run until
    success, failure or the task's step budget, stop; with `hil`, the person (or scripted operator)
    beside it acts and each episode is stored before the next. In sim, time is the sim's `/clock` and
    episode k has seed `seed + k` (the sim's launch seed). On a robot cell (`home`: its home joint
    positions) time is the wall clock, the reward is the cell's own (hardware config `reward`), and
    each episode starts once the reset has brought the arm home and it is still."""

    def __init__(self, g: Graph, task: str, max_steps: int, dt: float, seed: int, hil: HilSession | None = None,
                 home: tuple[float, ...] | None = None):
        from diagnostic_msgs.msg import DiagnosticArray
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String

        from robot_rl.nodes.common import qos, stamp_to_sec

        self.g, self.task, self.max_steps, self.dt, self.seed, self.hil = g, task, max_steps, dt, seed, hil
        self.home = None if home is None else np.asarray(home, dtype=np.float64)
        self.state: dict = {}
        self.clock = {"t": 0.0}
        self.joints: JointState | None = None
        self.arm: dict | None = None  # /arm/status of a robot cell
        self.diagnostics: dict[str, dict[str, str]] = {}  # the newest values per node
        self.results: list[dict] = []
        g.node.create_subscription(String, "episode/state", lambda m: self.state.update(json.loads(m.data)),
                                   qos("latched"))
        if self.home is None:
            g.node.create_subscription(Clock, "/clock", lambda m: self.clock.update(t=stamp_to_sec(m.clock)),
                                       qos("clock"))
        else:
            g.node.create_subscription(JointState, "joint_states", lambda m: setattr(self, "joints", m), qos("state"))
            g.node.create_subscription(String, "arm/status", lambda m: setattr(self, "arm", json.loads(m.data)),
                                       qos("latched"))
        g.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: self.diagnostics.update(
            {st.name.lstrip("/"): {kv.key: kv.value for kv in st.values} for st in m.status}), 10)

    def episode(self) -> dict:
        from std_srvs.srv import SetBool, Trigger

        g, state, clock, hil, k = self.g, self.state, self.clock, self.hil, len(self.results)
        before = hil.status.get("episodes", 0) + hil.status.get("discarded", 0) if hil else 0
        if self.home is None:
            g.call(Trigger, "episode/reset", Trigger.Request(), f"reset of episode {k}")
        else:
            self._reset_home(k)
        g.call(Trigger, "episode/start", Trigger.Request(), f"start of episode {k}")
        # the manager counts its resets: a robot's home move asked again makes its number run ahead of k
        g.spin_until(lambda: state.get("episode", -1) >= k and state.get("state") == "running", 30, "running")
        if self.home is not None:
            clock["t"] = time.time()  # a robot's stamps are on the wall clock
        t_start, t0 = time.monotonic(), state["t"]
        t_end = t0 + self.max_steps * self.dt
        seen = {"t": clock["t"], "wall": time.monotonic()}
        if hil:
            hil.start_episode(self.task, self.seed + k, t0, self.dt)

        def over() -> bool:
            if self.home is not None:
                clock["t"] = time.time()
            if hil:
                hil.tick(clock["t"])
            if clock["t"] != seen["t"]:
                seen.update(t=clock["t"], wall=time.monotonic())
            elif time.monotonic() - seen["wall"] > STALL_S:
                server = self.diagnostics.get("policy_server", {})
                waits = ", ".join(f"{k} {v}" for k, v in server.items() if k.startswith(("waiting_for", "newest.")))
                raise RunError(f"the sim clock stopped at {clock['t']:.2f} s for {STALL_S:.0f} s (a stalled node?"
                               f"{'; the policy server waits: ' + waits if waits else ''}); see {g.log_path}")
            return bool(state.get("success") or state.get("failed") or clock["t"] >= t_end)

        g.spin_until(over, max(600.0, 20 * self.max_steps * self.dt), f"episode {k}")
        success = bool(state.get("success"))
        g.call(SetBool, "episode/stop", SetBool.Request(data=success), f"stop of episode {k}")
        if hil:
            hil.end_episode(g, k, before)
        self.results.append({"episode": k, "seed": self.seed + k, "success": success,
                             "sim_s": round(clock["t"] - t0, 2), "wall_s": round(time.monotonic() - t_start, 2)})
        return self.results[-1]

    def _reset_home(self, k: int, attempts: int = 3) -> None:
        """The reset of a robot cell: the arm's home move must have *ended* (its `homed` count grew)
        with the joints at home — joints passing near home mid-move, or an arm that was already there
        when the reset came, start no episode while the move still owns the arm. A home move cut
        short (a hold from the safety filter wins over it) is asked for again."""
        from std_srvs.srv import Trigger

        g = self.g
        g.spin_until(lambda: self.arm is not None, 30, "the arm's /arm/status")
        homed = self.arm["homed"]
        for attempt in range(1, attempts + 1):
            self._arm_ok(k)
            g.call(Trigger, "episode/reset", Trigger.Request(), f"reset of episode {k}")
            try:
                g.spin_until(lambda: (self.arm["homed"] > homed and self._at_home()) or self.arm.get("error"), 60,
                             f"the arm's home move to end at its home pose (the reset of episode {k})")
                self._arm_ok(k)
                return
            except RunError:
                if attempt == attempts or self.arm.get("homing"):
                    raise

    def _arm_ok(self, k: int) -> None:
        """An arm in error (a reflex, a lost connection) stops the run: recovering is the cell operator's call."""
        if err := (self.arm or {}).get("error"):
            raise RunError(f"the arm reports an error before episode {k}: {err} — check the cell, then call "
                           f"/arm/recover and run again; see {self.g.log_path}")

    def _at_home(self) -> bool:
        """The measured joints within 0.01 rad of home and still (the reset's move has ended)."""
        j = self.joints
        if j is None or len(j.position) < 7 or len(j.velocity) < 7:
            return False
        q, dq = np.asarray(j.position[:7]), np.asarray(j.velocity[:7])
        return bool(np.max(np.abs(q - self.home)) < 0.01 and np.max(np.abs(dq)) < 0.02)


def _wait_for_the_policy(g: Graph) -> None:
    """Episodes start once the policy server has warmed up and is active (a loaded host can take
    longer than the other nodes: episode 0 would run without a policy, a human's alone)."""
    from std_msgs.msg import String

    from robot_rl.nodes.common import qos

    info: dict = {}
    g.node.create_subscription(String, "policy/info", lambda m: info.update(json.loads(m.data)), qos("latched"))
    g.spin_until(lambda: info.get("active"), 180, "the policy server to warm up and report itself active (policy/info)")


def run(cfg: DictConfig, console) -> int:
    from rich.table import Table

    from robot_rl.hardware import load_hardware_config
    from robot_rl.policies.checkpoint import read_config
    from robot_rl.sim.registry import TASKS, _load

    if not cfg.ckpt:
        raise RunError("robot-rl run needs ckpt=<checkpoint folder>")
    pcfg = read_config(cfg.ckpt)
    hw = load_hardware_config(cfg.hardware_config)
    if not hw.is_sim:
        raise RunError(f"hardware config '{cfg.hardware_config}' is a real cell: start it with `robot-rl launch "
                       f"robot_policy ckpt:={cfg.ckpt} hardware_config:={cfg.hardware_config}` and run episodes with "
                       "/episode/reset, /start, /stop, or the web console (robot-rl run drives sim episodes)")
    if (cfg.mode or "lockstep") not in ("lockstep", "realtime"):
        raise RunError(f"mode '{cfg.mode}' is not lockstep or realtime")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    hil = HilSession(cfg, out) if cfg.hil else None
    mode = "realtime" if hil else cfg.mode or "lockstep"  # a person drives at the wall clock's pace
    task = pcfg.get("task") or cfg.task.name
    if task not in TASKS:
        raise RunError(f"checkpoint task '{task}' is not a robot_rl MuJoCo task; the ROS graph runs {sorted(TASKS)}")
    max_steps = cfg.task.get("max_steps") or _load(TASKS[task].entry_point).default_max_steps
    dt = 1.0 / hw.rates.policy_hz
    seed = int(cfg.train.eval_seed)
    args = ["sim_hil" if hil else "sim_policy", f"ckpt:={Path(cfg.ckpt).resolve()}",
            f"hardware_config:={hw.source}", f"task:={task}", f"mode:={mode}", f"seed:={seed}",
            f"sampler:={cfg.sampler or 'auto'}", f"device:={cfg.device}"]
    if hil:
        args += hil.launch_args()  # sim_hil plans one step ahead itself
    else:  # real time: the next chunk is planned one step early, so it is there before the current one ends
        args.append(f"plan_ahead:={cfg.plan_ahead if cfg.get('plan_ahead') is not None else int(mode == 'realtime')}")
    if cfg.get("ensemble_decay") is not None:
        args.append(f"ensemble_decay:={float(cfg.ensemble_decay)}")
    args += [f"precision:={cfg.precision}", f"compile:={cfg.compile or ''}"]
    g = Graph(args, out / "run_launch.log", "robot_rl_run")
    runner = EpisodeRunner(g, task, max_steps, dt, seed, hil)
    results = runner.results
    try:
        _wait_for_the_policy(g)
        if hil:
            hil.attach(g, console)
        for _ in range(int(cfg.episodes)):
            r = runner.episode()
            console.print(f"episode {r['episode']} (seed {r['seed']}): {'success' if r['success'] else 'failure'} "
                          f"in {r['sim_s']} s sim, {r['wall_s']} s wall")
        t_diag = time.monotonic() + 1.5  # one more round of /diagnostics, with the final counters
        g.spin_until(lambda: time.monotonic() >= t_diag, 3.0, "final diagnostics")
        cpu = _cpu_seconds(out / "run_launch.log")
    finally:
        (out / "run_diagnostics.json").write_text(json.dumps(runner.diagnostics, indent=2))  # what each node said last
        g.close()
        if hil:
            hil.close()
    n, s = len(results), sum(r["success"] for r in results)
    lo, hi = wilson_interval(s, n)
    human = hil.summary(n) if hil else None
    table = Table(title=f"run {cfg.ckpt} on {task} through ROS 2 ({mode}{', human in the loop' if hil else ''}, "
                        f"seeds {seed}..{seed + n - 1})")
    cols = ["episodes", "success", "95% CI", "mean sim s", "mean wall s"]
    row = [str(n), f"{100 * s / max(n, 1):.1f}%", f"[{100 * lo:.1f}, {100 * hi:.1f}]",
           f"{np.mean([r['sim_s'] for r in results]):.2f}", f"{np.mean([r['wall_s'] for r in results]):.2f}"]
    if human:
        cols += ["takeovers / episode", "intervention rate"]
        row += [f"{np.mean(human['takeovers_per_episode']):.2f}", f"{100 * human['intervention_rate']:.1f}%"]
    for c in cols:
        table.add_column(c)
    table.add_row(*row)
    console.print(table)
    (out / "run.json").write_text(json.dumps({"task": task, "mode": mode, "episodes": n, "successes": s,
                                              "ci95": [lo, hi], "per_episode": results, "cpu_s": cpu,
                                              "human": human, "diagnostics": runner.diagnostics}, indent=2))
    return 0
