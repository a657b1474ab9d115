"""The safety library: checks on absolute, time-stamped end-effector targets, a command watchdog and
an e-stop latch. Used inside the arm backends (sim_world, Franka) and by the safety filter node.

A target is refused (the arm holds) when it is not finite, outside the workspace box or outside the
rotation limit; a feasible target that moves too far for its time step is shortened, not refused.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from robot_rl.geometry import quat_to_rot, rot_to_quat


@dataclass(frozen=True)
class SafetyLimits:
    """Limits from `hardware_configs/<cell>.yaml` (`safety:` block)."""

    workspace_low: tuple[float, float, float] = (0.25, -0.35, 0.0)
    workspace_high: tuple[float, float, float] = (0.75, 0.35, 0.55)
    nominal_quat: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 0.0)  # wxyz, tool pointing down
    max_tilt_rad: float = 0.8  # rotation limit: angle between the tool axis and the nominal tool axis
    max_speed: float = 0.25  # m/s: per-step translation limit = max_speed * dt
    max_angular_speed: float = 1.5  # rad/s
    action_clip: tuple[float, ...] = (1.0,) * 7  # per-axis |a| bound on normalised delta actions
    watchdog_periods: float = 2.0  # a stream older than this many of its periods is stale
    watchdog_min_s: float = 0.0  # ... and older than this (the safety filter's stream watchdogs)

    def __post_init__(self):
        lo, hi = np.asarray(self.workspace_low), np.asarray(self.workspace_high)
        if lo.shape != (3,) or hi.shape != (3,) or np.any(lo >= hi):
            raise ValueError(f"safety: workspace_low {list(lo)} must be below workspace_high {list(hi)} on every axis")
        if self.max_speed <= 0 or self.max_angular_speed <= 0 or self.watchdog_periods <= 0:
            raise ValueError("safety: max_speed, max_angular_speed and watchdog_periods must be positive")


@dataclass
class Verdict:
    ok: bool
    target: np.ndarray | None  # the (possibly shortened) target to track, None if refused
    reason: str = ""
    limited: bool = False


def clip_action(action: np.ndarray, limits: SafetyLimits) -> np.ndarray:
    """Per-axis clip of a normalised delta action (NaN becomes 0: no motion on that axis)."""
    a = np.nan_to_num(np.asarray(action, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    bound = np.asarray(limits.action_clip[: a.shape[-1]])
    return np.clip(a, -bound, bound)


def pose_problem(target: np.ndarray, limits: SafetyLimits) -> str:
    """Why an absolute target (xyz + wxyz) is refused whatever came before it ('' if it is not):
    not 7 finite numbers, a non-unit quaternion, outside the workspace or tilted too far."""
    t = np.asarray(target, dtype=np.float64)
    if t.shape != (7,) or not np.all(np.isfinite(t)):
        return "target is not 7 finite numbers (xyz + wxyz)"
    if not 0.9 < (n := np.linalg.norm(t[3:])) < 1.1:
        return f"target quaternion has norm {n:.3f}, not 1"
    lo, hi = np.asarray(limits.workspace_low), np.asarray(limits.workspace_high)
    if np.any(t[:3] < lo - 1e-9) or np.any(t[:3] > hi + 1e-9):
        return f"target position {np.round(t[:3], 3).tolist()} is outside the workspace {list(lo)}..{list(hi)}"
    tool_z = quat_to_rot(t[3:] / n).as_matrix()[:, 2]
    nominal_z = quat_to_rot(np.asarray(limits.nominal_quat)).as_matrix()[:, 2]
    tilt = float(np.arccos(np.clip(tool_z @ nominal_z, -1.0, 1.0)))  # yaw about the tool axis is free
    if tilt > limits.max_tilt_rad:
        return (f"target tool axis is tilted {np.degrees(tilt):.0f} deg from nominal "
                f"(limit {np.degrees(limits.max_tilt_rad):.0f})")
    return ""


def check_target(target: np.ndarray, previous: np.ndarray, dt: float, limits: SafetyLimits) -> Verdict:
    """Check an absolute target (xyz + wxyz) against the limits, relative to the previous target
    (or the measured pose) `dt` seconds earlier."""
    if why := pose_problem(target, limits):
        return Verdict(False, None, why)
    t = np.asarray(target, dtype=np.float64).copy()
    t[3:] /= np.linalg.norm(t[3:])
    lo, hi = np.asarray(limits.workspace_low), np.asarray(limits.workspace_high)
    rot = quat_to_rot(t[3:])
    dt = max(float(dt), 1e-3)
    out, limited = t.copy(), False
    dp = t[:3] - previous[:3]
    max_dp = limits.max_speed * dt
    if (d := np.linalg.norm(dp)) > max_dp:
        # from a measured pose just outside the box (an overshoot at its face) the shortened step can
        # stop outside it: kept inside, moving towards the (inside) target
        out[:3] = np.clip(previous[:3] + dp * (max_dp / d), lo, hi)
        limited = True
    r_prev = quat_to_rot(previous[3:])
    dr = (rot * r_prev.inv()).as_rotvec()
    max_dr = limits.max_angular_speed * dt
    if (a := np.linalg.norm(dr)) > max_dr:
        out[3:] = rot_to_quat(Rotation.from_rotvec(dr * (max_dr / a)) * r_prev)
        limited = True
    return Verdict(True, out, "shortened to the speed limit" if limited else "", limited)


class StreamWatchdog:
    """A stream is stale when its last sample is older than `periods` of its own period. The period
    is the median of recent inter-arrival times (the declared period until two samples arrived)."""

    def __init__(self, declared_period: float, periods: float = 2.0, history: int = 10, min_age: float = 0.0):
        self.declared = declared_period
        self.periods, self.min_age = periods, min_age
        self.last: float | None = None
        self._intervals: deque[float] = deque(maxlen=history)

    def feed(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self._intervals.append(now - self.last)
        self.last = now

    @property
    def period(self) -> float:
        return float(np.median(self._intervals)) if self._intervals else self.declared

    def age(self, now: float) -> float:
        return float("inf") if self.last is None else now - self.last

    @property
    def limit(self) -> float:
        """The age past which the stream is stale."""
        return max(self.periods * self.period, self.min_age)

    def stale(self, now: float) -> bool:
        return self.age(now) > self.limit

    def reset(self) -> None:
        self.last = None
        self._intervals.clear()


@dataclass
class EStop:
    """Latched e-stop: holds while the last value received is True (transient-local topic)."""

    engaged: bool = False
    released_at: float | None = None
    history: list[tuple[float, bool]] = field(default_factory=list)

    def set(self, engaged: bool, now: float) -> bool:
        """Returns True when the state changed."""
        changed = engaged != self.engaged
        self.engaged = bool(engaged)
        if changed:
            self.history.append((now, self.engaged))
            if not engaged:
                self.released_at = now
        return changed


WRENCH_SAMPLES = 3  # 30 ms at 100 Hz
MAX_LEAD_S = 5.0  # a target stamped further ahead than this is garbage (or a clock from another world)


def stamp_problem(t: float, now: float) -> str:
    """'' for a target time still ahead (within MAX_LEAD_S), 'late' for one whose time has passed
    (skipped, never shifted), else why the stamp is garbage."""
    if not np.isfinite(t) or t > now + MAX_LEAD_S:
        return f"target stamped {t - now:+.2f} s from now (more than {MAX_LEAD_S:g} s ahead: a stale clock or garbage)"
    return "late" if t <= now else ""


class SafetyGate:
    """The safety filter's decision, in plain Python (`safety_filter` node wraps it): targets pass
    only while no hold reason is active, and each passing target is re-checked against the limits
    relative to the previous passed target (or the measured pose).

    Hold reasons: `estop`; `wrench` (force above the limit; latched until `clear_latched`, i.e. the
    next episode or an operator reset); `stream <topic>` (an observation stream older than
    `watchdog_periods` of its own period, and at least `watchdog_min_s`); `policy heartbeat` (none for `watchdog_periods` policy
    periods, or the server reports itself inactive); `refused` (a target failed the check; clears
    when a later one passes). Stream and heartbeat watchdogs run only while `watch` is on (real
    time: in lock-step the sim waits for every stream, so time cannot run away from a stalled one).
    While a human drives (`human`, from the intervention mux) the heartbeat and the streams only the
    policy reads are not required: the operator's twist has its own watchdog in the mux.
    """

    def __init__(self, limits: SafetyLimits, policy_period: float, wrench_limit: float, watch: bool = True):
        self.limits, self.policy_period, self.wrench_limit, self.watch = limits, policy_period, wrench_limit, watch
        self.streams: dict[str, StreamWatchdog] = {}
        # a fixed period (no history): two policy periods, however often the server says it is alive
        self.heartbeat = StreamWatchdog(policy_period, limits.watchdog_periods, history=0)
        self.policy_active: bool | None = None  # None: not heard from yet (the heartbeat watchdog covers that)
        self.human = False
        self.policy_streams: set[str] = set()  # streams watched for the policy only
        self._over = 0  # consecutive wrench samples above the limit
        self.reasons: dict[str, str] = {}
        self.checker = TargetChecker(limits)

    # ---- inputs --------------------------------------------------------------------------------
    def watch_stream(self, topic: str, declared_period: float, policy_only: bool = False) -> None:
        if policy_only:
            self.policy_streams.add(topic)
        if topic not in self.streams:
            self.streams[topic] = StreamWatchdog(declared_period, self.limits.watchdog_periods,
                                                 min_age=self.limits.watchdog_min_s)

    def feed(self, topic: str, stamp: float) -> None:
        if topic in self.streams:
            self.streams[topic].feed(stamp)

    def beat(self, now: float, active: bool) -> None:
        self.heartbeat.feed(now)
        self.policy_active = active

    def wrench(self, force: np.ndarray) -> None:
        """Latch a hold when the force stays above the limit for WRENCH_SAMPLES samples in a row (a
        single sample is an impact or noise; a sustained one is pushing on something)."""
        f = float(np.linalg.norm(np.asarray(force, dtype=np.float64)[:3]))
        self._over = self._over + 1 if not f <= self.wrench_limit else 0
        if not np.isfinite(f) or self._over >= WRENCH_SAMPLES:
            self.reasons["wrench"] = f"wrench {f:.1f} N above the limit {self.wrench_limit:.0f} N (latched)"

    def estop(self, engaged: bool) -> None:
        if engaged:
            self.reasons["estop"] = "/estop engaged"
        else:
            self.reasons.pop("estop", None)

    def clear_latched(self) -> None:
        self.reasons.pop("wrench", None)
        self.reasons.pop("refused", None)

    # ---- decisions -----------------------------------------------------------------------------
    def update(self, now: float) -> dict[str, str]:
        """Re-evaluate the watchdogs at `now` (node clock); the active hold reasons."""
        for key in [k for k in self.reasons if k.startswith("stream ") or k == "policy heartbeat"]:
            del self.reasons[key]
        if self.watch:
            for topic, w in self.streams.items():
                if self.human and topic in self.policy_streams:
                    continue
                if w.stale(now):
                    age = w.age(now)
                    self.reasons[f"stream {topic}"] = (f"stream {topic} stale: " + ("no message yet" if age == float("inf")
                                                       else f"last {age * 1e3:.0f} ms ago, period {w.period * 1e3:.0f} ms"))
            if self.heartbeat.stale(now) and not self.human:
                age = self.heartbeat.age(now)
                self.reasons["policy heartbeat"] = "policy server heartbeat " + (
                    "never received" if age == float("inf") else f"missing for {age * 1e3:.0f} ms")
        if self.policy_active is False and not self.human:  # the server said so (lifecycle deactivate)
            self.reasons["policy heartbeat"] = "policy server inactive"
        return self.reasons

    def filter(self, targets: list[tuple[float, np.ndarray, float | None]], measured: np.ndarray, measured_stamp: float,
               now: float) -> tuple[list, str]:
        """The targets that may go to the arm (TargetChecker.check) and '' or why the message was
        refused; nothing passes while a hold reason other than an earlier refusal is active."""
        if any(k != "refused" for k in self.update(now)):
            self.checker.counts["dropped_holding"] += 1
            return [], ""
        out, why = self.checker.check(targets, measured, measured_stamp, now)
        if why:
            self.reasons["refused"] = f"target refused: {why}"
        else:
            self.reasons.pop("refused", None)
        return out, why

    def refuse(self, why: str) -> None:
        """A message refused before it could be checked (malformed, no measured pose yet)."""
        self.checker.refuse(why)
        self.reasons["refused"] = f"target refused: {why}"


class TargetChecker:
    """Checks one message of absolute, time-stamped targets, all or nothing: each target against the
    limits relative to the previous accepted one (or the measured pose); a newer plan replaces the
    tail of the accepted ones; targets whose time has passed are dropped (never shifted); one
    refusal refuses the whole message and the next starts from the measured pose. Used by the
    safety filter and, again, by arm_node."""

    def __init__(self, limits: SafetyLimits):
        self.limits = limits
        self.passed: deque[tuple[float, np.ndarray]] = deque(maxlen=64)  # accepted targets, by stamp
        self.counts = {"passed": 0, "refused": 0, "limited": 0, "late": 0, "dropped_holding": 0}

    def check(self, targets: list[tuple[float, np.ndarray, float | None]], measured: np.ndarray, measured_stamp: float,
              now: float) -> tuple[list, str]:
        out, staged, limited = [], list(self.passed), 0
        for t, pose, gripper in targets:
            if (why := stamp_problem(t, now)) == "late":
                if bad := pose_problem(pose, self.limits):  # garbage in a past slot still condemns the message
                    return self.refuse(bad)
                self.counts["late"] += 1
                continue
            if why:
                return self.refuse(why)
            while staged and staged[-1][0] >= t:
                staged.pop()
            prev_t, prev = staged[-1] if staged else (measured_stamp, measured)
            v = check_target(pose, prev, t - prev_t, self.limits)
            if not v.ok:
                return self.refuse(v.reason)
            limited += v.limited
            staged.append((t, v.target))
            out.append((t, v.target, gripper))
        self.passed = deque(staged, maxlen=self.passed.maxlen)
        self.counts["passed"] += len(out)
        self.counts["limited"] += limited
        return out, ""

    def refuse(self, why: str) -> tuple[list, str]:
        self.counts["refused"] += 1
        self.passed.clear()
        return [], why
