"""Cartesian impedance controller on the Panda's joint torque motors, run at the controller rate
inside the physics loop (between mj_step1 and mj_step2, so kinematics are computed once).

    tau = J^T (K e - D (J qd - v_ref)) + c(q, qd) + (I - J^T J^{+T}) (k_n (q_0 - q) - d_n qd)

e is the pose error to the interpolated reference (clipped to a few cm / tenths of a rad, the
reference limiting real Franka stacks use), c is gravity + Coriolis (MuJoCo's qfrc_bias), the
last term a posture task in the null space. Torques are clipped to the motor limits. The law is
compiled with numba: the geometric Jacobian of a serial hinge chain is built from MuJoCo's joint
axes and anchors, so one control tick costs a few microseconds next to a ~15 µs physics step.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numba
import numpy as np


@dataclass(frozen=True)
class ImpedanceGains:
    translational_stiffness: float = 1000.0  # N/m
    rotational_stiffness: float = 60.0  # Nm/rad
    damping_ratio: float = 1.0
    nullspace_stiffness: float = 10.0
    max_pos_error: float = 0.03  # m: reference limiting
    max_rot_error: float = 0.3  # rad


@numba.njit(cache=True, fastmath=False)
def _quat_mul(a, b):
    return np.array([
        a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3],
        a[0] * b[1] + a[1] * b[0] + a[2] * b[3] - a[3] * b[2],
        a[0] * b[2] - a[1] * b[3] + a[2] * b[0] + a[3] * b[1],
        a[0] * b[3] + a[1] * b[2] - a[2] * b[1] + a[3] * b[0],
    ])


@numba.njit(cache=True)
def reference_at(alpha, p0, p1, q0, axis, angle, ref_pos, ref_quat):
    """Interpolated reference: translation linear, rotation along the geodesic from q0."""
    for i in range(3):
        ref_pos[i] = p0[i] + alpha * (p1[i] - p0[i])
    h = 0.5 * alpha * angle
    s = np.sin(h)
    dq = np.array([np.cos(h), axis[0] * s, axis[1] * s, axis[2] * s])
    ref_quat[:] = _quat_mul(dq, q0)


@numba.njit(cache=True)
def impedance_torque(xanchor, xaxis, jnt, site_pos, site_mat, qpos, qvel, bias, qadr, dadr,
                     ref_pos, ref_quat, ref_vel, K, D, kn, dn, q_post, max_pos, max_rot, lo, hi, out):
    n = jnt.shape[0]
    J = np.zeros((6, n))
    for j in range(n):
        a = xaxis[jnt[j]]
        r = site_pos - xanchor[jnt[j]]
        J[0, j] = a[1] * r[2] - a[2] * r[1]
        J[1, j] = a[2] * r[0] - a[0] * r[2]
        J[2, j] = a[0] * r[1] - a[1] * r[0]
        J[3, j] = a[0]
        J[4, j] = a[1]
        J[5, j] = a[2]
    e = np.empty(6)
    for i in range(3):
        e[i] = min(max(ref_pos[i] - site_pos[i], -max_pos), max_pos)
    # current orientation quaternion from the site matrix (row-major 3x3)
    m = site_mat
    tr = m[0] + m[4] + m[8]
    q = np.empty(4)
    if tr > 0:
        s = np.sqrt(tr + 1.0) * 2
        q[0] = 0.25 * s
        q[1] = (m[7] - m[5]) / s
        q[2] = (m[2] - m[6]) / s
        q[3] = (m[3] - m[1]) / s
    elif m[0] > m[4] and m[0] > m[8]:
        s = np.sqrt(1.0 + m[0] - m[4] - m[8]) * 2
        q[0] = (m[7] - m[5]) / s
        q[1] = 0.25 * s
        q[2] = (m[1] + m[3]) / s
        q[3] = (m[2] + m[6]) / s
    elif m[4] > m[8]:
        s = np.sqrt(1.0 + m[4] - m[0] - m[8]) * 2
        q[0] = (m[2] - m[6]) / s
        q[1] = (m[1] + m[3]) / s
        q[2] = 0.25 * s
        q[3] = (m[5] + m[7]) / s
    else:
        s = np.sqrt(1.0 + m[8] - m[0] - m[4]) * 2
        q[0] = (m[3] - m[1]) / s
        q[1] = (m[2] + m[6]) / s
        q[2] = (m[5] + m[7]) / s
        q[3] = 0.25 * s
    qc = np.array([q[0], -q[1], -q[2], -q[3]])
    qe = _quat_mul(ref_quat, qc)
    if qe[0] < 0:
        qe = -qe
    vn = np.sqrt(qe[1] ** 2 + qe[2] ** 2 + qe[3] ** 2)
    ang = 2.0 * np.arctan2(vn, qe[0])
    for i in range(3):
        rv = qe[i + 1] / vn * ang if vn > 1e-12 else 0.0
        e[3 + i] = min(max(rv, -max_rot), max_rot)
    qd = np.empty(n)
    for j in range(n):
        qd[j] = qvel[dadr[j]]
    v = J @ qd
    f = K * e - D * (v - ref_vel)
    tau_ns = np.empty(n)
    for j in range(n):
        tau_ns[j] = kn * (q_post[j] - qpos[qadr[j]]) - dn * qd[j]
    JJt = J @ J.T
    for i in range(6):
        JJt[i, i] += 1e-4
    jpinv_t = np.linalg.solve(JJt, J)
    tau = J.T @ f + tau_ns - J.T @ (jpinv_t @ tau_ns)  # null-space projection of the posture task
    for j in range(n):
        t = tau[j] + bias[dadr[j]]
        out[j] = min(max(t, lo[j]), hi[j])


class CartesianImpedance:
    """Impedance law for one serial hinge arm. Set `ref_*`, then call `compute(d)` each tick."""

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, site_id: int, joint_ids: np.ndarray,
                 act_ids: np.ndarray, q_posture: np.ndarray, gains: ImpedanceGains = ImpedanceGains()):
        self.m, self.d = model, data
        self.site = site_id
        self.jnt = np.asarray(joint_ids, dtype=np.int64)
        self.qadr = model.jnt_qposadr[self.jnt].astype(np.int64)
        self.dadr = model.jnt_dofadr[self.jnt].astype(np.int64)
        self.act = np.asarray(act_ids)
        self.q_posture = np.asarray(q_posture, float)
        self.set_gains(gains)
        self._lo = model.actuator_ctrlrange[self.act, 0].copy()
        self._hi = model.actuator_ctrlrange[self.act, 1].copy()
        self._tau = np.zeros(len(self.jnt))
        self.ref_pos = np.zeros(3)
        self.ref_quat = np.array([1.0, 0, 0, 0])
        self.ref_vel = np.zeros(6)
        # cached views into MjData (valid for the life of `data`)
        self._views = (data.xanchor, data.xaxis, data.site_xpos[site_id], data.site_xmat[site_id],
                       data.qpos, data.qvel, data.qfrc_bias)
        self._ctrl = data.ctrl

    def set_gains(self, g: ImpedanceGains) -> None:
        self.gains = g
        self.K = np.array([g.translational_stiffness] * 3 + [g.rotational_stiffness] * 3)
        self.D = 2.0 * g.damping_ratio * np.sqrt(self.K)
        self.kn = float(g.nullspace_stiffness)
        self.dn = 2.0 * np.sqrt(g.nullspace_stiffness)

    def compute(self) -> None:
        """Write joint torques into data.ctrl. Needs kinematics computed (after mj_step1)."""
        xanchor, xaxis, spos, smat, qpos, qvel, bias = self._views
        g = self.gains
        impedance_torque(xanchor, xaxis, self.jnt, spos, smat, qpos, qvel, bias, self.qadr, self.dadr,
                         self.ref_pos, self.ref_quat, self.ref_vel, self.K, self.D, self.kn, self.dn,
                         self.q_posture, g.max_pos_error, g.max_rot_error, self._lo, self._hi, self._tau)
        self._ctrl[self.act] = self._tau
