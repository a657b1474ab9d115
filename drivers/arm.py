"""Arm backends: `mujoco` (through sim_world) and `franka` (pylibfranka, drivers/franka.py). A backend
streams measured state and takes absolute, time-stamped end-effector targets; interpolation, reference
limiting and the command watchdog run in the backend's own control loop (sim: sim_world's stepping;
Franka: its 1 kHz control process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ArmState:
    stamp: float
    joint_pos: np.ndarray
    joint_vel: np.ndarray
    ee_pose: np.ndarray  # xyz + wxyz, base frame
    gripper: float  # 0 open .. 1 closed
    target: np.ndarray  # the target the controller currently tracks
    holding: bool = False
    error: str = ""
    homing: bool = False  # a /arm/home move is under way (backends that home themselves: franka)
    homed: int = 0  # home moves completed since the backend started


class MujocoArm:
    """The sim cell's Panda, through sim_world."""

    def __init__(self, link_dir: Path, timeout: float = 0.5):
        from robot_rl.drivers.sim_link import LinkClient

        self.link = LinkClient(link_dir, "arm", ["state"])
        self.lockstep = self.link.info.get("mode") == "lockstep"  # silence = the sim waiting for a command
        self.timeout = timeout
        self.refusals: list[str] = []

    def read(self) -> ArmState | None:
        msg = self.link.recv(self.timeout)
        while msg is not None and msg.get("op") != "state":
            if msg.get("op") == "refused":
                self.refusals.append(msg.get("reason", ""))
            msg = self.link.recv(self.timeout)
        if msg is None:
            return None
        return ArmState(msg["t"], np.asarray(msg["q"]), np.asarray(msg["dq"]), np.asarray(msg["ee"]),
                        float(msg["gripper"]), np.asarray(msg["target"]), bool(msg["holding"]))

    def command(self, stamp: float, pose: np.ndarray, gripper: float | None) -> None:
        self.link.send({"op": "target", "stamp": float(stamp), "pose": [float(v) for v in pose],
                        "gripper": None if gripper is None else float(gripper)})

    def hold(self) -> None:
        self.link.send({"op": "hold"})

    def home(self) -> None:
        self.link.send({"op": "home"})

    def recover(self) -> str:
        self.hold()
        return "sim arm has no error state; holding the measured pose"

    def close(self) -> None:
        self.link.close()


def _open_franka(cfg, link_dir: Path):
    from robot_rl.drivers.franka import FrankaArm, FrankaSettings

    a = cfg.arm
    return FrankaArm(FrankaSettings(
        address=a.address, translational_stiffness=a.translational_stiffness, rotational_stiffness=a.rotational_stiffness,
        damping_ratio=a.damping_ratio, max_pos_error=a.max_pos_error, max_rot_error=a.max_rot_error,
        home_qpos=a.home_qpos, ee_transform=a.ee_transform, target_period=1.0 / cfg.rates.policy_hz,
        rt_priority=a.rt_priority, state_period=1.0 / a.state_hz),
        cfg.safety_limits())


ARM_BACKENDS = {  # backend name -> opener(hardware config, sim link directory)
    "mujoco": lambda cfg, link_dir: MujocoArm(link_dir),
    "franka": _open_franka,
}
