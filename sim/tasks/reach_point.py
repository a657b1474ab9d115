"""`reach_point`: bring the tool centre point to a fixed point of the cell from a random start. No
sim-only key: the goal is part of the task (`goal`), as it is on a robot cell whose hardware config
names the same point (`reward: {kind: reach, goal: ...}`), so a policy reading only the arm state
runs on the hardware unchanged — the hardware path of RL fine-tuning (`robot-rl finetune
actor=ros` against a Franka, or `franka-sim`)."""

from __future__ import annotations

import numpy as np
from robot_rl.sim.base import MASKS
from robot_rl.sim.tasks.reach import ReachEnv

GOAL = (0.5, 0.1, 0.25)
START_LOW, START_HIGH = np.array([0.38, -0.12, 0.30]), np.array([0.48, 0.06, 0.42])


class ReachPointEnv(ReachEnv):
    task_name = "reach_point"
    mask = MASKS["xyz"]
    default_max_steps = 50
    objects = ()

    def __init__(self, *args, goal=GOAL, **setup):
        self.goal = np.asarray(list(goal), dtype=np.float64).reshape(3)  # (a Hydra list too)
        super().__init__(*args, **setup)

    def reset_task(self, rng):
        self.data.mocap_pos[0] = self.goal
        self._start = rng.uniform(START_LOW, START_HIGH)

    def after_reset(self):
        """Bring the tool to its random start under impedance control (a robot starts from its home
        pose: the start box contains it)."""
        self.drive_tool_to(self._start)
