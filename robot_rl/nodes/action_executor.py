"""`action_executor`: turns each action chunk (`policy/chunk`, delta poses stamped with the observation
time) into absolute, time-stamped end-effector targets on `arm/target` (robot_rl.executor.ChunkExecutor):
composed on the commanded target, which resets to the measured pose when an episode starts; targets
whose time has passed are skipped, never shifted. Reports late targets and chunks in /diagnostics."""

from __future__ import annotations

import json
import threading

from scipy.spatial.transform import Rotation

from robot_rl.executor import ChunkExecutor
from robot_rl.nodes.common import (
    Diagnostics,
    RateMeter,
    declare,
    msg_to_pose,
    msg_to_targets,
    qos,
    run_node,
    stamp_to_sec,
    targets_to_msg,
)


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import PoseStamped
    from rclpy.node import Node
    from std_msgs.msg import String
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    node = Node("action_executor")
    declare(node, {"hardware_config": cfg.source})
    s = cfg.safety
    ex = ChunkExecutor(s.workspace_low, s.workspace_high, 1.0 / cfg.rates.policy_hz)
    lock = threading.Lock()
    last = {"pose": None, "episode": None, "reset_pending": False}
    pub = node.create_publisher(MultiDOFJointTrajectory, "arm/target", qos("command"))
    diag, meter = Diagnostics(node), RateMeter()

    def on_pose(m) -> None:
        with lock:
            last["pose"] = msg_to_pose(m.pose)

    def on_episode(m) -> None:
        state = json.loads(m.data)
        with lock:
            if state["state"] == "running" and state["episode"] != last["episode"]:
                last["episode"], last["reset_pending"] = state["episode"], True

    def on_chunk(m) -> None:
        try:
            chunk = msg_to_targets(m)
        except ValueError as e:
            diag.error(f"executor: malformed chunk ({e}); ignored")
            return
        t_obs = stamp_to_sec(m.header.stamp)
        with lock:
            if last["reset_pending"]:  # control starts: the commanded target is the measured pose
                if last["pose"] is None:
                    diag.error("executor: chunk before any measured pose; ignored")
                    return
                ex.reset(last["pose"])
                last["reset_pending"] = False
            if ex.target is None:
                return
            deltas = [(pose[:3], Rotation.from_quat(pose[3:], scalar_first=True).as_rotvec(), g) for _, pose, g in chunk]
            now = stamp_to_sec(node.get_clock().now().to_msg())
            targets = ex.execute(t_obs, deltas, now)
        if targets:
            pub.publish(targets_to_msg(t_obs, targets))
        meter.tick()
        diag.maybe_publish({"chunks_per_s": meter.rate(), "chunks": ex.chunks, "late_targets": ex.late})

    node.create_subscription(PoseStamped, "arm/ee_pose", on_pose, qos("state"))
    node.create_subscription(String, "episode/state", on_episode, qos("latched"))
    node.create_subscription(MultiDOFJointTrajectory, "policy/chunk", on_chunk, qos("command"))
    return node, None


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
