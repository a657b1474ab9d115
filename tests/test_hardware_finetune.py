"""The hardware path of RL fine-tuning: a `reach_point` policy trained in our MuJoCo cell is
fine-tuned online through the whole robot graph (`launch/robot_hil`: arm_node on the `franka`
backend, OpenCV cameras, a Net F/T peer, policy server, executor, intervention mux, safety filter,
recorder, web console) against `franka-sim` on the real FCI protocol, enforcing libfranka's
motion limits. The cell scores its own episodes (`reward: reach`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="ROS 2 wheels are part of `make test` (extra 'ros')")

from robot_rl.sim import make_env, make_expert  # noqa: E402
from robot_rl.sim.scene import HOME_QPOS  # noqa: E402

from robot_rl.learning.train import LoopConfig, train_diffusion  # noqa: E402
from robot_rl.rollout import EpisodeRecorder, run_episodes  # noqa: E402
from robot_rl.store import EpisodeStore  # noqa: E402
from robot_rl.store.tools import prepare  # noqa: E402
from tests.helpers.ros import free_port, fresh_domain, ros_env  # noqa: E402
from tests.test_finetune import SMALL, run_cli  # noqa: E402
from tests.test_robot_bringup import RdtStreamer, video  # noqa: E402

GOAL = [0.5, 0.1, 0.25]
# franka-sim's EE is its flange; the sim policy reads the `pinch` frame 0.2558 m beyond it, turned -45° about z.
# Two cores run franka-sim's and the driver's 1 kHz Python loops beside a dozen nodes here: the arm's state, the
# cameras and F/T at lower rates, and pose streams stale only after 150 ms (a robot PC keeps the 50 ms default).
# franka-sim stands for a controller with a machine of its own: the graph and learner run at nice +10 beside it
# (franka-sim: nice -10, conftest._robot_share). Its communication constraints are met by the driver alone
# (test_franka); here, on a shared VM whose hypervisor takes the vCPUs away for tens of ms (steal time), they are
# not enforced — the motion limits are.
CELL = """
name: franka_sim_cell
kind: hardware
arm: {{backend: franka, address: 127.0.0.1, home_qpos: {home}, ee_transform: [0.0, 0.0, 0.2558, 0.92388, 0.0, 0.0, -0.38268],
       translational_stiffness: 1000.0, rotational_stiffness: 60.0, max_pos_error: 0.03, max_rot_error: 0.3,
       state_hz: 50.0}}
safety: {{workspace_low: [0.28, -0.3, 0.12], workspace_high: [0.72, 0.3, 0.5], nominal_quat: [0.0, 1.0, 0.0, 0.0],
         max_tilt_deg: 30.0, max_speed: 0.3, watchdog_min_ms: 150.0}}
cameras:
  - {{name: front, backend: opencv, device: {front}, width: 64, height: 48, rate_hz: 10.0, policy_width: 32, policy_height: 32}}
  - {{name: wrist, backend: opencv, device: {wrist}, width: 64, height: 48, rate_hz: 10.0, policy_width: 32, policy_height: 32}}
ft: {{backend: netft, address: "127.0.0.1:{port}", rate_hz: 25.0}}
reward: {{kind: reach, goal: {goal}, tolerance: 0.02}}
transport: {{rt_priority: 0}}
"""


@pytest.fixture(scope="module")
def reach_point_teacher(tmp_path_factory):
    """A weak reach_point teacher that reads only the arm's pose (what franka-sim has), from 12 scripted demos."""
    root = tmp_path_factory.mktemp("hw")
    env = make_env("reach_point")
    rec = EpisodeRecorder(root / "demos.zarr", env.robot_spec, "reach_point", "scripted")
    run_episodes(env, make_expert(env), 12, 0, "reach_point", "demos", progress=False, recorder=rec)
    rec.close()
    env.close()
    prepare(root / "demos.zarr")
    loop = LoopConfig(steps=400, batch_size=64, lr=1e-3, warmup_steps=10, eval_episodes=0, ckpt_every=0, log_every=50)
    train_diffusion([str(root / "demos.zarr")], root / "teacher", dict(SMALL), loop, keys=["state.ee_pose"],
                    task="reach_point", progress=False)
    return root / "teacher", root / "demos.zarr"


def test_online_finetuning_on_franka_sim_through_the_robot_graph(tmp_path, reach_point_teacher, franka_sim_limits):
    teacher, demos = reach_point_teacher
    video(tmp_path / "front.avi", (0, 0, 200), (64, 48))
    video(tmp_path / "wrist.avi", (200, 0, 0), (64, 48))
    rdt = RdtStreamer()
    rdt.start()
    cell = tmp_path / "cell.yaml"
    cell.write_text(CELL.format(home=list(map(float, HOME_QPOS)), front=tmp_path / "front.avi",
                                wrist=tmp_path / "wrist.avi", port=rdt.port, goal=GOAL))
    out = tmp_path / "ft"
    try:
        r = run_cli("finetune", f"ckpt={teacher}", "task=reach_point", f"store={demos}", "progress=false",
                    "sampler=ddim5", "finetune.actor=ros", "finetune.rounds=3", "finetune.episodes_per_round=2",
                    "finetune.utd=0.1", "finetune.critic_steps=20", "finetune.batch_size=32", "finetune.learner_threads=1",
                    "finetune.eval_episodes=0", f"finetune.out={out}", f"hardware_config={cell}",
                    f"console.port={free_port()}", env=ros_env(fresh_domain()), nice=10)
    finally:
        rdt.done.set()
    log = (out / "actor_launch.log").read_text() if (out / "actor_launch.log").exists() else ""
    sim_log = franka_sim_limits.read_text()
    assert r.returncode == 0, (r.stderr[-2000:], log[-3000:], sim_log[-1500:])
    report = json.loads((out / "report.json").read_text())
    assert report["actor"]["kind"] == "ros" and report["actor"]["hot_reloads"] == 2, report["actor"]
    assert "now serving v1" in log and "now serving v2" in log
    online = EpisodeStore(out / "online.zarr")  # written by the recorder on the robot graph
    assert online.n_episodes == 6 and online.n_steps > 0 and report["env_steps"] == online.n_steps
    assert [m["policy_versions"] for m in online.meta] == [[0], [0], [1], [1], [2], [2]]
    for bad in ("violation", "reflex", "aborted"):  # franka-sim enforces both and says so when one trips
        assert bad not in sim_log.lower() and bad not in log.lower(), bad
    # the cell scored each step from the measured pose (step k's reward: the pose at step k+1), and each policy
    # served drove the Franka towards the point (its frames are the sim's: arm.ee_transform). Not every episode:
    # the safety filter holds the arm whenever the pose stream pauses 150 ms, and on a loaded 2-core VM a
    # whole episode can pass that way (seen in CI: one of six).
    closest, headed = [], set()
    for e in range(online.n_episodes):
        ep = online.episode(e, ["state.ee_pose", "reward"])
        dist = np.linalg.norm(np.asarray(ep["state.ee_pose"])[:, :3] - GOAL, axis=1)
        reward = np.asarray(ep["reward"])
        assert np.median(np.abs(reward[:-1] - ((dist[1:] < 0.02) - dist[1:]))) < 1e-3, e
        if dist.min() < dist[0] - 0.02:
            headed.update(online.meta[e]["policy_versions"])
        closest.append(dist.min() / dist[0])
    assert headed == {0, 1, 2}, (headed, closest)
    assert min(closest) < 0.6, closest  # and gets well on the way (19 cm away at the start)
