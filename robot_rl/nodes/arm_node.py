"""`arm_node`: the arm (backend `mujoco` or `franka`). Publishes `/joint_states` and `/arm/ee_pose`;
takes absolute, time-stamped targets on `/arm/target` (MultiDOFJointTrajectory, joints ee + gripper)
and re-checks each against the safety limits (refused → hold the measured pose). Honours the latched
`/estop`. Services: `/arm/home`, `/arm/hold`, `/arm/recover` (Trigger); `/arm/home` only starts the
move: the latched `/arm/status` (JSON `holding`, `homing`, `homed` — home moves completed —, `error`,
published on every change) says when it has ended."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np

from robot_rl.drivers.arm import ARM_BACKENDS
from robot_rl.drivers.safety import EStop, TargetChecker
from robot_rl.nodes.common import (
    Diagnostics,
    RateMeter,
    declare,
    msg_to_targets,
    pose_to_msg,
    qos,
    run_node,
    sec_to_stamp,
    sim_link_dir,
    stamp_to_sec,
)
from robot_rl.sim.scene import ARM_JOINTS


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import PoseStamped
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Bool, String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    node = Node("arm_node")
    p = declare(node, {"hardware_config": cfg.source, "sim.link": cfg.sim.link, **cfg.ros_params("arm_node")})
    limits = cfg.safety_limits()
    cfg = dataclasses.replace(cfg, arm=dataclasses.replace(cfg.arm, backend=p["arm.backend"], address=p["arm.address"]))
    arm = ARM_BACKENDS[cfg.arm.backend](cfg, sim_link_dir(node, p["sim.link"]))
    lock = threading.Lock()
    estop = EStop()
    last = {"state": None}
    checker = TargetChecker(limits)  # re-checks every target message, all or nothing
    counts = {"during_estop": 0}
    diag, meter = Diagnostics(node), RateMeter()

    def hold(why: str) -> None:
        arm.hold()
        checker.passed.clear()
        diag.error(why)

    def on_target(msg) -> None:
        try:
            targets = msg_to_targets(msg)
        except ValueError as e:
            checker.refuse(str(e))
            return hold(f"arm: malformed target message ({e}); holding")
        with lock:
            if estop.engaged:
                counts["during_estop"] += 1
                return None
            state = last["state"]
            if state is None:
                return hold("arm: target before the first arm state; holding")
            if state.holding:  # the backend holds (reset, stop, watchdog): a new stream starts from the measured pose
                checker.passed.clear()
            out, why = checker.check(targets, state.ee_pose, state.stamp, state.stamp)
            if why:
                return hold(f"arm: target refused ({why}); holding the measured pose")
            for t, pose, gripper in out:
                arm.command(t, pose, gripper)
        return None

    def on_estop(msg) -> None:
        with lock:
            if estop.set(bool(msg.data), stamp_to_sec(node.get_clock().now().to_msg())):
                hold("arm: /estop engaged; holding" if estop.engaged else "arm: /estop released; holding until new targets")

    def trigger(fn):
        def cb(_req, resp):
            with lock:
                if estop.engaged:
                    resp.success, resp.message = False, "/estop is engaged"
                    return resp
                resp.message = fn() or "ok"
                resp.success = True
                checker.passed.clear()
            return resp
        return cb

    node.create_subscription(MultiDOFJointTrajectory, "arm/target", on_target, qos("command"))
    node.create_subscription(Bool, "estop", on_estop, qos("latched"))
    node.create_service(Trigger, "arm/home", trigger(arm.home))
    node.create_service(Trigger, "arm/hold", trigger(arm.hold))
    node.create_service(Trigger, "arm/recover", trigger(arm.recover))
    js_pub = node.create_publisher(JointState, "joint_states", qos("state"))
    pose_pub = node.create_publisher(PoseStamped, "arm/ee_pose", qos("state"))
    status_pub = node.create_publisher(String, "arm/status", qos("latched"))
    status = {"last": None}
    js = JointState(name=[*ARM_JOINTS, "gripper"])
    pose = PoseStamped()
    pose.header.frame_id = "base"
    node.close = arm.close

    def loop() -> None:
        while not stop.is_set():
            s = arm.read()
            if s is None:
                if not getattr(arm, "lockstep", False):  # in lock-step, silence is the sim waiting for a command
                    diag.error("arm: no state from the backend within the timeout")
                continue
            with lock:
                repeat = last["state"] is not None and s.stamp <= last["state"].stamp
                last["state"] = s
            if repeat and meter.age() < 0.5:
                continue  # lock-step heartbeat: the same state is re-published twice a second, not at 10 Hz
            sec_to_stamp(s.stamp, js.header.stamp)
            js.position = [*map(float, s.joint_pos), float(s.gripper)]
            js.velocity = [*map(float, s.joint_vel), 0.0]
            js_pub.publish(js)
            pose.header.stamp = js.header.stamp
            pose_to_msg(s.ee_pose, pose.pose)
            pose_pub.publish(pose)
            meter.tick()
            if (now := {"holding": s.holding, "homing": s.homing, "homed": s.homed, "error": s.error}) != status["last"]:
                status["last"] = now
                status_pub.publish(String(data=json.dumps(now)))
            if s.error:
                diag.error(f"arm: {s.error}; holding, call /arm/recover")
            diag.maybe_publish({"rate_hz": meter.rate(), "age_s": meter.age(), "estop": estop.engaged,
                                "holding": s.holding, "backend": p["arm.backend"], **counts,
                                **{("accepted" if k == "passed" else k): v for k, v in checker.counts.items()},
                                "target_error_m": float(np.linalg.norm(s.target[:3] - s.ee_pose[:3]))},
                               level_ok=not s.error)

    return node, loop


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
