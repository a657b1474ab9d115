"""Absolute, time-stamped end-effector targets inside an arm backend's control loop: the queue, the
re-check against the safety limits, the reference for the next control period and the command
watchdog. Shared by `sim_world` (sim) and the Franka control process, so both execute a target
stream the same way: a target is where the tool should be at its time; targets whose time has passed
are superseded, never shifted; a stream older than two of its periods makes the arm hold.

A stream speaks until its last target's time, not only when a message arrives: a policy sends a whole
chunk at once (0.7 s of targets every 0.7 s), and judging it by arrivals alone held the arm 0.2 s into
every chunk in real time (in sim and on the Franka), so each chunk ran two of its steps. The arm runs
a queued plan (checked targets, at most MAX_LEAD_S ahead) to its end; a source that dies mid-plan is
the safety filter's to catch (policy heartbeat, two policy periods → /arm/hold, which empties the queue).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from robot_rl.drivers.safety import SafetyLimits, StreamWatchdog, check_target

from robot_rl.geometry import quat_conj, quat_exp, quat_log, quat_mul


@dataclass
class Target:
    stamp: float
    pose: np.ndarray  # xyz + wxyz
    gripper: float | None
    started: bool = False  # the arm has begun moving towards it (its gripper command is out)


def interpolate(a: np.ndarray, b: np.ndarray, frac: float) -> np.ndarray:
    """Pose a→b at fraction `frac` (linear in position, geodesic in rotation; runs every control cycle,
    so in geometry's lean quaternion algebra)."""
    out = np.empty(7)
    out[:3] = a[:3] + frac * (b[:3] - a[:3])
    q = quat_mul(quat_exp(frac * quat_log(quat_mul(b[3:], quat_conj(a[3:])))), a[3:])
    out[3:] = (q if q[0] >= 0 else -q) / np.sqrt(q @ q)
    return out


class TargetQueue:
    def __init__(self, limits: SafetyLimits, declared_period: float):
        self.limits = limits
        self.queue: deque[Target] = deque()
        self.watchdog = StreamWatchdog(declared_period, limits.watchdog_periods)
        self.refused = 0
        self.stale_holds = 0
        self.plan_end = float("-inf")  # the last queued target's time: the stream speaks until then

    def clear(self) -> None:
        """Drop the plan (a hold, a home move): the stream's next target starts a new one."""
        self.queue.clear()
        self.watchdog.reset()
        self.plan_end = float("-inf")

    def add(self, now: float, stamp: float, pose, gripper: float | None, current: np.ndarray, min_dt: float) -> str:
        """Queue a target after re-checking it; returns '' or why it was refused (the caller holds)."""
        while self.queue and self.queue[-1].stamp >= stamp:  # a newer plan replaces the overlapping tail
            self.queue.pop()
        prev = self.queue[-1].pose if self.queue else current
        dt = max(stamp - (self.queue[-1].stamp if self.queue else now), min_dt)
        v = check_target(np.asarray(pose, dtype=np.float64), prev, dt, self.limits)
        if not v.ok:
            self.refused += 1
            self.queue.clear()
            return v.reason
        self.watchdog.feed(now)
        self.plan_end = stamp  # (the overlapping tail was replaced: this is the last)
        self.queue.append(Target(stamp, v.target, None if gripper is None else float(gripper)))
        return ""

    def reference(self, now: float, h: float, current: np.ndarray) -> tuple[np.ndarray, float | None, bool]:
        """(reference at now + h, gripper command to issue now or None, whether a target's time came).

        The reference is the latest target whose time has come, else a point on the way to the next;
        `current` is the reference being tracked. A target's gripper command goes out when the arm
        starts towards it (as the sim env issues it at the start of a step)."""
        te = now + h
        ref, gripper, arrived = current, None, False
        while self.queue and self.queue[0].stamp <= te + 1e-9:
            tgt = self.queue.popleft()
            ref, arrived = tgt.pose, True
            if not tgt.started and tgt.gripper is not None:
                gripper = tgt.gripper
        if self.queue and not arrived:  # (a tick that reaches a target ends there; the next starts after)
            nxt = self.queue[0]
            if not nxt.started:
                nxt.started = True
                gripper = nxt.gripper if nxt.gripper is not None else gripper
            if not np.array_equal(ref, nxt.pose):
                ref = interpolate(ref, nxt.pose, min(1.0, h / max(nxt.stamp - now, h)))
        return ref, gripper, arrived

    def stale(self, now: float) -> bool:
        """The stream went silent: nothing arrived and its plan ran out two of its periods ago (checked
        while a target stream is active)."""
        w = self.watchdog
        if w.last is not None and w.stale(now) and now - self.plan_end > w.limit:
            self.stale_holds += 1
            self.clear()
            return True
        return False

    def ready(self, now: float, h: float) -> bool:
        """Lock-step: a target at or beyond the end of this period has arrived."""
        return bool(self.queue) and self.queue[-1].stamp >= now + h - 1e-9
