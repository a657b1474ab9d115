"""A policy through the ROS 2 graph (`launch/sim_policy`: sim world, drivers, episode manager, policy
server, action executor) in lock-step reproduces the in-process rollout of the same checkpoint and
seed: end-effector within 1 mm at every policy step."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels are part of `make test` (extra 'ros')")
torch = pytest.importorskip("torch")

from geometry_msgs.msg import PoseStamped  # noqa: E402
from robot_rl.policies.checkpoint import save_policy  # noqa: E402
from robot_rl.policies.consistency import ConsistencyPolicy  # noqa: E402
from robot_rl.policies.diffusion import PolicyConfig  # noqa: E402
from robot_rl.policies.normalizer import Normalizer  # noqa: E402
from robot_rl.sim.registry import make_env  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402

from robot_rl.learning.evaluate import ChunkAgent  # noqa: E402
from robot_rl.nodes.common import msg_to_pose, qos, stamp_to_sec  # noqa: E402
from robot_rl.rollout import policy_rng  # noqa: E402
from tests.helpers.ros import Probe, fresh_domain, launched, ros_env, stop  # noqa: E402

TASK, SEED, STEPS = "reach", 100003, 24
KEYS = {"state.joint_pos": 7, "state.ee_pose": 7, "state.gripper": 1, "state.wrench": 6, "state.object.goal": 7}


def _checkpoint(path, env) -> ConsistencyPolicy:
    """A one-step policy with random weights: arbitrary but deterministic actions exercise every path."""
    torch.manual_seed(0)
    cfg = PolicyConfig(state_keys=tuple(KEYS), state_dims=KEYS, down_dims=(16, 32, 64))
    stats = {k: {"min": [-1.0] * d, "max": [1.0] * d} for k, d in {**KEYS, "action": 7}.items()}
    policy = ConsistencyPolicy(cfg, Normalizer.from_stats(stats, [*KEYS, "action"])).eval()
    save_policy(policy, path, env.robot_spec.policy_subset(list(KEYS)), {"task": TASK})
    return policy


def _in_process(policy, seed: int) -> np.ndarray:
    env = make_env(TASK)
    obs, _ = env.reset(seed=seed)
    agent = ChunkAgent(policy, "cm1")
    agent.reset(policy_rng(seed))
    poses = []
    for _ in range(STEPS):
        obs, *_ = env.step(agent.act(obs))
        poses.append(env.arm.ee_pose.copy())
    env.close()
    return np.array(poses)


def _through_ros(probe: Probe, episode: int, proc, log) -> np.ndarray:
    """One episode (reset, start, STEPS policy steps, stop): the ee pose at each policy step."""
    reset = probe.call(Trigger, "/episode/reset", Trigger.Request(), timeout=60)
    assert reset.success, reset.message
    assert probe.call(Trigger, "/episode/start", Trigger.Request()).success

    def running():
        m = probe.latest("/episode/state")
        state = json.loads(m.data) if m is not None else {}
        return state if state.get("state") == "running" and state.get("episode") == episode else None

    t0 = probe.wait_for(running, 30, f"episode {episode} running", proc, log)["t"]

    by_step: dict[int, np.ndarray] = {}
    seen = [0]

    def at(k: int):
        """The pose stamped at policy step k (the probe's lock is held only to copy what is new)."""
        with probe.lock:
            new = probe.msgs["/arm/ee_pose"][seen[0]:]
        seen[0] += len(new)
        for _, m in new:
            j = round((stamp_to_sec(m.header.stamp) - t0) / 0.1, 6)
            if j == int(j) and j >= 0:
                by_step[int(j)] = msg_to_pose(m.pose)
        return by_step.get(k)

    probe.wait_for(lambda: at(STEPS) is not None, 120, f"{STEPS} policy steps through ROS", proc, log)
    assert probe.call(SetBool, "/episode/stop", SetBool.Request(data=False)).success
    return np.array([at(k) for k in range(1, STEPS + 1)])


def test_lockstep_rollouts_through_ros_match_the_in_process_rollouts(tmp_path):
    env = make_env(TASK)
    policy = _checkpoint(tmp_path / "ckpt", env)
    env.close()
    expected = [_in_process(policy, SEED + k) for k in range(2)]
    assert np.linalg.norm(expected[0][-1, :3] - expected[0][0, :3]) > 0.02, "the policy should move the arm"

    domain, log = fresh_domain(), tmp_path / "launch.log"
    args = ["sim_policy", f"ckpt:={tmp_path / 'ckpt'}", f"task:={TASK}", "mode:=lockstep", f"seed:={SEED}"]
    with launched(args, ros_env(domain), log) as proc:
        probe = Probe(domain)
        try:
            deep = qos("state")
            deep.depth = 5000  # every pose is compared: in lock-step the sim outruns a probe on a busy host
            probe.subscribe("/arm/ee_pose", PoseStamped, deep)
            probe.subscribe("/episode/state", String, qos("latched"))
            got = [_through_ros(probe, k, proc, log) for k in range(2)]  # the second checks episode boundaries
        finally:
            probe.close()
        assert stop(proc) == 0
    for k in range(2):
        err = np.linalg.norm(got[k][:, :3] - expected[k][:, :3], axis=1)
        assert err.max() < 1e-3, f"episode {k}: max {err.max() * 1e3:.3f} mm at step {err.argmax() + 1}"


def test_robot_rl_run_prints_a_success_table(tmp_path):
    env = make_env(TASK)
    _checkpoint(tmp_path / "ckpt", env)
    env.close()
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "run", f"ckpt={tmp_path / 'ckpt'}", "episodes=2",
                        f"out={tmp_path / 'run'}"], env=ros_env(fresh_domain()), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "through ROS 2 (lockstep" in r.stdout and "episodes" in r.stdout
    result = json.loads((tmp_path / "run" / "run.json").read_text())
    assert result["episodes"] == 2 and [e["seed"] for e in result["per_episode"]] == [100000, 100001]
    assert all(e["sim_s"] >= 4.9 for e in result["per_episode"] if not e["success"])


def test_a_checkpoint_that_does_not_fit_the_graph_is_refused_with_one_line(tmp_path):
    env = make_env("lift")  # reads the cube's pose, which the reach cell does not have
    keys = {"state.ee_pose": 7, "state.object.cube": 7}
    cfg = PolicyConfig(state_keys=tuple(keys), state_dims=keys, down_dims=(16, 32, 64))
    stats = {k: {"min": [-1.0] * d, "max": [1.0] * d} for k, d in {**keys, "action": 7}.items()}
    save_policy(ConsistencyPolicy(cfg, Normalizer.from_stats(stats, [*keys, "action"])), tmp_path / "ckpt",
                env.robot_spec.policy_subset(list(keys)), {"task": "reach"})
    env.close()
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "run", f"ckpt={tmp_path / 'ckpt'}", "episodes=1",
                        f"out={tmp_path / 'run'}"], env=ros_env(fresh_domain()), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "required node 'policy_server'" in r.stderr and "does not fit this graph" in r.stderr
    assert "state.object.cube" in r.stderr
