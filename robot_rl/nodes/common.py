"""What every robot_rl node shares: process set-up (transport profile, real-time priority), the QoS
table, `/diagnostics`, conversions between standard messages and the stack's arrays, and `main`.

Poses are xyz + wxyz arrays in the stack and `geometry_msgs` (xyzw) on the wire: converted here only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from robot_rl.recording import nearest

FASTDDS_PROFILE = str(resources.files("robot_rl.nodes") / "fastdds_shm.xml")


def _argv_param(argv: list[str], name: str) -> str | None:
    """A `-p name:=value` from --ros-args, read before rclpy is initialised."""
    for i, a in enumerate(argv[:-1]):
        if a in ("-p", "--param") and argv[i + 1].startswith(f"{name}:="):
            return argv[i + 1].split(":=", 1)[1]
    return None


def use_fast_transport(profile: str = "shm") -> None:
    """Select the large-segment SHM Fast DDS profile for this process (call before rclpy.init).
    An explicit FASTDDS_DEFAULT_PROFILES_FILE in the environment wins."""
    if profile == "none" or os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        return
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = FASTDDS_PROFILE if profile == "shm" else profile


def set_realtime_priority(priority: int) -> str:
    """SCHED_FIFO for this process and the DDS threads it starts later; '' or why it was not possible."""
    if priority <= 0:
        return "off"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return ""
    except (PermissionError, OSError, AttributeError) as e:
        return f"SCHED_FIFO {priority} not permitted ({e.__class__.__name__}); running at normal priority"


def prepare_process(argv: list[str], realtime: bool = False):
    """Load the hardware config named in argv, pick the transport profile and, for image paths, the
    real-time priority. Returns (config, note about priority)."""
    from robot_rl.hardware import load_hardware_config

    cfg = load_hardware_config(_argv_param(argv, "hardware_config") or "sim")
    use_fast_transport(cfg.transport.fastdds_profile)
    rt_note = set_realtime_priority(cfg.transport.rt_priority) if realtime else "off"
    return cfg, rt_note


# ---- QoS (the topics table in launch/README.md lists which topic uses which) --------------------
def qos(kind: str):
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    table = {
        "image": QoSProfile(depth=2, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE),
        "state": QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE),
        "command": QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE),
        "latched": QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL),
        "clock": QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT),
    }
    return table[kind]


# ---- latched JSON state topics (episode/state, safety/state, …) ----------------------------------------
def json_state(msg) -> dict | None:
    """The JSON object carried by a std_msgs/String state message, or None when it is malformed:
    a bad message on a state topic is ignored, it never takes a node down."""
    try:
        value = json.loads(msg.data)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def is_holding(msg) -> bool:
    """True when a safety/state message says the arm holds its measured pose."""
    return (json_state(msg) or {}).get("state") == "hold"


# ---- conversions ----------------------------------------------------------------------------------
def stamp_to_sec(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def sec_to_stamp(t: float, msg=None):
    from builtin_interfaces.msg import Time

    msg = msg or Time()
    ns = int(round(t * 1e9))
    msg.sec, msg.nanosec = divmod(ns, 1_000_000_000)
    return msg


def pose_to_msg(pose: np.ndarray, msg) -> Any:
    """xyz + wxyz into a geometry_msgs Pose (position/orientation) or Transform (translation/rotation)."""
    p = msg.position if hasattr(msg, "position") else msg.translation
    q = msg.orientation if hasattr(msg, "orientation") else msg.rotation
    p.x, p.y, p.z = (float(v) for v in pose[:3])
    q.w, q.x, q.y, q.z = (float(v) for v in pose[3:7])
    return msg


def msg_to_pose(msg) -> np.ndarray:
    p = msg.position if hasattr(msg, "position") else msg.translation
    q = msg.orientation if hasattr(msg, "orientation") else msg.rotation
    return np.array([p.x, p.y, p.z, q.w, q.x, q.y, q.z], dtype=np.float64)


TARGET_JOINTS = ("ee", "gripper")  # MultiDOFJointTrajectory joints: the tool pose, the gripper (translation.x)


def targets_to_msg(stamp0: float, targets: list[tuple[float, np.ndarray, float | None]], frame: str = "base"):
    """Absolute time-stamped targets [(time, pose, gripper)] as one MultiDOFJointTrajectory."""
    from geometry_msgs.msg import Transform
    from trajectory_msgs.msg import MultiDOFJointTrajectory, MultiDOFJointTrajectoryPoint

    msg = MultiDOFJointTrajectory()
    msg.header.frame_id = frame
    sec_to_stamp(stamp0, msg.header.stamp)
    msg.joint_names = list(TARGET_JOINTS)
    for t, pose, gripper in targets:
        pt = MultiDOFJointTrajectoryPoint()
        g = Transform()
        g.translation.x = float("nan") if gripper is None else float(gripper)  # NaN: leave the gripper as is
        pt.transforms = [pose_to_msg(pose, Transform()), g]
        pt.time_from_start.sec, pt.time_from_start.nanosec = divmod(int(round((t - stamp0) * 1e9)), 1_000_000_000)
        msg.points.append(pt)
    return msg


def msg_to_targets(msg, frame: str = "base") -> list[tuple[float, np.ndarray, float | None]]:
    """Inverse of targets_to_msg. Raises ValueError with one line on a malformed message (joints,
    transforms per point, or a frame other than `frame`). Values are not judged here: that is the
    safety checks' job."""
    if msg.header.frame_id != frame:
        raise ValueError(f"frame '{msg.header.frame_id}', expected '{frame}'")
    names = list(msg.joint_names)
    if not names or names[0] != "ee":
        raise ValueError(f"target trajectory joint_names {names} must start with 'ee' (then optionally 'gripper')")
    g_idx = names.index("gripper") if "gripper" in names else None
    t0 = stamp_to_sec(msg.header.stamp)
    out = []
    for pt in msg.points:
        if len(pt.transforms) != len(names):
            raise ValueError(f"target point has {len(pt.transforms)} transforms for joints {names}")
        g = None if g_idx is None else float(pt.transforms[g_idx].translation.x)
        out.append((t0 + stamp_to_sec(pt.time_from_start), msg_to_pose(pt.transforms[0]),
                    None if g is None or not np.isfinite(g) else g))
    return out


# ---- diagnostics ------------------------------------------------------------------------------------
# ---- observations from the graph ---------------------------------------------------------------
HISTORY = 64  # samples kept per stream


def cell_spec(cfg, task: str | None = None):
    """The robot spec a cell's graph offers: the hardware config's keys, plus in sim the task's
    sim-only object keys; the task's action mask (on a robot cell when a task is named)."""
    import dataclasses

    from robot_rl.sim.registry import TASKS, _load

    spec = cfg.robot_spec()
    if not cfg.is_sim and task not in TASKS:
        return spec
    from robot_rl.spec import ActionSpec, object_key

    cls = _load(TASKS[task or cfg.sim.task].entry_point)
    objects = cls.objects if cfg.is_sim else ()
    return dataclasses.replace(spec, observations=spec.observations + tuple(
        object_key(o, spec.rates.policy_hz) for o in objects), action=ActionSpec(mask=cls.mask)).validate()


class ObservationBuffers:
    """Per-key sample histories fed by the graph's topics (joint_states, arm/ee_pose, ft/wrench,
    sim/object/<name>, <camera>/image_policy or, at full resolution, image_raw), matched to a step
    time by stamp: state within half a 100 Hz period, images within half a frame period (+1 ms);
    a sample that never came is replaced by the nearest within `max_skew` (`at`)."""

    def __init__(self, node, keys, cfg, cond: threading.Condition, full_resolution: bool = False,
                 history: int = HISTORY, image_history: int | None = None, queue_depth: int | None = None,
                 prefix: str = ""):  # a topic prefix: one robot of several ('robot_a/')
        from geometry_msgs.msg import PoseStamped, WrenchStamped
        from sensor_msgs.msg import Image, JointState

        def profile(kind: str):  # the table's profile, with a deeper queue when asked (the recorder)
            out = qos(kind)
            if queue_depth:
                out.depth = max(out.depth, queue_depth)
            return out

        self.cond = cond
        self.bufs: dict[str, deque] = {
            k: deque(maxlen=(image_history or history) if k.startswith("image.") else history) for k in keys}
        self.tol = {k: 0.006 for k in keys}
        self.received = {k: 0 for k in keys}
        node.create_subscription(JointState, f"{prefix}joint_states", self._on_joints, profile("state"))
        node.create_subscription(PoseStamped, f"{prefix}arm/ee_pose", lambda m: self.put(
            "state.ee_pose", m.header.stamp, msg_to_pose(m.pose).astype(np.float32)), profile("state"))
        node.create_subscription(WrenchStamped, f"{prefix}ft/wrench", lambda m: self.put("state.wrench", m.header.stamp, np.array(
            [m.wrench.force.x, m.wrench.force.y, m.wrench.force.z, m.wrench.torque.x, m.wrench.torque.y,
             m.wrench.torque.z], np.float32)), profile("state"))
        for key in keys:
            if key.startswith("state.object."):
                node.create_subscription(PoseStamped, f"{prefix}sim/object/{key.split('.', 2)[2]}", lambda m, k=key: self.put(
                    k, m.header.stamp, msg_to_pose(m.pose).astype(np.float32)), profile("state"))
            elif key.startswith("image."):
                cam = key.split(".", 1)[1]
                self.tol[key] = 0.5 / cfg.camera(cam).rate_hz + 1e-3  # a step exactly between two frames: either
                topic = f"{prefix}{cam}/image_raw" if full_resolution else f"{prefix}{cam}/image_policy"
                node.create_subscription(Image, topic, lambda m, k=key: self.put(
                    k, m.header.stamp, np.frombuffer(m.data, np.uint8).reshape(m.height, m.width, 3).copy()),
                    profile("image"))

    def _on_joints(self, m) -> None:
        pos = np.asarray(m.position, dtype=np.float32)
        self.put("state.joint_pos", m.header.stamp, pos[:7])
        self.put("state.joint_vel", m.header.stamp, np.asarray(m.velocity, dtype=np.float32)[:7])
        self.put("state.gripper", m.header.stamp, pos[7:8])

    def put(self, key: str, stamp, value) -> None:
        if key in self.bufs:
            with self.cond:
                self.bufs[key].append((stamp_to_sec(stamp), value))
                self.received[key] += 1
                self.cond.notify_all()

    def at(self, t: float, max_skew: float = 0.0) -> dict | None:
        """The observation at step time t (call with the condition held), or None while incomplete.
        Per key the sample within its tolerance of t; with `max_skew`, a key whose stream has already
        moved past t (a sample newer than t + tolerance: none nearer can still come, each stream
        arrives in stamp order) takes its nearest sample within `max_skew` instead — a real arm's
        state jitters and drops samples, and waiting for one that never comes stalls the policy."""
        obs = {}
        for k, buf in self.bufs.items():
            hit = nearest(buf, t, self.tol[k])
            if hit is None and max_skew > 0 and buf and buf[-1][0] > t + self.tol[k]:
                hit = nearest(buf, t, max_skew)
            if hit is None:
                return None
            obs[k] = hit[1]
        return obs

    def moved_past(self, t: float) -> bool:
        """Every stream has a sample newer than t + its tolerance: no sample nearer t will come."""
        return all(buf and buf[-1][0] > t + self.tol[k] for k, buf in self.bufs.items())


class TeleopOutput:
    """What a teleop device publishes (teleop_node, the web console): `teleop/twist` (TwistStamped,
    base frame) and `teleop/state` (sensor_msgs/Joy, same stamp: axes [gripper, NaN = unchanged],
    buttons [engaged])."""

    def __init__(self, node):
        from geometry_msgs.msg import TwistStamped
        from sensor_msgs.msg import Joy

        self.node = node
        self.twist_pub = node.create_publisher(TwistStamped, "teleop/twist", qos("command"))
        self.state_pub = node.create_publisher(Joy, "teleop/state", qos("command"))
        self.twist, self.state = TwistStamped(), Joy()
        self.twist.header.frame_id = self.state.header.frame_id = "base"

    def publish(self, twist: np.ndarray, gripper: float | None, engaged: bool) -> None:
        stamp = self.node.get_clock().now().to_msg()
        self.twist.header.stamp = self.state.header.stamp = stamp
        v, w = self.twist.twist.linear, self.twist.twist.angular
        v.x, v.y, v.z, w.x, w.y, w.z = (float(x) for x in twist)
        self.state.axes = [float(gripper) if gripper is not None else float("nan")]
        self.state.buttons = [int(engaged)]
        self.twist_pub.publish(self.twist)
        self.state_pub.publish(self.state)


class RateMeter:
    """Samples per second and age of the last sample, over a sliding window of arrival times."""

    def __init__(self, window: int = 50):
        self.times: deque[float] = deque(maxlen=window)

    def tick(self, now: float | None = None) -> None:
        self.times.append(time.monotonic() if now is None else now)

    def rate(self) -> float:
        if len(self.times) < 2 or self.times[-1] == self.times[0]:
            return 0.0
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def age(self) -> float:
        return float("inf") if not self.times else time.monotonic() - self.times[-1]


class Diagnostics:
    """Publishes one DiagnosticStatus per node on /diagnostics (call `maybe_publish` from any loop)."""

    def __init__(self, node, period: float = 1.0):
        from diagnostic_msgs.msg import DiagnosticArray

        self.node, self.period = node, period
        self.pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.errors: deque[str] = deque(maxlen=5)
        self._last = 0.0
        self._lock = threading.Lock()

    def error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)
        self.node.get_logger().warning(text, throttle_duration_sec=2.0)

    def maybe_publish(self, values: dict[str, Any], level_ok: bool = True) -> None:
        now = time.monotonic()
        if now - self._last < self.period:
            return
        self._last = now
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        with self._lock:
            errors = list(self.errors)
            self.errors.clear()
        st = DiagnosticStatus()
        st.name = self.node.get_fully_qualified_name()
        st.hardware_id = self.node.get_name()
        st.level = DiagnosticStatus.OK if level_ok and not errors else (
            DiagnosticStatus.ERROR if not level_ok else DiagnosticStatus.WARN)
        st.message = errors[-1] if errors else "ok"
        st.values = [KeyValue(key=k, value=f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.node.get_clock().now().to_msg()
        arr.status = [st]
        self.pub.publish(arr)


# ---- lifecycle ------------------------------------------------------------------------------------
class Lifecycle:
    """Managed-node transitions (`rclpy.lifecycle`) from plain functions. `configure` does the heavy
    set-up (a ValueError fails the transition with its message); `activate` / `deactivate` flip
    `active`, which the node's callbacks consult; `deactivate` runs the node's hold last. With
    `autostart` (default) the node configures and activates itself, so a plain launch file needs no
    lifecycle manager; `<node>/change_state` still deactivates and re-activates it at any time."""

    def __init__(self, node, configure=None, on_activate=None, on_deactivate=None):
        from rclpy.lifecycle import ManagedEntity, TransitionCallbackReturn

        self.node, self.active, self.error = node, threading.Event(), ""
        ok, fail = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
        life = self

        class _Entity(ManagedEntity):
            def on_configure(self, _state):
                try:
                    if configure is not None:
                        configure()
                except ValueError as e:
                    life.error = str(e)
                    return fail
                return ok

            def on_activate(self, _state):
                life.active.set()
                if on_activate is not None:
                    on_activate()
                return ok

            def on_deactivate(self, _state):
                life.active.clear()
                if on_deactivate is not None:
                    on_deactivate()
                return ok

        node.add_managed_entity(_Entity())

    def autostart(self) -> None:
        from rclpy.lifecycle import TransitionCallbackReturn

        if self.node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            raise ValueError(self.error or f"{self.node.get_name()}: configure failed")
        self.node.trigger_activate()


# ---- process entry ------------------------------------------------------------------------------------
def sim_link_dir(node, name: str) -> Path:
    """The sim link of this node's cell: `sim.link` if set, else one per namespace (several simulated
    cells under one ROS domain, `launch/sim_fleet`), per ROS domain."""
    from robot_rl.drivers.sim_link import default_link_dir

    return default_link_dir(name or node.get_namespace().strip("/").replace("/", "_"))


def declare(node, params: dict[str, Any]) -> dict[str, Any]:
    """Declare parameters with defaults (from the hardware config); return the effective values. A
    real-valued parameter takes an integer too (`-p batch_wait_ms:=20`); a value of the wrong type is
    one ValueError naming the parameter."""
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.exceptions import InvalidParameterTypeException

    def wrong(k: str, default, given) -> ValueError:
        return ValueError(f"{node.get_name()}: parameter '{k}' must be a {type(default).__name__} (like {default!r}), "
                          f"got {given}")

    out = {}
    for k, v in params.items():
        if isinstance(v, float):
            value = node.declare_parameter(k, v, ParameterDescriptor(dynamic_typing=True)).value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise wrong(k, v, repr(value))
            out[k] = float(value)
            continue
        try:
            out[k] = node.declare_parameter(k, v).value
        except InvalidParameterTypeException as e:
            m = re.search(r"to '(.*)' of type '(\w+)'", str(e))
            raise wrong(k, v, f"'{m.group(1)}' ({m.group(2).lower()})" if m else str(e)) from None
    return out


def run_node(build, argv: list[str] | None = None, realtime: bool = False) -> int:
    """Shared `main`: config and transport, rclpy init, `build(node_args, cfg, rt_note, stop)` returns
    the node and a loop callable (or None to just spin). SIGINT/SIGTERM stop it cleanly; a setup
    error is one line on stderr and exit status 2."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    argv = list(sys.argv if argv is None else argv)
    try:
        cfg, rt_note = prepare_process(argv, realtime)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    rclpy.init(args=argv, signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = None
    try:
        node, loop = build(cfg, rt_note, stop)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        if loop is None:
            while not stop.is_set():
                executor.spin_once(timeout_sec=0.1)
        else:
            spinner = threading.Thread(target=_spin_until, args=(executor, stop), daemon=True)
            spinner.start()
            loop()
            stop.set()
            spinner.join(timeout=2.0)
        return 0
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    finally:
        stop.set()
        close = getattr(node, "close", None)
        if close is not None:
            close()
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


def _spin_until(executor, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            executor.spin_once(timeout_sec=0.1)
        except Exception as e:  # noqa: BLE001 - a callback error is reported, the node keeps running
            print(f"error in callback: {e}", file=sys.stderr)
