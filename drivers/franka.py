"""Franka arm backend over FCI (pylibfranka). A dedicated control process runs libfranka's 1 kHz
torque loop — Cartesian impedance around a reference that follows the absolute, time-stamped target
stream (drivers/targets.py), reference limiting, torque-rate limiting and the command watchdog — so no
1 kHz loop shares a GIL with ROS callbacks. `arm_node` talks to it through two pipes (JSON bytes): targets
and requests in, states and events out (never blocking the loop: `_Outbox`).

Errors (reflexes, lost connection) stop the loop, are reported in the state (`error`) and cleared by
`recover()` (libfranka's automatic error recovery, then the loop restarts holding the measured pose).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import select
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from robot_rl.drivers.arm import ArmState
from robot_rl.drivers.safety import SafetyLimits
from robot_rl.drivers.targets import TargetQueue
from scipy.spatial.transform import Rotation

from robot_rl.geometry import mat_to_quat, quat_conj, quat_log, quat_mul

# franka::limitRate for torques allows (kMaxTorqueRate - kLimitEps) = 999.999 Nm/s over one 1 ms cycle, judged
# from the torque the robot reports as last commanded (state.tau_J_d). We keep to 45 % of it: when a host misses a
# cycle the reported torque is one command behind, and two full steps in one cycle abort the motion
# (controller_torque_discontinuity at 2000 Nm/s, seen against franka-sim on a loaded 2-core machine).
TORQUE_STEP = 0.45 * 1000.0 * 1e-3
# the joints' torque range (Nm; the robot stops with tau_J_range_violation past it), commanded within 95 % of it
TORQUE_MAX = 0.95 * np.array([87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0])


@dataclass(frozen=True)
class FrankaSettings:
    address: str
    translational_stiffness: float = 1000.0
    rotational_stiffness: float = 60.0
    damping_ratio: float = 1.0
    nullspace_stiffness: float = 10.0
    max_pos_error: float = 0.01
    max_rot_error: float = 0.05
    home_qpos: tuple[float, ...] = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)
    home_duration: float = 4.0
    ee_transform: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)  # NE_T_EE: xyz + quaternion wxyz
    target_period: float = 0.1
    realtime: bool = False  # RealtimeConfig.kEnforce needs a PREEMPT_RT kernel; kIgnore otherwise
    rt_priority: int = 0  # SCHED_FIFO priority of the control process (0: normal scheduling)
    state_period: float = 0.01  # s between two states to the node (hardware config arm.state_hz)


def _pose(o_t_ee) -> np.ndarray:
    m = np.asarray(o_t_ee).reshape(4, 4).T  # column-major
    return np.concatenate([m[:3, 3], mat_to_quat(m[:3, :3])])


class _Controller:
    """The control law and the target stream, inside the control process."""

    def __init__(self, s: FrankaSettings, limits: SafetyLimits):
        self.s = s
        kt, kr = s.translational_stiffness, s.rotational_stiffness
        self.K = np.diag([kt] * 3 + [kr] * 3)
        self.D = 2.0 * s.damping_ratio * np.sqrt(self.K)
        self.targets = TargetQueue(limits, s.target_period)
        self.ref: np.ndarray | None = None
        self.home_from: np.ndarray | None = None
        self.home_t0 = 0.0
        self.homed = 0  # homing moves completed (the node waits for this count to grow after /arm/home)

    def hold(self, pose: np.ndarray) -> None:
        self.targets.clear()
        self.ref = pose.copy()
        self.home_from = None

    def torque(self, state, model, now: float, dt: float) -> np.ndarray:
        pose = _pose(state.O_T_EE)
        q, dq = np.asarray(state.q), np.asarray(state.dq)
        coriolis = np.asarray(model.coriolis(state))
        if self.ref is None:
            self.hold(pose)
        if self.home_from is not None:  # joint-space minimum-jerk move to home_qpos
            a = min(1.0, (now - self.home_t0) / self.s.home_duration)
            blend = 10 * a**3 - 15 * a**4 + 6 * a**5
            q_ref = self.home_from + blend * (np.asarray(self.s.home_qpos) - self.home_from)
            tau = 300.0 * (q_ref - q) - 2.0 * np.sqrt(300.0) * dq + coriolis
            # ended: still at home, or one second past the move (a jittery host never reads the joints still)
            if a >= 1.0 and (np.linalg.norm(dq) < 0.01 or now - self.home_t0 > self.s.home_duration + 1.0):
                self.hold(pose)
                self.homed += 1
        else:
            if self.targets.stale(now):
                self.hold(pose)
            self.ref, _, _ = self.targets.reference(now, dt, self.ref)
            j = np.asarray(model.zero_jacobian(state)).reshape(7, 6).T
            e = np.zeros(6)
            e[:3] = self.ref[:3] - pose[:3]
            e[3:] = quat_log(quat_mul(self.ref[3:], quat_conj(pose[3:])))
            # reference limiting: the spring never pulls from further than a few mm / hundredths of a rad
            if (n := np.linalg.norm(e[:3])) > self.s.max_pos_error:
                e[:3] *= self.s.max_pos_error / n
            if (n := np.linalg.norm(e[3:])) > self.s.max_rot_error:
                e[3:] *= self.s.max_rot_error / n
            tau = j.T @ (self.K @ e - self.D @ (j @ dq)) + coriolis
            # I - J^T (J J^T)^-1 J (= I - J^T pinv(J)^T at full rank, lightly damped at a singularity): a 6x6
            # solve, a third of an SVD-based pinv's time in the 1 kHz loop
            null = np.eye(7) - j.T @ np.linalg.solve(j @ j.T + 1e-6 * np.eye(6), j)
            k_ns = self.s.nullspace_stiffness
            tau += null @ (k_ns * (np.asarray(self.s.home_qpos) - q) - 2.0 * np.sqrt(k_ns) * dq)
        # against the robot's own reference, not this loop's previous output: after a command lost on the
        # way (a busy host) the two differ, and a step from ours would be a discontinuity from the robot's
        last = np.asarray(state.tau_J_d)
        return np.clip(last + np.clip(tau - last, -TORQUE_STEP, TORQUE_STEP), -TORQUE_MAX, TORQUE_MAX)


class _Outbox:
    """The control process's messages to the node, written without ever blocking the 1 kHz loop: a node
    that falls behind (a busy host) fills the pipe, and a blocking write stalled the loop 20 cycles into a
    communication reflex (franka-sim, loaded 2-core host). Not a sender thread either: it must win the GIL
    from the loop, and the node's state stream thinned (gaps of 16-150 ms where 10 were due). Each message
    is one multiprocessing.Connection frame (4-byte big-endian length, then the bytes) of at most PIPE_BUF
    bytes, which a non-blocking pipe writes whole or not at all. States coalesce (the newest replaces one
    not yet written: the node wants the present); events (refusals, a fatal error) all go, in order;
    `flush()`, called every cycle, retries what the pipe had no room for."""

    def __init__(self, conn):
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.state: bytes | None = None
        self.events: deque[bytes] = deque()

    @staticmethod
    def _frame(msg: dict) -> bytes:
        data = json.dumps(msg).encode()
        if len(data) + 4 > select.PIPE_BUF:
            raise ValueError(f"franka: a {len(data)}-byte message to the node exceeds PIPE_BUF")
        return struct.pack("!i", len(data)) + data

    def put_state(self, msg: dict) -> None:
        self.state = self._frame(msg)
        self.flush()

    def put_event(self, msg: dict) -> None:
        for key in ("reason", "error"):  # (a long exception text must still fit one frame)
            if isinstance(msg.get(key), str):
                msg[key] = msg[key][:1000]
        self.events.append(self._frame(msg))
        self.flush()

    def flush(self) -> bool:
        """Write what is pending as far as the pipe has room; True when nothing is left."""
        try:
            while self.events:
                os.write(self.fd, self.events[0])
                self.events.popleft()
            if self.state is not None:
                os.write(self.fd, self.state)
                self.state = None
        except BlockingIOError:
            return False
        except OSError:  # the node is gone: nothing to deliver to
            self.events.clear()
            self.state = None
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what is pending (within the timeout: a node that is gone never reads it)."""
        deadline = time.monotonic() + timeout
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(0.01)


def _control_process(settings: dict, limits: dict, conn, out_conn) -> None:
    """The 1 kHz loop. Messages in: target / hold / home / recover / stop. Out: state at arm.state_hz."""
    import signal

    import pylibfranka as pf

    from robot_rl.nodes.common import set_realtime_priority

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the node stops this loop ("stop")
    s = FrankaSettings(**settings)
    if s.rt_priority > 0 and (note := set_realtime_priority(s.rt_priority)):
        print(f"franka control loop: {note}", file=sys.stderr, flush=True)  # (the node's log)
    lim = SafetyLimits(**{k: tuple(v) if isinstance(v, list) else v for k, v in limits.items()})
    ctl = _Controller(s, lim)
    out = _Outbox(out_conn)
    try:
        robot = pf.Robot(s.address, pf.RealtimeConfig.kEnforce if s.realtime else pf.RealtimeConfig.kIgnore)
        robot.set_collision_behavior([40.0] * 7, [80.0] * 7, [40.0] * 6, [80.0] * 6)
        ne_t_ee = np.eye(4)
        ne_t_ee[:3, :3] = Rotation.from_quat(s.ee_transform[3:], scalar_first=True).as_matrix()
        ne_t_ee[:3, 3] = s.ee_transform[:3]
        robot.set_EE(ne_t_ee.T.flatten().tolist())  # column-major; O_T_EE and the Jacobian follow it
        model = robot.load_model()
    except Exception as e:  # noqa: BLE001 - any connection failure is reported to the node, one line
        out.put_event({"op": "fatal", "error": f"franka: cannot connect to {s.address}: {e}"})
        out.close()
        return
    error, running, last_state = "", True, 0.0
    while running:
        ctrl = None
        try:
            if not error:
                ctrl = robot.start_torque_control()
            while running:
                if ctrl is not None:
                    state, period = ctrl.readOnce()
                    dt = max(period.to_sec(), 1e-3)
                else:  # in error: keep reporting the measured state until recovered
                    state, dt = robot.read_once(), 0.01
                    time.sleep(0.01)
                now = time.time()
                out.flush()
                while conn.poll():
                    msg = json.loads(conn.recv_bytes())
                    op = msg.get("op")
                    if op == "target" and ctrl is not None:
                        reason = ctl.targets.add(now, msg["stamp"], msg["pose"], msg.get("gripper"),
                                                 ctl.ref if ctl.ref is not None else _pose(state.O_T_EE), 1e-3)
                        if reason:
                            ctl.hold(_pose(state.O_T_EE))
                            out.put_event({"op": "refused", "reason": reason})
                    elif op == "hold":
                        ctl.hold(_pose(state.O_T_EE))
                    elif op == "home" and ctrl is not None:
                        ctl.targets.clear()
                        ctl.home_from, ctl.home_t0 = np.asarray(state.q), now
                    elif op == "recover" and error:
                        robot.automatic_error_recovery()
                        error = ""
                        ctl.hold(_pose(state.O_T_EE))
                        raise _Restart
                    elif op == "stop":
                        running = False
                if ctrl is not None:
                    cmd = pf.Torques(ctl.torque(state, model, now, dt).tolist())
                    cmd.motion_finished = not running  # "stop" ends the motion in this cycle, not by lost cycles
                    ctrl.writeOnce(cmd)
                if now - last_state >= s.state_period:
                    last_state = now
                    out.put_state({
                        "op": "state", "t": now, "q": list(state.q), "dq": list(state.dq),
                        "ee": _pose(state.O_T_EE).tolist(), "target": (ctl.ref if ctl.ref is not None
                                                                       else _pose(state.O_T_EE)).tolist(),
                        "holding": not ctl.targets.queue, "error": error,
                        "homing": ctl.home_from is not None, "homed": ctl.homed,
                        "refused": ctl.targets.refused, "stale_holds": ctl.targets.stale_holds})
        except _Restart:
            continue
        except (pf.ControlException, pf.CommandException, pf.NetworkException, pf.FrankaException) as e:
            error = str(e).splitlines()[0]
            ctl.ref = None
            time.sleep(0.05)  # a lost connection keeps failing: report it at 20 Hz, do not spin
        except (BrokenPipeError, EOFError):
            running = False
        except Exception as e:  # noqa: BLE001 - a bug in the loop: say so to the node, never die silently
            out.put_event({"op": "fatal", "error": f"franka control loop: {type(e).__name__}: {e}"})
            running = False
        finally:
            del ctrl  # libfranka allows one active control at a time
    try:
        robot.stop()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    out.close()


class _Restart(Exception):
    pass


def _newest_state(conn, timeout: float, refusals: list[str]) -> dict | None:
    """The newest state message from the control process: waits up to `timeout` for one, then takes
    what queued behind it, so a node that fell behind publishes the present, not a backlog. Refusals
    on the way are appended to `refusals`; a fatal error raises ConnectionError."""
    newest, deadline = None, time.monotonic() + timeout
    while conn.poll(0.0 if newest is not None else max(0.0, deadline - time.monotonic())):
        msg = json.loads(conn.recv_bytes())
        if msg["op"] == "fatal":
            raise ConnectionError(msg["error"])
        if msg["op"] == "refused":
            refusals.append(msg["reason"])
        else:
            newest = msg
        if newest is None and time.monotonic() >= deadline:
            break
    return newest


class FrankaArm:
    """Arm backend for `arm_node`: the control process plus a non-blocking gripper worker."""

    def __init__(self, settings: FrankaSettings, limits: SafetyLimits, timeout: float = 0.5, gripper: bool = True):
        ctx = mp.get_context("spawn")
        child_in, self.tx = ctx.Pipe(duplex=False)  # commands to the loop
        self.conn, child_out = ctx.Pipe(duplex=False)  # states and events from it: a pipe, whose small writes are atomic
        self.proc = ctx.Process(target=_control_process, args=(asdict(settings), asdict(limits), child_in, child_out),
                                daemon=True, name="franka-control")
        self.proc.start()
        child_in.close()
        child_out.close()
        self.timeout = timeout
        self.refusals: list[str] = []
        self.error = ""
        self._gripper_cmd: float | None = None
        self._gripper_event = threading.Event()
        self._gripper_width = 0.0
        self._gripper_thread = None
        if gripper:
            self._gripper_thread = threading.Thread(target=self._gripper_worker, args=(settings.address,), daemon=True)
            self._gripper_thread.start()

    def _gripper_worker(self, address: str) -> None:
        """Blocking gripper moves off the caller's thread; the newest command wins."""
        import pylibfranka as pf

        try:
            g = pf.Gripper(address)
            max_width = g.read_once().max_width
        except Exception as e:  # noqa: BLE001 - no gripper: reported, the arm still works
            self.error = self.error or f"franka gripper: {e}"
            return
        while True:
            self._gripper_event.wait()
            self._gripper_event.clear()
            cmd = self._gripper_cmd
            if cmd is None:
                return
            try:
                g.move(float(max_width * (1.0 - (cmd + 1.0) / 2.0)), 0.1)  # -1 open .. +1 closed
                self._gripper_width = g.read_once().width
            except Exception as e:  # noqa: BLE001 - a failed grasp is not fatal
                self.error = f"franka gripper: {e}"

    def _send(self, msg: dict) -> None:
        try:
            self.tx.send_bytes(json.dumps(msg).encode())
        except (BrokenPipeError, OSError):
            raise ConnectionError("franka: the control process has exited") from None

    def read(self) -> ArmState | None:
        try:
            msg = _newest_state(self.conn, self.timeout, self.refusals)
        except (EOFError, OSError):
            raise ConnectionError("franka: the control process has exited") from None
        if msg is None:
            if not self.proc.is_alive():
                raise ConnectionError("franka: the control process has exited")
            return None
        self.error = msg["error"]
        return ArmState(msg["t"], np.asarray(msg["q"]), np.asarray(msg["dq"]), np.asarray(msg["ee"]),
                        float(self._gripper_width), np.asarray(msg["target"]), msg["holding"], msg["error"],
                        msg["homing"], msg["homed"])

    def command(self, stamp: float, pose: np.ndarray, gripper: float | None) -> None:
        self._send({"op": "target", "stamp": float(stamp), "pose": [float(v) for v in pose]})
        if gripper is not None and gripper != self._gripper_cmd:
            self._gripper_cmd = float(gripper)
            self._gripper_event.set()

    def hold(self) -> None:
        self._send({"op": "hold"})

    def home(self) -> None:
        self._send({"op": "home"})

    def recover(self) -> str:
        was = self.error
        self._send({"op": "recover"})
        return f"recovering from: {was}" if was else "no error to recover from"

    def close(self) -> None:
        if self._gripper_thread is not None:
            self._gripper_cmd = None
            self._gripper_event.set()
        try:
            self._send({"op": "stop"})
        except ConnectionError:
            pass
        self.proc.join(timeout=3.0)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=2.0)
        self.conn.close()
        self.tx.close()
