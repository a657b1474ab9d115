"""`lift`: pick a 4 cm cube placed at a random pose on the table and lift it 8 cm."""

from __future__ import annotations

import mujoco
import numpy as np
from robot_rl.sim.base import MASKS, FrankaTaskEnv
from robot_rl.sim.experts import ScriptedExpert, grasp_yaw, tool_yaw

HALF = 0.02
XY_LOW = np.array([0.38, -0.18])
XY_HIGH = np.array([0.58, 0.18])
LIFT_HEIGHT = 0.08


class LiftEnv(FrankaTaskEnv):
    task_name = "lift"
    mask = MASKS["xyz_yaw_gripper"]
    default_max_steps = 80
    objects = ("cube",)

    def build_task(self, cell: mujoco.MjSpec) -> None:
        cube = cell.worldbody.add_body(name="cube", pos=[0.5, 0, HALF])
        cube.add_freejoint(name="cube")
        cube.add_geom(name="cube", type=mujoco.mjtGeom.mjGEOM_BOX, size=[HALF] * 3, mass=0.08,
                      rgba=[0.85, 0.2, 0.2, 1], friction=[1.2, 0.005, 0.0001])

    def reset_task(self, rng):
        yaw = rng.uniform(-np.pi / 4, np.pi / 4)
        self.set_free_pose("cube", [*rng.uniform(XY_LOW, XY_HIGH), HALF], [np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)])

    def evaluate(self):
        cube = self.object_poses()["cube"]
        dist = float(np.linalg.norm(self.arm.ee_pose[:3] - cube[:3]))
        lifted = cube[2] > HALF + LIFT_HEIGHT
        return bool(lifted), False, -dist + min(cube[2] - HALF, LIFT_HEIGHT) * 5


class LiftExpert(ScriptedExpert):
    """Above the cube, align yaw, descend, close, wait, lift. Speeds and heights vary per episode."""

    def reset(self, rng):
        super().reset(rng)
        self.hover = rng.uniform(0.08, 0.14)
        self.speed = rng.uniform(0.5, 1.0)
        self.grasp_dz = rng.uniform(-0.004, 0.004)

    def act(self, obs):
        cube = self.env.object_poses()["cube"]
        cube_yaw = tool_yaw(cube[3:])
        yaw = grasp_yaw(cube_yaw, tool_yaw(self.target[3:]))
        above = cube[:3] + [0, 0, self.hover]
        grasp = cube[:3] + [0, 0, self.grasp_dz]
        if self.phase == 0:  # approach above the cube, open, align
            self.gripper = -1.0
            if self.near(above, 0.01) and abs(yaw - tool_yaw(self.ee[3:])) < 0.05:
                self.phase = 1
            return self.toward(above, yaw, self.speed)
        if self.phase == 1:  # descend
            if self.near(grasp, 0.008):
                self.phase, self.wait = 2, 0
            return self.toward(grasp, yaw, 0.5)
        if self.phase == 2:  # close and wait for the fingers
            self.gripper = 1.0
            self.wait += 1
            if self.wait >= 5:
                self.phase = 3
                self.lift_goal = grasp + [0, 0, LIFT_HEIGHT + 0.06]
            return self.toward(grasp, yaw, 0.5)
        return self.toward(self.lift_goal, None, self.speed)
