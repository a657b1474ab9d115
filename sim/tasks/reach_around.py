"""`reach_around`: carry the tool from one side of a post to a goal on the other side, passing either
in front of the post or behind it. Two distinct solutions; touching the post fails the episode.
`info["solution"]` says which way the episode went ("front" / "behind"), once it has crossed.

The start is centred on the post's axis and the expert approaches the post straight before it picks
a side, so the state where it chooses (and the motion leading there) is the same for both solutions:
a policy that averages its demonstrations is sent straight into the post."""

from __future__ import annotations

import mujoco
import numpy as np
from robot_rl.sim.base import MASKS, FrankaTaskEnv, Workspace
from robot_rl.sim.experts import ScriptedExpert

POST_CENTER = np.array([0.5, 0.0])
POST_HALF = np.array([0.06, 0.05, 0.11])
START_LOW, START_HIGH = np.array([0.49, -0.26, 0.07]), np.array([0.51, -0.22, 0.11])
DECIDE_Y = -0.14  # the expert approaches the post straight to here, then steps aside
GOAL_LOW, GOAL_HIGH = np.array([0.46, 0.17, 0.06]), np.array([0.54, 0.23, 0.12])
TOLERANCE = 0.025


class ReachAroundEnv(FrankaTaskEnv):
    task_name = "reach_around"
    mask = MASKS["xyz"]
    default_max_steps = 60
    objects = ("goal", "post")
    workspace = Workspace(low=(0.28, -0.3, 0.04), high=(0.72, 0.3, 0.15))  # too low to pass over the post

    def build_task(self, cell: mujoco.MjSpec) -> None:
        goal = cell.worldbody.add_body(name="goal", mocap=True, pos=[0.5, 0.2, 0.1])
        goal.add_geom(type=mujoco.mjtGeom.mjGEOM_SPHERE, size=[TOLERANCE, 0, 0], rgba=[0.1, 0.9, 0.2, 0.6],
                      contype=0, conaffinity=0)
        post = cell.worldbody.add_body(name="post", pos=[*POST_CENTER, POST_HALF[2]])
        post.add_geom(name="post", type=mujoco.mjtGeom.mjGEOM_BOX, size=POST_HALF, rgba=[0.9, 0.6, 0.1, 1])

    def reset_task(self, rng):
        self.data.mocap_pos[0] = rng.uniform(GOAL_LOW, GOAL_HIGH)
        self._start = rng.uniform(START_LOW, START_HIGH)
        self._solution = None
        self._prev_y = None

    def after_reset(self):
        """Bring the tool to its start pose on the near side of the post, under impedance control."""
        self.drive_tool_to(self._start)
        arm = self.arm
        self._post_geoms = self.body_geoms("post")
        self._robot_geoms = np.flatnonzero(self.model.geom_bodyid > 0)
        self._robot_geoms = self._robot_geoms[~np.isin(self._robot_geoms, self._post_geoms)]
        self._prev_y = arm.ee_pose[1]

    def evaluate(self):
        ee = self.arm.ee_pose[:3]
        if self._solution is None and self._prev_y is not None and self._prev_y < POST_CENTER[1] <= ee[1]:
            self._solution = "front" if ee[0] < POST_CENTER[0] else "behind"
        self._prev_y = ee[1]
        dist = float(np.linalg.norm(ee - self.data.mocap_pos[0]))
        hit = self.geom_contact(self._post_geoms, self._robot_geoms)
        return dist < TOLERANCE and not hit, hit, -dist

    def task_info(self):
        return {"solution": getattr(self, "_solution", None)}


class ReachAroundExpert(ScriptedExpert):
    """Approach the post straight, pick a side at random (50/50) there, step aside, pass the post
    and go to the goal."""

    def reset(self, rng):
        super().reset(rng)
        self.side = rng.choice(["front", "behind"])
        clear = rng.uniform(0.06, 0.1)
        self.x_side = POST_CENTER[0] + (-1 if self.side == "front" else 1) * (POST_HALF[0] + clear)
        self.speed = rng.uniform(0.5, 0.9)
        self.decide: list[float] | None = None  # straight ahead of the start, set on the first step

    def act(self, obs):
        goal = self.env.data.mocap_pos[0]
        if self.decide is None:
            self.decide = [self.ee[0], DECIDE_Y, self.ee[2]]
        wps = [self.decide, [self.x_side, DECIDE_Y, goal[2]], [self.x_side, 0.12, goal[2]], goal]
        wp = wps[min(self.phase, 3)]
        if self.phase < 3 and self.near(wp, 0.02 if self.phase == 0 else 0.03):
            self.phase += 1
        return self.toward(wp, speed=self.speed, noise=0.03)
