"""`intervention_mux`: executor → mux ← teleop → safety filter → arm. Policy targets
(`policy/target`) pass to `mux/target` until the operator engages (`teleop/state` buttons[0]);
from then on the teleop twist (`teleop/twist`), integrated from the measured pose
(drivers.teleop.TwistIntegrator), makes the targets: one per measured pose, stamped
`teleop.lead_ms` past it (enough for the hops to the arm), with the operator's gripper command. A
twist older than `teleop.watchdog_ms` is not integrated (the target holds: the human's stream has
its own watchdog). Disengaging hands control back: the executor, which follows `intervention`,
restarts the next chunk from the measured pose.
With `policy:=false` (recording demonstrations, no policy in the graph) the operator always drives.

`intervention` (std_msgs/Header, frame_id `human` | `policy`) is published at every policy step
(stamped with the measured pose that starts it) and at every change of hands (stamped with the newest
measured pose: all flags share the arm-state timeline); the recorder and the safety filter follow
it (no policy heartbeat is required while a human drives).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from robot_rl.drivers.teleop import TwistIntegrator
from robot_rl.hardware import TeleopSection, section_from_params
from robot_rl.nodes.common import (
    Diagnostics,
    declare,
    is_holding,
    json_state,
    msg_to_pose,
    qos,
    run_node,
    sec_to_stamp,
    stamp_to_sec,
    targets_to_msg,
)

MAX_DT_S = 0.05  # a gap in the measured poses longer than this is not integrated as motion


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import PoseStamped, TwistStamped
    from rclpy.node import Node
    from sensor_msgs.msg import Joy
    from std_msgs.msg import Header, String
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    node = Node("intervention_mux")
    p = declare(node, {"hardware_config": cfg.source, "frame": "base", "policy": True,
                       **cfg.ros_params("intervention_mux")})
    t = section_from_params(TeleopSection, p, "teleop")
    policy_dt, lead = 1.0 / cfg.rates.policy_hz, t.lead_ms / 1e3
    integ = TwistIntegrator(cfg.safety_limits())
    lock = threading.Lock()
    st = {"human": not p["policy"], "twist": np.zeros(6), "twist_t": -math.inf, "gripper": None, "pose_t": None,
          "episode_t": 0.0, "step": None}
    counts = {"takeovers": 0, "handbacks": 0, "teleop_targets": 0, "policy_targets": 0, "policy_overridden": 0,
              "stale_twist": 0}
    out_pub = node.create_publisher(MultiDOFJointTrajectory, "mux/target", qos("command"))
    flag_pub = node.create_publisher(Header, "intervention", qos("state"))
    diag = Diagnostics(node)

    def now() -> float:
        return stamp_to_sec(node.get_clock().now().to_msg())

    def flag(t: float | None) -> None:
        h = Header()
        h.stamp = sec_to_stamp(t) if t is not None else node.get_clock().now().to_msg()
        h.frame_id = "human" if st["human"] else "policy"
        flag_pub.publish(h)

    def on_policy(m) -> None:
        with lock:
            if st["human"]:
                counts["policy_overridden"] += 1
                return
            counts["policy_targets"] += 1
        out_pub.publish(m)  # unchanged: the safety filter checks it

    def on_twist(m) -> None:
        v, w = m.twist.linear, m.twist.angular
        with lock:
            st["twist"] = np.array([v.x, v.y, v.z, w.x, w.y, w.z], dtype=np.float64)
            st["twist_t"] = stamp_to_sec(m.header.stamp)

    def on_state(m) -> None:
        engaged = bool(m.buttons[0]) if len(m.buttons) else False
        with lock:
            if m.axes and not math.isnan(m.axes[0]):
                st["gripper"] = float(np.clip(m.axes[0], -1.0, 1.0))
            if engaged == st["human"] or not p["policy"]:
                return
            st["human"] = engaged
            counts["takeovers" if engaged else "handbacks"] += 1
            integ.target = None  # a takeover starts from the next measured pose
            if engaged:
                st["gripper"] = None if not m.axes or math.isnan(m.axes[0]) else st["gripper"]
            flag(st["pose_t"])  # on the measured-pose timeline, like the per-step flags: from here on

    def on_pose(m) -> None:
        stamp = stamp_to_sec(m.header.stamp)
        with lock:
            step = int(math.floor((stamp - st["episode_t"]) / policy_dt + 1e-6))
            if step != st["step"]:
                st["step"] = step
                flag(stamp)
            prev, st["pose_t"] = st["pose_t"], stamp
            if not st["human"]:
                return
            pose = msg_to_pose(m.pose)
            if integ.target is None:
                integ.start(pose)
                prev = None
            fresh = now() - st["twist_t"] <= t.watchdog_ms / 1e3
            counts["stale_twist"] += int(not fresh)
            dt = 0.0 if prev is None else float(np.clip(stamp - prev, 0.0, MAX_DT_S))
            target = integ.step(st["twist"] if fresh else np.zeros(6), dt)
            counts["teleop_targets"] += 1
            gripper = st["gripper"]
        out_pub.publish(targets_to_msg(stamp, [(stamp + lead, target, gripper)], p["frame"]))

    def on_episode(m) -> None:
        if (s := json_state(m)) is None:
            return
        with lock:
            if s.get("state") != "running":  # between episodes: the next one starts from the arm as the reset
                integ.target, st["gripper"] = None, None  # left it (pose and gripper) until the operator acts
            elif s.get("t") is not None and float(s["t"]) != st["episode_t"]:
                st["episode_t"], st["step"] = float(s["t"]), None
                integ.target = None

    def on_safety(m) -> None:
        if is_holding(m):
            with lock:
                integ.target = None  # after a hold the human continues from the measured pose

    node.create_subscription(MultiDOFJointTrajectory, "policy/target", on_policy, qos("command"))
    node.create_subscription(TwistStamped, "teleop/twist", on_twist, qos("command"))
    node.create_subscription(Joy, "teleop/state", on_state, qos("command"))
    node.create_subscription(PoseStamped, "arm/ee_pose", on_pose, qos("state"))
    node.create_subscription(String, "episode/state", on_episode, qos("latched"))
    node.create_subscription(String, "safety/state", on_safety, qos("latched"))
    node.create_timer(0.5, lambda: diag.maybe_publish({"human": st["human"], **counts}))
    return node, None


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
