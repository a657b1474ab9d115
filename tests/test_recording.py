"""The recorder's step alignment (robot_rl.recording): observations by stamp with late samples
counted, executed actions that replay to the same targets, proposed actions, intervention flags,
rewards; the RLIF reward and HIL-SERL segments derived from the flags."""

from __future__ import annotations

from collections import deque

import numpy as np

from robot_rl.geometry import action_to_delta, apply_delta
from robot_rl.recording import StepAssembler
from robot_rl.store.sampler import intervention_segments, rlif_rewards

DT = 0.1
SCALE = (0.05, 0.05, 0.05, 0.25, 0.25, 0.25)
MASK = (True, True, True, False, False, False, True)
DOWN = np.array([0.5, 0.0, 0.2, 0.0, 1.0, 0.0, 0.0])


def assembler(t0: float = 10.0):
    obs = {"state.ee_pose": deque(), "image.front": deque()}
    tol = {"state.ee_pose": 0.006, "image.front": 1 / 60}
    return obs, StepAssembler(t0, DT, obs, tol, SCALE, MASK, DOWN, start_gripper=-1.0)


def feed_obs(obs, t0: float, t1: float, skip_frames=()) -> None:
    for i in range(int(round((t1 - t0) * 100)) + 1):
        t = round(t0 + i * 0.01, 9)
        obs["state.ee_pose"].append((t, np.array([t, 0, 0, 1, 0, 0, 0], np.float32)))
    for i in range(int(round((t1 - t0) * 30)) + 1):
        if i not in skip_frames:
            t = round(t0 + i / 30, 9)
            obs["image.front"].append((t, np.full((2, 2, 3), i, np.uint8)))


def test_steps_wait_for_the_arm_state_to_pass_the_step_end_and_count_late_frames():
    obs, asm = assembler()
    feed_obs(obs, 10.0, 10.25, skip_frames=(3,))  # the frame due at step 1 (t = 10.1) never came
    steps = asm.ready_steps(measured_until=10.25)
    assert [round(s.stamp, 3) for s in steps] == [10.0, 10.1]  # step 2 ends at 10.3: not yet
    assert steps[0].obs["image.front"][0, 0, 0] == 0
    assert steps[1].obs["image.front"][0, 0, 0] == 2  # the older frame, counted as dropped
    assert asm.dropped == {"image.front": 1}
    assert np.isclose(steps[1].obs["state.ee_pose"][0], 10.1)


def test_a_stream_that_starts_late_does_not_block_the_episode():
    obs, asm = assembler()
    feed_obs(obs, 10.0, 10.25)
    while obs["image.front"][0][0] < 10.05:  # the camera's first frame came 50 ms after the start
        obs["image.front"].popleft()
    steps = asm.ready_steps(measured_until=10.25)
    assert len(steps) == 2 and asm.dropped == {"image.front": 1}
    assert steps[0].obs["image.front"][0, 0, 0] == 2  # the oldest frame there is


def test_a_hold_makes_the_measured_pose_the_commanded_target():
    """The arm held its measured pose mid-plan (the targets ran 3 cm ahead of it); the next plan starts
    from the held pose. Without the hold the step after it would record a jump back to it (clipped)."""
    obs, asm = assembler()
    feed_obs(obs, 10.0, 10.5)
    for i, (t, _) in enumerate(obs["state.ee_pose"]):  # the arm trails its targets: 1 cm per step
        obs["state.ee_pose"][i] = (t, DOWN + [0.1 * (t - 10.0), 0, 0, 0, 0, 0, 0])
    ahead = DOWN + [0.03, 0, 0, 0, 0, 0, 0]
    asm.add_target(10.1, ahead, None)
    asm.add_target(10.2, ahead + [0.03, 0, 0, 0, 0, 0, 0], None)  # cut short by the hold at 10.15
    asm.add_hold(10.15)
    held = DOWN + [0.015, 0, 0, 0, 0, 0, 0]
    asm.add_target(10.3, held + [0.01, 0, 0, 0, 0, 0, 0], None)  # the next plan, from the held pose
    steps = asm.ready_steps(measured_until=10.5)
    assert np.allclose([s.action[0] for s in steps[:3]], [0.6, -0.3, 0.2], atol=1e-5)  # to 3 cm, back to 1.5, on
    assert asm.clipped == 0
    # without the hold: step 1 goes on to 6 cm (+0.6), step 2 jumps back from 6 to 2.5 cm (-0.7)


def test_executed_actions_replay_to_the_same_targets():
    obs, asm = assembler()
    feed_obs(obs, 10.0, 10.6)
    rng = np.random.default_rng(0)
    targets, pose = [], DOWN.copy()
    for k in range(5):  # an executor's targets for steps 0..4 (stamped t_{k+1}), gripper closing at step 2
        a = np.concatenate([rng.uniform(-1, 1, 3), np.zeros(3), [1.0 if k >= 2 else -1.0]])
        dp, dr, g = action_to_delta(a, SCALE, MASK)
        pose = apply_delta(pose, dp, dr)
        targets.append(pose)
        asm.add_target(10.0 + (k + 1) * DT, pose, g)
    asm.add_target(10.15, DOWN + [0.3, 0, 0, 0, 0, 0, 0], None)  # a stale plan, replaced by the next one
    asm.add_target(10.2, targets[1], -1.0)
    asm.add_target(10.3, targets[2], 1.0)
    asm.add_target(10.4, targets[3], 1.0)
    asm.add_target(10.5, targets[4], 1.0)
    steps = asm.ready_steps(measured_until=10.6)
    assert len(steps) == 6
    replay = DOWN.copy()
    for s, want in zip(steps, targets):
        dp, dr, _ = action_to_delta(s.action, SCALE, MASK)
        replay = apply_delta(replay, dp, dr)
        assert np.allclose(replay, want, atol=1e-6)
    assert [s.action[6] for s in steps[:5]] == [-1, -1, 1, 1, 1]
    assert not steps[5].action[:6].any() and steps[5].action[6] == 1  # no target: the arm holds, gripper kept
    assert asm.clipped == 0


def test_proposed_actions_interventions_and_rewards():
    obs, asm = assembler()
    feed_obs(obs, 10.0, 10.5)
    right = DOWN + [0.01, 0, 0, 0, 0, 0, 0]
    asm.add_target(10.1, right, None, executed=False)  # the policy proposes +1 cm at step 0
    asm.add_target(10.1, DOWN + [0, 0.02, 0, 0, 0, 0, 0], None)  # the human's target went to the arm
    asm.add_flag(10.0, False)
    asm.add_flag(10.05, True)  # takeover during step 0
    asm.add_flag(10.2, True)
    asm.add_flag(10.27, False)  # hand back during step 2
    asm.add_flag(10.3, False)
    for t, r in ((10.05, 0.1), (10.2, 0.3), (10.45, 1.0)):
        asm.add_reward(t, r)
    steps = asm.ready_steps(measured_until=10.5)
    assert np.allclose(steps[0].action_policy[:3], [0.2, 0, 0]) and np.allclose(steps[0].action[:3], [0, 0.4, 0])
    assert np.isnan(steps[1].action_policy).all()  # nothing proposed for step 1
    assert [s.intervention for s in steps] == [True, True, True, False, False]
    assert [s.reward for s in steps] == [0.1, 0.3, 0.3, 0.3, 1.0]


def test_rlif_reward_and_hil_serl_segments():
    flags = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 1], bool)
    assert rlif_rewards(flags).tolist() == [0, -1, 0, 0, 0, 0, -1, 0, -1, 0]
    assert intervention_segments(flags) == [(2, 4), (7, 8), (9, 10)]
    assert rlif_rewards(np.array([1, 1], bool)).tolist() == [0, 0]  # human from the start: no takeover
    assert intervention_segments(np.zeros(3, bool)) == [] and rlif_rewards(np.zeros(0, bool)).shape == (0,)


def test_the_server_takes_a_sample_that_never_came_from_its_neighbours_within_half_a_step():
    """A real arm's state stream jitters and drops samples: the policy server's observation at a
    step time takes the nearest sample within `max_skew` once the stream has moved past that time
    (none nearer can still come), never before; beyond `max_skew` it has none (the step is skipped)."""
    import threading

    from robot_rl.nodes.common import ObservationBuffers

    ob = ObservationBuffers.__new__(ObservationBuffers)  # the buffers alone, without a ROS node
    ob.cond, ob.tol = threading.Condition(), {"state.ee_pose": 0.006}
    ob.bufs = {"state.ee_pose": deque([(10.0, "a"), (10.013, "b")])}  # the sample due at 10.1 is missing
    assert ob.at(10.0) == {"state.ee_pose": "a"}
    assert ob.at(10.02, max_skew=0.05) is None and not ob.moved_past(10.02)  # 10.02's sample may still come
    ob.bufs["state.ee_pose"].append((10.04, "c"))
    assert ob.at(10.02) is None  # strict: only within the tolerance
    assert ob.moved_past(10.02) and ob.at(10.02, max_skew=0.05) == {"state.ee_pose": "b"}  # 7 ms off
    ob.bufs["state.ee_pose"].append((10.2, "d"))
    assert ob.at(10.12, max_skew=0.05) is None and ob.moved_past(10.12)  # an 80 ms gap on either side: skipped
