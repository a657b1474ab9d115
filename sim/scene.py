"""The MuJoCo robot cell: Franka Panda (MuJoCo Menagerie model shipped by `gym-hil`), table,
front and wrist cameras, wrist force-torque sensor. Tasks add their objects to this spec.

The Panda model (Apache-2.0, MuJoCo Menagerie) is read from the installed `gym_hil` package;
its 7 joints have torque motors, the Robotiq 2F-85 a position-like tendon actuator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mujoco
import numpy as np

HOME_QPOS = np.array([0.0, -0.4, 0.0, -2.2, 0.0, 1.8, 0.785])
TABLE_TOP_Z = 0.0
EE_SITE = "pinch"
FT_SITE = "attachment_site"
TOOL_BODY = "base_mount"  # everything below the F/T sensor
ARM_JOINTS = tuple(f"joint{i}" for i in range(1, 8))
GRIPPER_JOINT = "right_driver_joint"
GRIPPER_RANGE = 0.8  # driver joint travel (rad), open .. closed


def panda_xml_path() -> str:
    try:
        import gym_hil
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError("the Panda model comes from the 'gym-hil' package: pip install gym-hil") from e
    path = os.path.join(os.path.dirname(gym_hil.__file__), "assets", "panda.xml")
    if not os.path.exists(path):
        raise RuntimeError(f"gym-hil is installed but {path} is missing; reinstall gym-hil")
    return path


def look_at_quat(pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """MuJoCo camera quaternion (wxyz) looking from pos at target with world z up."""
    fwd = np.asarray(target, float) - np.asarray(pos, float)
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    mat = np.stack([right, up, -fwd], axis=1)  # camera looks along its -z
    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, mat.flatten())
    return q


@dataclass(frozen=True)
class CellConfig:
    timestep: float = 0.001
    front_cam_pos: tuple[float, float, float] = (1.45, 0.0, 0.95)
    front_cam_target: tuple[float, float, float] = (0.35, 0.0, 0.28)
    front_fovy: float = 50.0
    wrist_fovy: float = 60.0


def build_cell(cfg: CellConfig = CellConfig()) -> mujoco.MjSpec:
    """The shared robot cell as an editable MjSpec (tasks add objects, then compile)."""
    spec = mujoco.MjSpec.from_file(panda_xml_path())
    spec.modelname = "robot_rl_cell"
    opt = spec.option
    opt.timestep = cfg.timestep
    opt.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    opt.cone = mujoco.mjtCone.mjCONE_ELLIPTIC
    opt.impratio = 10.0
    spec.visual.global_.offwidth = 1280
    spec.visual.global_.offheight = 960
    spec.visual.quality.offsamples = 0  # software GL here: MSAA costs ~40 % per frame
    spec.visual.headlight.ambient = [0.4, 0.4, 0.4]
    spec.visual.headlight.diffuse = [0.5, 0.5, 0.5]

    wb = spec.worldbody
    wb.add_light(name="key", pos=[0.4, -0.6, 1.6], dir=[0.0, 0.4, -1.0], diffuse=[0.7, 0.7, 0.7],
                 castshadow=False)
    wb.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[3, 3, 0.01], pos=[0, 0, -0.75],
                rgba=[0.25, 0.3, 0.35, 1], contype=0, conaffinity=0)
    table = wb.add_body(name="table", pos=[0.45, 0.0, TABLE_TOP_Z - 0.025])
    table.add_geom(name="table", type=mujoco.mjtGeom.mjGEOM_BOX, size=[0.55, 0.6, 0.025],
                   rgba=[0.62, 0.55, 0.45, 1], friction=[1.0, 0.005, 0.0001])
    spec.add_exclude(bodyname1="link0", bodyname2="table")
    spec.add_exclude(bodyname1="link1", bodyname2="table")

    cam_pos = np.array(cfg.front_cam_pos)
    wb.add_camera(name="front", pos=cam_pos, quat=look_at_quat(cam_pos, np.array(cfg.front_cam_target)),
                  fovy=cfg.front_fovy)
    attachment = spec.body("attachment")
    attachment.add_camera(name="wrist", pos=[-0.09, 0.0, 0.02], quat=_wrist_cam_quat(), fovy=cfg.wrist_fovy)
    spec.add_sensor(name="ft_force", type=mujoco.mjtSensor.mjSENS_FORCE,
                    objtype=mujoco.mjtObj.mjOBJ_SITE, objname=FT_SITE)
    spec.add_sensor(name="ft_torque", type=mujoco.mjtSensor.mjSENS_TORQUE,
                    objtype=mujoco.mjtObj.mjOBJ_SITE, objname=FT_SITE)
    return spec


def _wrist_cam_quat() -> np.ndarray:
    # Looks along the tool axis (+z of the attachment frame), tilted to see the fingertips.
    mat = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # image x/y in the flange plane
    tilt = np.deg2rad(20.0)
    rx = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    flip = np.diag([1.0, -1.0, -1.0])  # camera -z = tool +z
    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, (mat @ flip @ rx).flatten())
    return q
