"""The sim arm: Cartesian impedance on the joint torque motors, gravity-compensated wrist wrench."""

import mujoco
import numpy as np
import pytest
from robot_rl.sim.arm import PandaArm
from robot_rl.sim.controller import ImpedanceGains
from robot_rl.sim.scene import build_cell


def _arm(stiffness: float):
    model = build_cell().compile()
    data = mujoco.MjData(model)
    arm = PandaArm(model, data, gains=ImpedanceGains(translational_stiffness=stiffness))
    arm.reset(gripper=1.0)
    mujoco.mj_forward(model, data)
    arm.sync_target()
    return model, data, arm


def _table_force(model, data, arm) -> np.ndarray:
    table = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, "table")
    total, f = np.zeros(3), np.zeros(6)
    for i in range(data.ncon):
        c = data.contact[i]
        if table in (c.geom1, c.geom2) and (c.geom1 in arm.tool_geoms or c.geom2 in arm.tool_geoms):
            mujoco.mj_contactForce(model, data, i, f)
            # mj_contactForce gives the force geom1 exerts on geom2 (normal from geom1 to geom2)
            sign = 1.0 if c.geom1 == table else -1.0
            total += sign * (c.frame.reshape(3, 3).T @ f[:3])
    return total


@pytest.mark.parametrize("stiffness", [1000.0, 600.0])
def test_pressing_one_cm_into_the_table_gives_stiffness_times_one_cm(stiffness):
    model, data, arm = _arm(stiffness)
    target = arm.target
    for z in np.linspace(target[2], 0.04, 8):  # come down in free space
        target[2] = z
        arm.run(target, 0.1)
    assert np.linalg.norm(_table_force(model, data, arm)) < 1e-6
    while np.linalg.norm(_table_force(model, data, arm)) < 0.05:  # find first contact
        target[2] -= 0.001
        arm.run(target, 0.05)
        assert target[2] > -0.05, "never touched the table"
    target[2] = arm.ee_pose[2] - 0.01  # 1 cm into the table
    for _ in range(15):
        arm.run(target, 0.1)
    normal = _table_force(model, data, arm)[2]
    expected = stiffness * 0.01
    assert abs(normal - expected) < 0.2 * expected, (normal, expected)
    # the wrist sensor sees the same push, upward in the world
    R = data.site_xmat[arm.ft_site].reshape(3, 3)
    assert abs((R @ arm.wrench()[:3])[2] - normal) < 0.1 * expected


def test_free_tool_reads_zero_wrench_and_tracks_targets():
    model, data, arm = _arm(1000.0)
    for _ in range(3):
        arm.run(arm.target, 0.1)
    assert np.allclose(arm.wrench(), 0.0, atol=0.05)
    target = arm.target
    target[:3] += [0.05, -0.05, -0.05]
    for _ in range(10):
        arm.run(target, 0.1)
    assert np.linalg.norm(arm.ee_pose[:3] - target[:3]) < 0.003
    # torques stay within the motors' limits
    assert np.all(np.abs(data.ctrl[arm.act]) <= model.actuator_ctrlrange[arm.act, 1] + 1e-9)
