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
