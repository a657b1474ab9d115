"""Pose algebra shared by the sim env, the action executor and teleop: the target-update rule.

Quaternions are wxyz (MuJoCo, ROS order differs: convert at the node boundary).
ARCHITECTURE.md, action semantics: `target_t = target_{t-1} ∘ Δ_t`, translation added in the
base frame, rotation vector applied on the left (base frame).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def quat_to_rot(q_wxyz: np.ndarray) -> Rotation:
    return Rotation.from_quat(np.asarray(q_wxyz, dtype=np.float64), scalar_first=True)


def rot_to_quat(r: Rotation) -> np.ndarray:
    q = r.as_quat(scalar_first=True)
    return q if q[0] >= 0 else -q  # canonical hemisphere: w >= 0


# Lean quaternion algebra for the 1 kHz control loop (drivers/franka.py) and the target interpolation it
# runs every cycle (drivers/targets.py): scipy's Rotation costs 20-80 µs a call in object overhead, and a
# torque law built on it took 0.9 ms of its 1 ms cycle on a slow 2-core host (the loop fell behind the
# robot's state stream, 20 lost cycles, a communication reflex). Same conventions as above (wxyz, w >= 0);
# tests/test_drivers.py checks each against scipy.


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The Hamilton product a ⊗ b (rotation b, then a), wxyz."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw])


def quat_conj(q: np.ndarray) -> np.ndarray:
    """The inverse of a unit quaternion."""
    return np.array([q[0], -q[1], -q[2], -q[3]])


def quat_log(q: np.ndarray) -> np.ndarray:
    """The rotation vector of a unit quaternion (the shorter way round: angle <= pi)."""
    w, v = (q[0], q[1:]) if q[0] >= 0 else (-q[0], -q[1:])
    n = float(np.sqrt(v @ v))
    return v * (2.0 * np.arctan2(n, w) / n) if n > 1e-12 else 2.0 * v


def quat_exp(rotvec: np.ndarray) -> np.ndarray:
    """The unit quaternion of a rotation vector (w >= 0 for angles <= pi)."""
    a = float(np.sqrt(rotvec @ rotvec))
    k = np.sin(0.5 * a) / a if a > 1e-12 else 0.5
    return np.array([np.cos(0.5 * a), *(k * np.asarray(rotvec))])


def mat_to_quat(m: np.ndarray) -> np.ndarray:
    """A rotation matrix's unit quaternion, wxyz with w >= 0 (Shepperd's method: the largest of the four
    squared components first, so it stays accurate near 180°)."""
    t = m[0, 0] + m[1, 1] + m[2, 2]
    i = int(np.argmax([t, m[0, 0], m[1, 1], m[2, 2]]))
    if i == 0:
        r = np.sqrt(1.0 + t)
        q = np.array([0.5 * r, (m[2, 1] - m[1, 2]) / (2 * r), (m[0, 2] - m[2, 0]) / (2 * r), (m[1, 0] - m[0, 1]) / (2 * r)])
    elif i == 1:
        r = np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = np.array([(m[2, 1] - m[1, 2]) / (2 * r), 0.5 * r, (m[0, 1] + m[1, 0]) / (2 * r), (m[0, 2] + m[2, 0]) / (2 * r)])
    elif i == 2:
        r = np.sqrt(1.0 - m[0, 0] + m[1, 1] - m[2, 2])
        q = np.array([(m[0, 2] - m[2, 0]) / (2 * r), (m[0, 1] + m[1, 0]) / (2 * r), 0.5 * r, (m[1, 2] + m[2, 1]) / (2 * r)])
    else:
        r = np.sqrt(1.0 - m[0, 0] - m[1, 1] + m[2, 2])
        q = np.array([(m[1, 0] - m[0, 1]) / (2 * r), (m[0, 2] + m[2, 0]) / (2 * r), (m[1, 2] + m[2, 1]) / (2 * r), 0.5 * r])
    q /= np.sqrt(q @ q)
    return q if q[0] >= 0 else -q


def apply_delta(pose: np.ndarray, delta_pos: np.ndarray, delta_rotvec: np.ndarray) -> np.ndarray:
    """Compose a delta onto an absolute pose (xyz + wxyz): the target-update rule."""
    out = np.empty(7)
    out[:3] = pose[:3] + delta_pos
    out[3:] = rot_to_quat(Rotation.from_rotvec(delta_rotvec) * quat_to_rot(pose[3:]))
    return out


def pose_error(target: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(translation, rotation vector) taking `current` to `target`, both in the base frame."""
    dr = quat_to_rot(target[3:]) * quat_to_rot(current[3:]).inv()
    return target[:3] - current[:3], dr.as_rotvec()


def delta_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 6-D delta (xyz, rotvec) with apply_delta(a, *delta) == b."""
    dp, dr = pose_error(b, a)
    return np.concatenate([dp, dr])


def delta_to_action(delta: np.ndarray, gripper: float | None, scale, mask) -> tuple[np.ndarray, bool]:
    """Inverse of action_to_delta: a 6-D delta (xyz, rotvec) and a gripper command → the normalised
    ee_delta action (masked axes 0), and whether it had to be clipped to [-1, 1]."""
    m = np.asarray(mask, dtype=bool)
    a = np.zeros(7)
    a[:6] = np.asarray(delta, dtype=np.float64)[:6] / np.asarray(scale, dtype=np.float64)[:6]
    a[6] = 0.0 if gripper is None else float(gripper)
    a = np.where(m, a, 0.0)
    clipped = bool(np.any(np.abs(a) > 1.0 + 1e-6))
    return np.clip(a, -1.0, 1.0), clipped


def action_to_delta(action, scale, mask) -> tuple[np.ndarray, np.ndarray, float | None]:
    """A normalised ee_delta action → (Δxyz m, Δrotvec rad, gripper command or None): clipped to
    [-1, 1], masked, scaled. The sim env and the action executor both use it, so they agree exactly."""
    a = np.clip(np.asarray(action, dtype=np.float64).reshape(7), -1.0, 1.0) * np.asarray(mask, dtype=float)
    delta = a[:6] * np.asarray(scale, dtype=np.float64)[:6]
    return delta[:3], delta[3:], (float(a[6]) if mask[6] else None)
