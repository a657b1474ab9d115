"""The MuJoCo task suite: spec-exact observations, action semantics, determinism, experts,
domain randomisation, image mode, gymnasium registration and the vector API."""

import gymnasium as gym
import numpy as np
import pytest
import robot_rl.sim  # noqa: F401  (registers robot_rl/*)
from robot_rl.sim import TASKS, make_env, make_expert, make_vec_env

from robot_rl.geometry import apply_delta
from robot_rl.rollout import run_episodes

TASK_NAMES = sorted(TASKS)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_observations_match_the_spec_exactly(task):
    env = make_env(task)
    spec = env.robot_spec
    obs, info = env.reset(seed=3)
    spec.check_observation(obs, where=f"task {task} reset")
    assert set(spec.sim_only_keys) == {f"state.object.{o}" for o in env.objects}
    obs, *_ = env.step(env.action_space.sample())
    spec.check_observation(obs, where=f"task {task} step")
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_scripted_expert_succeeds(task):
    env = make_env(task)
    s = run_episodes(env, make_expert(env), episodes=12, seed=500, task=task, policy_name="scripted", progress=False)
    assert s.successes >= 11, s.to_dict()
    if task == "reach_around":
        assert set(s.solutions) == {"front", "behind"}, s.solutions


def test_reach_around_expert_chooses_its_side_where_both_sides_meet():
    """The two solutions share the approach (same states, same actions) up to the decision point, so
    nothing a policy observes before it tells the side: averaging the demonstrations there is wrong."""
    from robot_rl.sim.tasks.reach_around import POST_CENTER, POST_HALF

    def run(side):
        env = make_env("reach_around")
        ex = make_expert(env)
        obs, _ = env.reset(seed=4)
        ex.reset(np.random.default_rng(4))
        ex.side, ex.x_side = side, POST_CENTER[0] + (-1 if side == "front" else 1) * (POST_HALF[0] + 0.08)
        actions, poses = [], []
        while ex.phase == 0:
            actions.append(ex.act(obs))
            poses.append(obs["state.ee_pose"])
            obs, *_ = env.step(actions[-1])
        return np.array(actions), np.array(poses), ex.act(obs)

    (a_f, p_f, next_f), (a_b, p_b, next_b) = run("front"), run("behind")
    assert len(a_f) >= 2 and np.array_equal(a_f, a_b) and np.array_equal(p_f, p_b)
    assert np.all(np.abs(a_f[:, 0]) < 0.15), a_f  # straight at the post, not sideways
    assert next_f[0] < -0.3 and next_b[0] > 0.3, (next_f, next_b)  # then the sides part


def test_random_policy_mostly_fails_lift():
    env = make_env("lift")
    from robot_rl.rollout import RandomPolicy

    s = run_episodes(env, RandomPolicy(env), episodes=4, seed=0, task="lift", policy_name="random", progress=False)
    assert s.successes == 0


def test_same_seed_same_trajectory_and_other_seed_differs():
    def trajectory(seed):
        env = make_env("peg_insert")
        ex = make_expert(env)
        obs, _ = env.reset(seed=seed)
        ex.reset(np.random.default_rng(seed))
        traj = [obs["state.ee_pose"]]
        for _ in range(15):
            obs, *_ = env.step(ex.act(obs))
            traj.append(np.concatenate([obs["state.ee_pose"], obs["state.wrench"], obs["state.object.peg"]]))
        return traj

    a, b, c = trajectory(7), trajectory(7), trajectory(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_deltas_compose_on_the_commanded_target_not_the_measured_pose():
    env = make_env("reach")
    env.reset(seed=0)
    start = env.arm.target
    a = np.zeros(7)
    a[0] = 1.0  # +5 cm in x per step
    env.step(a)
    env.step(a)
    expected = apply_delta(start, np.array([0.1, 0, 0]), np.zeros(3))
    assert np.allclose(env.arm.target, expected)
    # masked dimensions (rotation, gripper on reach) are ignored
    env.step(np.array([0, 0, 0, 1, 1, 1, 1.0]))
    assert np.allclose(env.arm.target, expected)
    # the workspace box clips the target
    for _ in range(20):
        env.step(a)
    assert env.arm.target[0] == pytest.approx(env.workspace.high[0])


def test_rotation_deltas_are_applied_in_the_base_frame():
    env = make_env("lift")
    env.reset(seed=0)
    q0 = env.arm.target[3:]
    a = np.zeros(7)
    a[5] = 1.0  # yaw +0.25 rad about base z
    env.step(a)
    from robot_rl.geometry import delta_between

    d = delta_between(np.concatenate([[0, 0, 0], q0]), env.arm.target)
    assert np.allclose(d[3:], [0, 0, 0.25], atol=1e-9)
    for _ in range(3):
        env.step(np.zeros(7))
    assert np.allclose(delta_between(env.arm.target, env.arm.ee_pose)[3:], 0, atol=0.02)


def test_image_mode_renders_both_cameras_at_the_configured_resolution():
    env = make_env("lift", obs_mode="image", camera_width=96, camera_height=72)
    obs, _ = env.reset(seed=1)
    env.robot_spec.check_observation(obs)
    for cam in ("front", "wrist"):
        img = obs[f"image.{cam}"]
        assert img.shape == (72, 96, 3) and img.dtype == np.uint8
        assert img.std() > 5  # a real picture, not a blank frame
    assert not any(k.startswith("state.object") for k in obs)
    env.close()


def test_domain_randomisation_stays_within_configured_ranges():
    cfg = {"enabled": True, "mass_scale": [0.5, 0.6], "friction_scale": [1.5, 1.6], "latency_s": [0.01, 0.02]}
    env = make_env("lift", randomization=cfg)
    nominal_mass = env._nominal["body_mass"].copy()
    cube = env._object_bodies[0]
    masses = []
    for seed in range(5):
        env.reset(seed=seed)
        masses.append(env.model.body_mass[cube] / nominal_mass[cube])
        assert 0.01 <= env._latency <= 0.02
    assert all(0.5 <= m <= 0.6 for m in masses) and len(set(masses)) > 1
    plain = make_env("lift")
    plain.reset(seed=0)
    assert plain.model.body_mass[cube] == nominal_mass[cube] and plain._latency == 0.0
    with pytest.raises(ValueError, match="unknown keys"):
        make_env("lift", randomization={"colour": 1})


def test_registered_ids_and_vector_api():
    env = gym.make("robot_rl/ReachAround-v0")
    obs, _ = env.reset(seed=0)
    assert "state.object.post" in obs
    venv = make_vec_env("reach", num_envs=2, mode="async")
    try:
        obs, _ = venv.reset(seed=[1, 2])
        assert obs["state.ee_pose"].shape == (2, 7)
        obs, rew, term, trunc, info = venv.step(np.zeros((2, 7), np.float32))
        assert rew.shape == (2,) and obs["state.object.goal"].shape == (2, 7)
        assert not np.array_equal(obs["state.object.goal"][0], obs["state.object.goal"][1])
    finally:
        venv.close()
