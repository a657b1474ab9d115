"""The scripted operator's side of teleoperation (no rclpy): the task's scripted expert as the path
a person would follow, the devices it types on or pushes (the keyboard FIFO of `teleop_node`, the
web console's joystick), and `HilOperator`, who watches a policy and takes over when the arm strays
from where the expert would be (drivers.teleop.ScriptedOperator's hysteresis), then hands back.
Used by `robot-rl record operator=scripted`, `robot-rl run hil=true operator=scripted`, the tests
and the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

WAYPOINT_SPACING_M = 0.02
STEPS_PAST_SUCCESS = 10  # the path goes on a little past the expert's success (a person overshoots too)


def expert_path(task: str, seed: int) -> list[tuple[np.ndarray, float | None]]:
    """The scripted expert's end effector on the episode with this seed, step by step: (pose before
    the step, xyz + wxyz; the sign of its gripper command where it changes, else None), on until a
    little past its success (a slower operator who follows it is not left just short of it)."""
    from robot_rl.rollout import policy_rng
    from robot_rl.sim import make_env, make_expert

    env = make_env(task)
    obs, _ = env.reset(seed=seed)
    expert = make_expert(env)
    expert.reset(policy_rng(seed))
    mask = env.unwrapped.mask
    path: list[tuple[np.ndarray, float | None]] = []
    grip, after_success = None, 0
    for _ in range(env.unwrapped.max_steps):
        action = expert.act(obs)
        g = float(np.sign(action[6])) if mask[6] and action[6] != 0 else None
        path.append((env.unwrapped.arm.ee_pose.copy(), g if g is not None and grip is not None and g != grip
                     else None))  # close (or open) here
        grip = g if g is not None else grip
        obs, _, terminated, truncated, info = env.step(action)
        after_success = after_success + 1 if info.get("success") else after_success
        if after_success > STEPS_PAST_SUCCESS or truncated or (terminated and not after_success):
            break  # (a task that terminates on success is stepped on a little: the physics allows it)
    path.append((env.unwrapped.arm.ee_pose.copy(), None))
    env.close()
    return path


def waypoints(path: list[tuple[np.ndarray, float | None]]) -> list[tuple[np.ndarray, float | None]]:
    """A path thinned to points WAYPOINT_SPACING_M apart, keeping every gripper change and the end."""
    out: list[tuple[np.ndarray, float | None]] = []
    for pos, grip in path:
        if grip is not None or not out or np.linalg.norm(pos[:3] - out[-1][0][:3]) >= WAYPOINT_SPACING_M:
            out.append((pos, grip))
    out.append((path[-1][0], None))
    return out


class KeyPipe:
    """The writing end of the teleop node's keyboard FIFO; as a device of the scripted operator it
    types what a person would. `wait(pred, timeout, what)` waits for the teleop node to open it."""

    def __init__(self, fifo: Path, wait):
        def opened() -> bool:
            try:
                self.fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                return True
            except OSError:  # no reader yet: the teleop node is starting
                return False

        wait(opened, 120, "the teleop node to open its keyboard FIFO")

    def send(self, keys: str | bytes) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.fd, keys.encode() if isinstance(keys, str) else keys)

    def halt(self) -> None:
        self.send(" ")

    def drive(self, op, err: np.ndarray) -> None:
        self.send(op.keys(err))

    def set_gripper(self, command: float) -> None:
        self.send("g" if command > 0 else "h")

    def takeover(self) -> None:
        """The engage button: takes control, or hands it back."""
        self.send(" t")


class WebJoystick:
    """The web console's joystick, posted to as the page does (`POST /teleop`)."""

    def __init__(self, url: str, token: str = ""):
        self.url, self.token = url.rstrip("/"), token

    def post(self, body: dict) -> dict:
        import urllib.request

        req = urllib.request.Request(f"{self.url}/teleop", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Token": self.token})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def halt(self) -> None:
        self.post({"axes": [0.0] * 6})

    def drive(self, op, err: np.ndarray) -> None:
        self.post({"axes": op.axes(err, full_scale_m=0.02).tolist()})

    def set_gripper(self, command: float) -> None:
        self.post({"axes": [0.0] * 6, "gripper": float(command)})

    def takeover(self) -> None:
        self.post({"axes": [0.0] * 6, "takeover": True})


class HilOperator:
    """Watches a policy. The reference is where the expert was at the same step of its episode (its
    last point once it finished): more than `takeover_m` from it, the operator takes over (the engage
    button) and drives toward it; within `handback_m` hands back."""

    def __init__(self, device, op, path: list[tuple[np.ndarray, float | None]], t0: float, dt: float):
        self.device, self.op, self.path, self.t0, self.dt = device, op, path, t0, dt
        self.engaged = False
        self.takeovers = 0

    def tick(self, t: float, ee: np.ndarray) -> None:
        """`ee`: the measured end-effector position."""
        k = min(max(int((t - self.t0) / self.dt), 0), len(self.path) - 1)
        driving, err = self.op.decide(ee, self.path[k][0][:3])  # position only: the HIL operator corrects where
        if driving != self.engaged:
            self.device.takeover()
            self.engaged = driving
            self.takeovers += int(driving)
        if driving:
            self.device.drive(self.op, err)
