"""Scripted experts: privileged state machines that drive a task through the same 7-D action
interface a policy or a teleoperator uses. They read the commanded target, not just the measured
pose, so pressing into contact never winds the target up."""

from __future__ import annotations

import numpy as np

from robot_rl.geometry import quat_to_rot


class ScriptedExpert:
    """Base: `reset(rng)` at episode start, `act(obs)` each step -> action in [-1, 1]^7."""

    def __init__(self, env):
        self.env = env.unwrapped
        self.rng = np.random.default_rng(0)
        self.gripper = -1.0

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.gripper = self.env.initial_gripper
        self.phase = 0
        self.wait = 0

    def act(self, obs: dict) -> np.ndarray:
        raise NotImplementedError

    # ---- helpers ---------------------------------------------------------------------------
    @property
    def target(self) -> np.ndarray:
        return self.env.arm.target

    @property
    def ee(self) -> np.ndarray:
        return self.env.arm.ee_pose

    def toward(self, goal_xyz, yaw: float | None = None, speed: float = 1.0, noise: float = 0.0) -> np.ndarray:
        """Action moving the commanded target toward goal_xyz (and tool yaw), at most `speed` per step."""
        scale = self.env.spec_.action.scale
        a = np.zeros(7)
        d = (np.asarray(goal_xyz) - self.target[:3]) / np.array(scale[:3])
        n = np.max(np.abs(d))
        if n > speed:
            d *= speed / n
        a[:3] = d
        if noise:
            a[:3] += self.rng.normal(0, noise, 3)
        if yaw is not None:
            err = _wrap(yaw - tool_yaw(self.target[3:]))
            a[5] = np.clip(err / scale[5], -1, 1)
        a[6] = self.gripper
        return np.clip(a, -1, 1)

    def near(self, goal_xyz, tol: float) -> bool:
        return float(np.linalg.norm(self.ee[:3] - np.asarray(goal_xyz))) < tol


def tool_yaw(quat_wxyz: np.ndarray) -> float:
    """Yaw of the tool's x axis about world z."""
    R = quat_to_rot(quat_wxyz).as_matrix()
    return float(np.arctan2(R[1, 0], R[0, 0]))


def _wrap(a: float) -> float:
    return float((a + np.pi) % (2 * np.pi) - np.pi)


def grasp_yaw(object_yaw: float, home_yaw: float, symmetry: float = np.pi / 2) -> float:
    """The tool yaw closest to home_yaw that aligns the fingers with an object of given symmetry."""
    k = np.round(_wrap(home_yaw - object_yaw) / symmetry)
    return _wrap(object_yaw + k * symmetry)
