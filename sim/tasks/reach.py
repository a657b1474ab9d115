"""`reach`: bring the tool centre point to a goal marker in free space (state: goal pose is a
sim-only key; image: the green marker is visible)."""

from __future__ import annotations

import mujoco
import numpy as np
from robot_rl.sim.base import MASKS, FrankaTaskEnv
from robot_rl.sim.experts import ScriptedExpert

GOAL_LOW = np.array([0.32, -0.25, 0.08])
GOAL_HIGH = np.array([0.62, 0.25, 0.35])
TOLERANCE = 0.02


class ReachEnv(FrankaTaskEnv):
    task_name = "reach"
    mask = MASKS["xyz"]
    default_max_steps = 50
    objects = ("goal",)

    def build_task(self, cell: mujoco.MjSpec) -> None:
        goal = cell.worldbody.add_body(name="goal", mocap=True, pos=[0.5, 0, 0.2])
        goal.add_geom(type=mujoco.mjtGeom.mjGEOM_SPHERE, size=[TOLERANCE, 0, 0], rgba=[0.1, 0.9, 0.2, 0.6],
                      contype=0, conaffinity=0)

    def reset_task(self, rng):
        self.data.mocap_pos[0] = rng.uniform(GOAL_LOW, GOAL_HIGH)

    def evaluate(self):
        dist = float(np.linalg.norm(self.arm.ee_pose[:3] - self.data.mocap_pos[0]))
        return dist < TOLERANCE, False, -dist


class ReachExpert(ScriptedExpert):
    def reset(self, rng):
        super().reset(rng)
        self.speed = rng.uniform(0.4, 1.0)

    def act(self, obs):
        return self.toward(self.env.data.mocap_pos[0], speed=self.speed, noise=0.05)
