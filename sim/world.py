"""The simulated robot cell behind the ROS graph: one MuJoCo task stepped at the command rate, with
absolute time-stamped targets, the command watchdog, camera rendering and resets. `sim_world` (node)
is a thin shell around `SimWorld`; the driver nodes' `mujoco` backends talk to it over the sim link.

Modes: `realtime` paces ticks to the wall clock and reports the real-time factor; `lockstep` advances
a tick only once a target for that tick has arrived, so the same commands give the same trajectory —
or, during an episode, while the arm holds on request (a refused target, `/arm/hold`, the safety
filter): a hold is a command too, and the episode runs on to its end instead of stalling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from robot_rl.drivers.safety import SafetyLimits
from robot_rl.drivers.sim_link import WorldLink
from robot_rl.drivers.targets import TargetQueue
from robot_rl.sim.registry import TASKS, make_env

MODES = ("realtime", "lockstep")


@dataclass(frozen=True)
class SimCamera:
    name: str
    width: int = 640
    height: int = 480
    rate_hz: float = 30.0


class SimWorld:
    """Owns the MuJoCo state. One `tick()` advances 1/command_hz seconds of sim time."""

    def __init__(self, task: str = "reach", link_dir: Path | str = "", mode: str = "realtime",
                 cameras: tuple[SimCamera, ...] = (SimCamera("front"), SimCamera("wrist")),
                 command_hz: float = 100.0, target_period: float = 0.1, limits: SafetyLimits = SafetyLimits(),
                 seed: int = 0, render_geometry: str = "visual", task_setup: dict[str, Any] | None = None):
        if mode not in MODES:
            raise ValueError(f"sim_world: mode '{mode}' is not one of {MODES}")
        if task not in TASKS:
            raise ValueError(f"sim_world: task '{task}' is not a robot_rl MuJoCo task ({sorted(TASKS)})")
        self.env = make_env(task, obs_mode="state", **(task_setup or {}))
        self.mode, self.limits, self.geometry = mode, limits, render_geometry
        self.h = 1.0 / command_hz
        self.t = 0.0
        self.cameras = cameras
        self._next_frame = {c.name: 0.0 for c in cameras}
        self.frames_rendered = {c.name: 0 for c in cameras}
        fovy = {c.name: float(self.env.model.cam_fovy[self.env._cam_id(c.name)]) for c in cameras}
        arm = self.env.arm
        self.link = WorldLink(Path(link_dir), [(c.name, c.width, c.height, fovy[c.name]) for c in cameras], {
            "task": task, "mode": mode, "command_hz": command_hz,
            "payload": {"mass": float(self.env.model.body_subtreemass[arm.tool_body])},
        })
        self.targets = TargetQueue(limits, target_period)
        self.holding = True
        self.hold_requested = False  # held on request (not at a reset or episode boundary): lock-step time runs on
        self.accepting = True
        self.episode, self.seed = 0, seed
        self._last_state_wall = 0.0
        self.on_state = None  # called with the world whenever its state is published (the node's ROS side)
        self.reset(seed)
        self.home_pose = arm.ee_pose
        self._rtf_wall, self._rtf_sim, self.rtf = time.monotonic(), 0.0, 0.0

    # ---- commands -----------------------------------------------------------------------------
    def reset(self, seed: int | None) -> None:
        """A new episode. The reset takes one tick of sim time, so every stream's stamps stay strictly
        increasing and the first state of the episode is never mistaken for the last of the previous."""
        self.env.reset(seed=seed)
        self.t = round(self.t + self.h, 9)
        self.targets.clear()
        self.targets.watchdog.reset()
        self.holding, self.hold_requested = True, False
        for c in self.cameras:
            self._next_frame[c.name] = self.t

    def hold(self) -> None:
        """Hold the measured pose: drop queued targets, target := measured pose."""
        self.targets.clear()
        self.env.arm.sync_target()
        self.holding = True

    def add_target(self, stamp: float, pose, gripper: float | None) -> str:
        """Queue an absolute target; the world re-checks it (safety is enforced twice)."""
        if not self.accepting:
            return "the episode is stopped: targets are ignored until the next start"
        reason = self.targets.add(self.t, stamp, pose, gripper, self.env.arm.target, self.h)
        if reason:
            self.hold()
        else:
            self.holding = self.hold_requested = False
        return reason

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        try:
            if op == "target":
                reason = self.add_target(float(msg["stamp"]), msg["pose"], msg.get("gripper"))
                if reason:
                    self.hold_requested = self.accepting
                    self.link.reply(msg, {"op": "refused", "reason": reason})
            elif op == "hold":
                self.hold()
                self.hold_requested = self.accepting
            elif op in ("stop", "start"):  # episode boundaries: a stopped episode's late targets never move the arm
                self.accepting = op == "start"
                self.hold()
                self.hold_requested = False
                if op == "start":  # the episode manager announces "running" only now: no target can beat the start
                    self.link.reply(msg, {"op": "start_done", "t": self.t})
            elif op == "home":
                self.targets.clear()
                self.add_target(self.t + float(msg.get("duration", 2.0)), self.home_pose, None)
            elif op == "reset":
                self.episode = int(msg.get("episode", self.episode + 1))
                self.reset(msg.get("seed"))
                self.publish_state()
                self.link.reply(msg, {"op": "reset_done", "episode": self.episode, "t": self.t})
        except (KeyError, TypeError, ValueError) as e:  # a bad message never stops the world
            self.link.reply(msg, {"op": "refused", "reason": f"bad '{op}' message: {e}"})

    # ---- stepping -----------------------------------------------------------------------------
    def tick(self) -> None:
        if self.mode == "realtime" and self.targets.stale(self.t):
            self.hold()
        ref, gripper, arrived = self.targets.reference(self.t, self.h, self.env.arm.target)
        if gripper is not None:
            self.env.arm.set_gripper(gripper)
        self.env.arm.run(ref, self.h, settle=arrived)
        self.t = round(self.t + self.h, 9)
        self.publish_state()
        self.render_due()

    def publish_state(self) -> None:
        env, arm = self.env, self.env.arm
        success, failed, shaping = env.evaluate()
        d = env.data
        raw = -np.concatenate([d.sensordata[arm._ft_force:arm._ft_force + 3],
                               d.sensordata[arm._ft_torque:arm._ft_torque + 3]])
        tool_weight = raw - arm.wrench()  # the model's exact payload wrench now (fingers move the tool's com)
        self._last_state_wall = time.monotonic()
        if self.on_state is not None:
            self.on_state(self)
        self.link.publish("state", {
            "op": "state", "t": self.t, "episode": self.episode, "q": arm.joint_pos.tolist(),
            "dq": arm.joint_vel.tolist(), "ee": arm.ee_pose.tolist(), "gripper": arm.gripper,
            "target": arm.target.tolist(), "wrench_raw": raw.tolist(), "payload_wrench": tool_weight.tolist(),
            "ft_rot": d.site_xmat[arm.ft_site].tolist(), "holding": self.holding, "success": bool(success),
            "failed": bool(failed), "reward": float(success) + float(shaping), "refused": self.targets.refused,
            "stale_holds": self.targets.stale_holds, "rtf": self.rtf,
        })

    def render_due(self) -> None:
        for c in self.cameras:
            if self.t + 1e-9 >= self._next_frame[c.name]:
                self._next_frame[c.name] += 1.0 / c.rate_hz
                if self.link.has_subscribers(f"camera/{c.name}"):  # no one receives it: not rendered
                    self.frames_rendered[c.name] += 1
                    self.link.publish_frame(c.name, self.env.render_camera(c.name, c.width, c.height, self.geometry),
                                            self.t)

    def run(self, should_stop) -> None:
        """The loop: messages, then a tick when its time (realtime) or its command (lockstep) has come."""
        wall0, sim0 = time.monotonic(), self.t
        while not should_stop():
            if self.mode == "realtime":
                wait = wall0 + (self.t - sim0) - time.monotonic()
                if wait < -0.5:  # fell behind by more than half a second: re-anchor, report it via rtf
                    wall0, sim0, wait = time.monotonic(), self.t, 0.0
                for msg in self.link.poll(max(wait, 0.0)):
                    self.handle(msg)
                if wall0 + (self.t - sim0) > time.monotonic():
                    continue
            else:
                for msg in self.link.poll(0.0 if self._lockstep_ready() else 0.05):
                    self.handle(msg)
                if not self._lockstep_ready():
                    if time.monotonic() - self._last_state_wall > 0.1:
                        self.publish_state()  # heartbeat while waiting: same stamp, new subscribers see the state
                    continue
            self.tick()
            self._update_rtf()

    def _lockstep_ready(self) -> bool:
        """Lock-step: the command covering the next tick is in — a target, or a hold on request."""
        return self.hold_requested or self.targets.ready(self.t, self.h)

    def _update_rtf(self) -> None:
        now = time.monotonic()
        if now - self._rtf_wall >= 1.0:
            self.rtf = (self.t - self._rtf_sim) / (now - self._rtf_wall)
            self._rtf_wall, self._rtf_sim = now, self.t

    def close(self) -> None:
        self.link.close()
        self.env.close()

