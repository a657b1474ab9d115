"""The simulated Panda: state readout (joints, end-effector pose, gripper, gravity-compensated wrench)
and the control loop that turns one absolute end-effector target per step into joint torques.

Used by the gymnasium tasks and, later, by `sim_world` behind the ROS arm/F-T/camera backends.
"""

from __future__ import annotations

import mujoco
import numpy as np
from robot_rl.sim.controller import CartesianImpedance, ImpedanceGains, reference_at
from robot_rl.sim.scene import ARM_JOINTS, EE_SITE, FT_SITE, GRIPPER_JOINT, GRIPPER_RANGE, HOME_QPOS, TOOL_BODY

from robot_rl.geometry import quat_to_rot


class PandaArm:
    """Indices, state and low-level control of the Panda inside one MjModel/MjData."""

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, controller_hz: float = 500.0,
                 gains: ImpedanceGains = ImpedanceGains()):
        self.m, self.d = model, data
        jid = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, j) for j in ARM_JOINTS]
        self.qadr = model.jnt_qposadr[jid]
        self.dadr = model.jnt_dofadr[jid]
        self.act = np.array([mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_ACTUATOR, f"actuator{i}")
                             for i in range(1, 8)])
        self.gripper_act = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_ACTUATOR, "fingers_actuator")
        self.gripper_qadr = model.jnt_qposadr[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, GRIPPER_JOINT)]
        self.ee_site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, EE_SITE)
        self.ft_site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, FT_SITE)
        self.tool_body = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, TOOL_BODY)
        self._ft_force = model.sensor_adr[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SENSOR, "ft_force")]
        self._ft_torque = model.sensor_adr[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SENSOR, "ft_torque")]
        self.tool_bodies = self._subtree(self.tool_body)
        self.tool_geoms = np.flatnonzero(np.isin(model.geom_bodyid, self.tool_bodies))
        self.controller = CartesianImpedance(model, data, self.ee_site, jid, self.act, HOME_QPOS, gains)
        ctrl_period = 1.0 / controller_hz
        self.substeps_per_tick = max(1, int(round(ctrl_period / model.opt.timestep)))
        self.controller_hz = 1.0 / (self.substeps_per_tick * model.opt.timestep)
        self._prev_target = np.zeros(7)
        self._target = np.zeros(7)

    def _subtree(self, root: int) -> np.ndarray:
        bodies = [root]
        for b in range(root + 1, self.m.nbody):
            if self.m.body_parentid[b] in bodies:
                bodies.append(b)
        return np.array(bodies)

    # ---- state ------------------------------------------------------------------------------
    @property
    def joint_pos(self) -> np.ndarray:
        return self.d.qpos[self.qadr].copy()

    @property
    def joint_vel(self) -> np.ndarray:
        return self.d.qvel[self.dadr].copy()

    @property
    def ee_pose(self) -> np.ndarray:
        q = np.zeros(4)
        mujoco.mju_mat2Quat(q, self.d.site_xmat[self.ee_site])
        if q[0] < 0:
            q = -q
        return np.concatenate([self.d.site_xpos[self.ee_site], q])

    @property
    def gripper(self) -> float:
        return float(np.clip(self.d.qpos[self.gripper_qadr] / GRIPPER_RANGE, 0.0, 1.0))

    def wrench(self) -> np.ndarray:
        """External force/torque on the tool in the sensor frame, with the tool's weight removed.

        MuJoCo's force/torque sensors give the force the parent exerts on the child subtree (the
        tool), in the site frame. Static balance of the tool, F_sensor + R^T m g + F_ext = 0, gives
        F_ext = -(F_sensor + R^T m g), likewise for torque about the site: a still, free tool reads zero.
        """
        d, m = self.d, self.m
        R = d.site_xmat[self.ft_site].reshape(3, 3)
        p = d.site_xpos[self.ft_site]
        mass = m.body_subtreemass[self.tool_body]
        com = d.subtree_com[self.tool_body]
        g_force = mass * m.opt.gravity
        f = d.sensordata[self._ft_force:self._ft_force + 3] + R.T @ g_force
        t = d.sensordata[self._ft_torque:self._ft_torque + 3] + R.T @ np.cross(com - p, g_force)
        return -np.concatenate([f, t])

    # ---- control ---------------------------------------------------------------------------
    @property
    def target(self) -> np.ndarray:
        """The commanded absolute end-effector target (xyz + wxyz)."""
        return self._target.copy()

    def reset(self, qpos: np.ndarray = HOME_QPOS, gripper: float = 0.0) -> None:
        """Place the arm (call before mj_forward) and reset the target to the measured pose."""
        self.d.qpos[self.qadr] = qpos
        self.d.qvel[self.dadr] = 0.0
        self.set_gripper(gripper)

    def sync_target(self) -> None:
        """Target := measured pose (episode start, or when control changes hands)."""
        self._target[:] = self.ee_pose
        self._prev_target[:] = self._target
        c = self.controller
        c.ref_pos[:] = self._target[:3]
        c.ref_quat[:] = self._target[3:]
        c.ref_vel[:] = 0.0

    def set_gripper(self, command: float) -> None:
        """command in [-1, 1]: -1 fully open, +1 fully closed (non-blocking)."""
        self.d.ctrl[self.gripper_act] = 255.0 * (np.clip(command, -1.0, 1.0) + 1.0) / 2.0

    def run(self, target: np.ndarray, duration: float, latency: float = 0.0, settle: bool = True) -> None:
        """Track `target` for `duration` seconds: the reference moves linearly from the previous
        target over the step (interpolation at the controller rate); `latency` delays the switch.
        `settle`: the reference velocity drops to zero on the last tick (the target's time has come);
        sim_world passes False for a tick that is only part of the way to a target."""
        m, d, c = self.m, self.d, self.controller
        self._prev_target[:] = self._target
        self._target[:] = target
        tick = self.substeps_per_tick * m.opt.timestep
        n_ticks = max(1, int(round(duration / tick)))
        n_lat = int(round(latency / tick))
        p0, p1 = self._prev_target[:3], self._target[:3]
        q0 = self._prev_target[3:].copy()
        dr = (quat_to_rot(self._target[3:]) * quat_to_rot(q0).inv()).as_rotvec()
        angle = float(np.linalg.norm(dr))
        axis = dr / angle if angle > 1e-9 else np.array([1.0, 0.0, 0.0])
        move_ticks = max(1, n_ticks - n_lat)
        vel = np.concatenate([p1 - p0, dr]) / (move_ticks * tick)
        for k in range(n_ticks):
            if k >= n_lat:
                a = min(1.0, (k - n_lat + 1) / move_ticks)
                reference_at(a, p0, p1, q0, axis, angle, c.ref_pos, c.ref_quat)
                c.ref_vel[:] = vel if a < 1.0 or not settle else 0.0
            mujoco.mj_step1(m, d)
            c.compute()
            mujoco.mj_step2(m, d)
            for _ in range(self.substeps_per_tick - 1):
                mujoco.mj_step(m, d)

