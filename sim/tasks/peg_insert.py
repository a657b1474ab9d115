"""`peg_insert`: insert a held 24 mm square peg into a 26 mm square hole (2 mm clearance, no chamfer).

Contact-rich: the hole position is known only to a few millimetres, so the expert feels for the
hole with the wrist force-torque sensor and searches in a spiral while pressing lightly.
"""

from __future__ import annotations

import mujoco
import numpy as np
from robot_rl.sim.base import MASKS, FrankaTaskEnv
from robot_rl.sim.experts import ScriptedExpert

PEG_HALF = 0.012
PEG_HALF_LEN = 0.05
HOLE_HALF = 0.013  # 2 mm total clearance
HOLE_DEPTH = 0.04
BLOCK_HALF = 0.05
XY_LOW = np.array([0.42, -0.15])
XY_HIGH = np.array([0.58, 0.15])
INSERT_DEPTH = 0.02
PEG_ABOVE_PINCH = -0.005  # peg centre relative to the pinch point, in the grasp


class PegInsertEnv(FrankaTaskEnv):
    task_name = "peg_insert"
    mask = MASKS["xyz"]
    default_max_steps = 120
    objects = ("peg", "hole")
    initial_gripper = 1.0

    def build_task(self, cell: mujoco.MjSpec) -> None:
        peg = cell.worldbody.add_body(name="peg", pos=[0.5, 0, 0.3])
        peg.add_freejoint(name="peg")
        peg.add_geom(name="peg", type=mujoco.mjtGeom.mjGEOM_BOX, size=[PEG_HALF, PEG_HALF, PEG_HALF_LEN],
                     mass=0.05, rgba=[0.2, 0.4, 0.9, 1], friction=[0.8, 0.005, 0.0001])
        hole = cell.worldbody.add_body(name="hole", mocap=True, pos=[0.5, 0, 0])
        w = (BLOCK_HALF - HOLE_HALF) / 2
        for i, (x, y, sx, sy) in enumerate([
            (HOLE_HALF + w, 0, w, BLOCK_HALF), (-HOLE_HALF - w, 0, w, BLOCK_HALF),
            (0, HOLE_HALF + w, HOLE_HALF, w), (0, -HOLE_HALF - w, HOLE_HALF, w),
        ]):
            hole.add_geom(name=f"hole_wall{i}", type=mujoco.mjtGeom.mjGEOM_BOX, pos=[x, y, HOLE_DEPTH / 2],
                          size=[sx, sy, HOLE_DEPTH / 2], rgba=[0.55, 0.55, 0.6, 1], friction=[0.5, 0.005, 0.0001])

    def reset_task(self, rng):
        self.data.mocap_pos[0] = [*rng.uniform(XY_LOW, XY_HIGH), 0.0]

    def after_reset(self):
        """Put the peg between the open fingers and hold it there while they close on it."""
        m, d, arm = self.model, self.data, self.arm
        pinch = d.site_xpos[arm.ee_site]
        R = d.site_xmat[arm.ee_site].reshape(3, 3)
        yaw = np.arctan2(R[1, 0], R[0, 0])
        self.set_free_pose("peg", pinch + [0, 0, PEG_ABOVE_PINCH], [np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)])
        jnt = m.body_jntadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "peg")]
        qadr, dadr = m.jnt_qposadr[jnt], m.jnt_dofadr[jnt]
        held = d.qpos[qadr:qadr + 7].copy()
        arm.set_gripper(1.0)
        for _ in range(20):
            d.qpos[qadr:qadr + 7] = held
            d.qvel[dadr:dadr + 6] = 0.0
            arm.run(arm.target, 0.02)
        arm.run(arm.target, 0.1)

    @property
    def hole_top(self) -> np.ndarray:
        return self.data.mocap_pos[0] + [0, 0, HOLE_DEPTH]

    def evaluate(self):
        peg = self.object_poses()["peg"]
        top = self.hole_top
        bottom = peg[2] - PEG_HALF_LEN
        xy_err = float(np.linalg.norm(peg[:2] - top[:2]))
        inserted = bottom < top[2] - INSERT_DEPTH and xy_err < HOLE_HALF
        dropped = peg[2] < PEG_HALF_LEN + 0.002 and xy_err > BLOCK_HALF  # fell on the table
        return bool(inserted), bool(dropped), -xy_err - max(0.0, bottom - top[2])


class PegInsertExpert(ScriptedExpert):
    """Hover, descend until the wrench says contact, spiral-search while pressing, push in."""

    def reset(self, rng):
        super().reset(rng)
        self.gripper = 1.0
        self.estimate_err = rng.normal(0, 0.0015, 2)  # the expert's hole estimate is a few mm off
        self.theta = 0.0
        self.speed = rng.uniform(0.5, 1.0)

    def act(self, obs):
        env = self.env
        top = env.hole_top
        guess = top[:2] + self.estimate_err
        pinch_above = top[2] + PEG_HALF_LEN - PEG_ABOVE_PINCH + 0.02  # peg bottom 2 cm above the hole
        ee = self.ee
        force_z = -float(obs["state.wrench"][2])  # contact pushes up on the tool (sensor z points down)
        if self.phase == 0:
            goal = [*guess, pinch_above]
            if self.near(goal, 0.006):
                self.phase = 1
            return self.toward(goal, speed=self.speed)
        if self.phase == 1:  # descend slowly until contact or inserted
            if force_z > 3.0:
                self.phase = 2
            return self.toward([*guess, ee[2] - 0.02], speed=0.25)
        # spiral search pressing with ~5 N (target 5 mm below the measured pose)
        bottom = ee[2] + PEG_ABOVE_PINCH - PEG_HALF_LEN
        if bottom < top[2] - 0.003:  # dropped into the hole: push home
            return self.toward([*ee[:2], top[2] - 0.03], speed=0.3)
        self.theta += 0.6
        r = 0.0007 * self.theta / (2 * np.pi)
        xy = guess + r * np.array([np.cos(self.theta), np.sin(self.theta)])
        return self.toward([*xy, ee[2] - 0.005], speed=0.3)
