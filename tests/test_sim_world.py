"""`SimWorld` (the sim behind the ROS graph) executes absolute time-stamped targets exactly as the
gymnasium env executes delta actions: same trajectory to floating-point precision, whether targets
come one per step or a whole chunk at once (the executor's way)."""

from __future__ import annotations

import numpy as np
import pytest
from robot_rl.sim.registry import make_env
from robot_rl.sim.world import SimWorld

from robot_rl.executor import ChunkExecutor
from robot_rl.geometry import action_to_delta
from robot_rl.hardware import load_hardware_config


@pytest.mark.parametrize("chunk", [1, 8])
def test_sim_world_matches_env_step_for_targets_one_by_one_and_in_chunks(tmp_path, chunk):
    cfg = load_hardware_config("sim")
    env = make_env("lift")  # xyz, yaw and gripper all in use
    env.reset(seed=5)
    world = SimWorld(task="lift", link_dir=tmp_path / "link", mode="lockstep", cameras=(), limits=cfg.safety_limits(),
                     seed=5)
    ex = ChunkExecutor(cfg.safety.workspace_low, cfg.safety.workspace_high, dt=0.1)
    ex.reset(world.env.arm.ee_pose)
    actions = np.sign(np.random.default_rng(0).uniform(-1, 1, (24, 7)))  # saturated: fastest motions
    errors = []
    try:
        for c in range(0, len(actions), chunk):
            part = actions[c:c + chunk]
            for stamp, pose, gripper in ex.execute(world.t, [action_to_delta(a, env._scale, env.mask) for a in part],
                                                   world.t):
                assert world.add_target(stamp, pose, gripper) == ""
            for a in part:
                env.step(a)
                for _ in range(10):  # one policy step = 10 ticks at the 100 Hz command rate
                    world.tick()
                errors.append(np.abs(world.env.arm.ee_pose - env.arm.ee_pose).max())
    finally:
        world.close()
        env.close()
    assert max(errors) < 1e-6, f"sim_world drifted from env.step by {max(errors):.2e}"  # rounding only


def test_a_chunk_planned_ahead_composes_from_the_target_at_its_observation_time():
    from robot_rl.geometry import apply_delta

    ex = ChunkExecutor((0.0, -1.0, 0.0), (1.0, 1.0, 1.0), dt=0.1)
    start = np.array([0.5, 0.0, 0.3, 0.0, 1.0, 0.0, 0.0])
    ex.reset(start)
    step = (np.array([0.01, 0.0, 0.0]), np.zeros(3), None)
    first = ex.execute(0.0, [step] * 8, now=0.0)
    assert [round(t, 3) for t, _, _ in first] == [round(0.1 * k, 3) for k in range(1, 9)]
    # planned one step early, from the observation at 0.7: composes on the target stamped 0.7
    up = (np.array([0.0, 0.0, 0.01]), np.zeros(3), None)
    second = ex.execute(0.7, [up] * 8, now=0.7)
    np.testing.assert_allclose(second[0][1], apply_delta(first[6][1], *up[:2]))
    assert round(second[0][0], 3) == 0.8 and [round(t, 3) for t, *_ in ex.history][-8:] == [
        round(0.7 + 0.1 * k, 3) for k in range(1, 9)], "the new plan replaces the old tail"


def test_temporal_ensembling_averages_overlapping_chunks_with_exponential_weights():
    """ACT's rule: a target time predicted by several chunks gets their weighted mean, prediction i
    (0 = oldest) weighted exp(-m i); the ensembled target is sent and later chunks start from it."""
    start = np.array([0.5, 0.0, 0.3, 1.0, 0.0, 0.0, 0.0])
    east, north = (np.array([0.01, 0.0, 0.0]), np.zeros(3), 0.0), (np.array([0.0, 0.01, 0.0]), np.zeros(3), 1.0)
    replace = ChunkExecutor((0.0, -1.0, 0.0), (1.0, 1.0, 1.0), dt=0.1)
    m = 0.5
    ens = ChunkExecutor((0.0, -1.0, 0.0), (1.0, 1.0, 1.0), dt=0.1, ensemble_decay=m)
    for ex in (replace, ens):
        ex.reset(start)
        ex.execute(0.0, [east] * 4, now=0.0)  # targets at 0.1 .. 0.4
    second = ens.execute(0.2, [north] * 4, now=0.2)  # 0.3 .. 0.6; 0.3 and 0.4 overlap the first chunk
    plain = replace.execute(0.2, [north] * 4, now=0.2)
    assert [round(t, 3) for t, _, _ in second] == [0.3, 0.4, 0.5, 0.6]
    a = np.exp(-m) / (1 + np.exp(-m))  # the newer prediction's share
    first_03, first_04 = start[:3] + [0.03, 0, 0], start[:3] + [0.04, 0, 0]
    np.testing.assert_allclose(second[0][1][:3], (1 - a) * first_03 + a * plain[0][1][:3])
    np.testing.assert_allclose(second[1][1][:3], (1 - a) * first_04 + a * plain[1][1][:3])
    assert second[0][2] == pytest.approx(a), "the gripper is averaged too"
    np.testing.assert_allclose(second[2][1], plain[2][1]), "no earlier prediction: the chunk's own target"
    # a third chunk overlapping both: the first two predictions carry weights 1 and e^-m, the third e^-2m
    third = ens.execute(0.3, [east] * 4, now=0.3)
    assert third[0][0] == pytest.approx(0.4) and 0 < third[0][2] < a, "three predictions of the gripper at 0.4"
    assert (ens.ensembled, replace.ensembled) == (2 + 3, 0)
    # rotations interpolate on SO(3): half-way between two yaws is the mean yaw
    rot = ChunkExecutor((0.0, -1.0, 0.0), (1.0, 1.0, 1.0), dt=0.1, ensemble_decay=0.0)
    rot.reset(start)
    rot.execute(0.0, [(np.zeros(3), np.array([0.0, 0.0, 0.2]), None)] * 2, now=0.0)
    blended = rot.execute(0.1, [(np.zeros(3), np.zeros(3), None)], now=0.1)  # yaw 0.4 (old) vs 0.2 (new) at 0.2
    from robot_rl.geometry import quat_to_rot
    assert quat_to_rot(blended[0][1][3:]).as_rotvec()[2] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="ensemble_decay"):
        ChunkExecutor((0.0, -1.0, 0.0), (1.0, 1.0, 1.0), dt=0.1, ensemble_decay=-1.0)


def test_lockstep_waits_for_targets_but_runs_on_while_the_arm_holds_on_request(tmp_path):
    world = SimWorld(task="reach", link_dir=tmp_path / "link", mode="lockstep", cameras=(), seed=1)
    try:
        world.handle({"op": "start"})
        assert not world._lockstep_ready(), "at the episode start lock-step waits for the first target"
        world.handle({"op": "hold"})  # /arm/hold, the safety filter, a refused target
        assert world._lockstep_ready() and world.holding
        t0, pose = world.t, world.env.arm.ee_pose
        for _ in range(20):
            world.tick()
        assert world.t == pytest.approx(t0 + 0.2) and np.abs(world.env.arm.ee_pose[:3] - pose[:3]).max() < 2e-3
        assert world.add_target(world.t + 0.1, pose, None) == "" and not world.hold_requested, "a target resumes"
        world.handle({"op": "stop"})
        assert not world._lockstep_ready() or world.targets.ready(world.t, world.h)
        world.handle({"op": "hold"})
        assert not world.hold_requested, "between episodes a hold does not run the clock"
    finally:
        world.close()
