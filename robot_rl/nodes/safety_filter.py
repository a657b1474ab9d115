"""`safety_filter`: the last check before the arm (executor → intervention mux → safety filter →
arm_node, which re-checks). Targets from `safety/input` (absolute, time-stamped; remapped to the mux
output when there is one) pass to `arm/target` only while no hold reason is active
(robot_rl.drivers.safety.SafetyGate): e-stop, wrench over the limit, a stale observation stream
(the arm's, plus the streams the policy server announces in `policy/info`), a missing or inactive
policy heartbeat (not while a human drives: `intervention`), a refused target. On a new hold it
calls `arm/hold` — the arm holds its measured pose even with targets still buffered — and
publishes the reason on the latched `safety/state` (JSON), which the executor follows (control
restarts from the measured pose). Lifecycle node: deactivate holds the arm last.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from robot_rl.drivers.safety import SafetyGate
from robot_rl.nodes.common import (
    Diagnostics,
    Lifecycle,
    declare,
    json_state,
    msg_to_pose,
    msg_to_targets,
    qos,
    run_node,
    stamp_to_sec,
    targets_to_msg,
)

CHECK_PERIOD_S = 0.005  # the watchdogs are evaluated at 200 Hz (wall clock), ages on the node clock
OWN_STREAMS = ("arm/ee_pose", "ft/wrench")  # subscribed anyway (measured pose, wrench limit)


def stream_type(topic: str):
    """The message type of an observation stream, from its (relative) topic name."""
    from geometry_msgs.msg import PoseStamped, WrenchStamped
    from sensor_msgs.msg import Image, JointState

    if topic.endswith("image_policy") or topic.endswith("image_raw"):
        return Image
    return {"joint_states": JointState, "ft/wrench": WrenchStamped}.get(topic, PoseStamped)


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import PoseStamped, WrenchStamped
    from rclpy.lifecycle import LifecycleNode
    from sensor_msgs.msg import Image
    from std_msgs.msg import Bool, Header, String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    node = LifecycleNode("safety_filter")
    p = declare(node, {"hardware_config": cfg.source, "mode": cfg.sim.mode if cfg.is_sim else "realtime",
                       "autostart": True, "frame": "base"})
    if p["mode"] not in ("realtime", "lockstep"):
        raise ValueError(f"safety_filter: mode '{p['mode']}' must be realtime or lockstep")
    gate = SafetyGate(cfg.safety_limits(), 1.0 / cfg.rates.policy_hz, cfg.safety.wrench_limit,
                      watch=p["mode"] == "realtime")
    lock = threading.RLock()
    measured = {"pose": None, "stamp": 0.0}
    # armed: targets passed since the last hold; while an episode runs a hold is always sent (in lock-step
    # the sim then runs on instead of waiting for targets that will not come)
    state = {"holding": None, "reasons": {}, "armed": False, "episode_running": False, "hold_pending": False}
    arm_hold = node.create_client(Trigger, "arm/hold")
    out_pub = node.create_publisher(MultiDOFJointTrajectory, "arm/target", qos("command"))
    state_pub = node.create_publisher(String, "safety/state", qos("latched"))
    diag = Diagnostics(node)

    def now() -> float:
        return stamp_to_sec(node.get_clock().now().to_msg())

    def hold() -> None:
        gate.checker.passed.clear()
        state["hold_pending"] = not arm_hold.service_is_ready()
        if state["hold_pending"]:  # the loop calls it once the arm offers it (a lock-step sim waits for it)
            diag.error("safety: arm/hold service not available yet; holding by sending no targets meanwhile")
        else:
            arm_hold.call_async(Trigger.Request())

    def publish_state(reasons: dict[str, str]) -> None:
        """On every change of the hold state or its reasons: hold the arm when a hold starts."""
        holding = bool(reasons)
        if holding == state["holding"] and reasons.keys() == state["reasons"].keys():
            return  # the same reasons (their texts carry ages that change every check)
        if holding and not state["holding"] and (state["armed"] or state["episode_running"]):
            hold()
            state["armed"] = False
        state.update(holding=holding, reasons=dict(reasons))
        if holding:
            diag.error(f"safety: holding ({'; '.join(reasons.values())})")
        state_pub.publish(String(data=json.dumps({"state": "hold" if holding else "ok", "reasons": list(reasons.values()),
                                                  "request_human": "wrench" in reasons, "t": now()})))

    def on_input(msg) -> None:
        try:
            targets = msg_to_targets(msg, p["frame"])
        except (ValueError, TypeError) as e:  # malformed: refuse, never crash
            with lock:
                gate.refuse(f"malformed target message ({e})")
                publish_state(gate.reasons)
            return
        with lock:
            if not life.active.is_set():
                gate.checker.counts["dropped_holding"] += 1
                return
            if measured["pose"] is None:
                gate.refuse("no measured pose yet")
                publish_state(gate.reasons)
                return
            out, _why = gate.filter(targets, measured["pose"], measured["stamp"], now())
            publish_state(gate.reasons)
            if out:
                state["armed"] = True
                out_pub.publish(targets_to_msg(stamp_to_sec(msg.header.stamp), out, p["frame"]))

    def on_pose(m) -> None:
        with lock:
            measured.update(pose=msg_to_pose(m.pose), stamp=stamp_to_sec(m.header.stamp))
            gate.feed("arm/ee_pose", measured["stamp"])

    def on_info(m) -> None:
        """The policy server names the observation streams it reads: watch them too."""
        try:
            info = json.loads(m.data)
            streams = {str(k): float(v) for k, v in info.get("streams", {}).items()}
        except (ValueError, TypeError, AttributeError) as e:
            diag.error(f"safety: malformed policy/info ({e}); ignored")
            return
        for topic, period in streams.items():
            if topic in gate.streams:
                continue
            with lock:
                gate.watch_stream(topic, period, policy_only=topic not in OWN_STREAMS)
            if topic not in OWN_STREAMS:
                msg_type = stream_type(topic)
                node.create_subscription(msg_type, topic, lambda msg, t=topic: feed(t, msg),
                                         qos("image" if msg_type is Image else "state"))

    def feed(topic: str, msg) -> None:
        with lock:
            gate.feed(topic, stamp_to_sec(msg.header.stamp))

    def on_wrench(m) -> None:
        f = m.wrench.force
        with lock:
            gate.feed("ft/wrench", stamp_to_sec(m.header.stamp))
            gate.wrench(np.array([f.x, f.y, f.z]))

    def on_heartbeat(m: Header) -> None:
        with lock:
            gate.beat(now(), m.frame_id == "active")

    def on_intervention(m: Header) -> None:
        with lock:
            gate.human = m.frame_id == "human"

    def on_estop(m) -> None:
        with lock:
            gate.estop(bool(m.data))
            publish_state(gate.update(now()))

    def on_episode(m) -> None:
        if (s := json_state(m)) is None:
            return
        with lock:  # episodes start clean: no previous target, no latched reason (wrench, refusal)
            gate.checker.passed.clear()
            running = s.get("state") == "running"
            if running and not state["episode_running"]:
                gate.clear_latched()
                if gate.update(now()):  # still holding as the episode starts: hold the arm on request, so a
                    hold()  # lock-step clock runs on and the policy sees fresh observations (never a stall)
            state["episode_running"] = running

    def reset_srv(_req, resp):
        with lock:
            gate.clear_latched()
            resp.success, resp.message = True, "latched hold reasons cleared"
        return resp

    def on_deactivate() -> None:
        with lock:
            hold()  # last: the arm holds its measured pose
            state_pub.publish(String(data=json.dumps({"state": "hold", "reasons": ["safety filter inactive"]})))
            state.update(holding=True, reasons={"inactive": "safety filter inactive"})

    life = Lifecycle(node, on_deactivate=on_deactivate)
    gate.watch_stream("arm/ee_pose", 1.0 / cfg.arm.state_hz)
    node.create_subscription(MultiDOFJointTrajectory, "safety/input", on_input, qos("command"))
    node.create_subscription(PoseStamped, "arm/ee_pose", on_pose, qos("state"))
    node.create_subscription(WrenchStamped, "ft/wrench", on_wrench, qos("state"))
    node.create_subscription(Header, "policy/heartbeat", on_heartbeat, qos("state"))
    node.create_subscription(String, "policy/info", on_info, qos("latched"))
    node.create_subscription(Header, "intervention", on_intervention, qos("state"))
    node.create_subscription(Bool, "estop", on_estop, qos("latched"))
    node.create_subscription(String, "episode/state", on_episode, qos("latched"))
    node.create_service(Trigger, "safety/reset", reset_srv)
    if p["autostart"]:
        life.autostart()

    def loop() -> None:
        while not stop.is_set():
            time.sleep(CHECK_PERIOD_S)
            with lock:
                if not life.active.is_set():
                    continue
                t = now()
                reasons = gate.update(t)
                publish_state(reasons)
                if state["hold_pending"] and (not reasons or arm_hold.service_is_ready()):
                    state["hold_pending"] = False  # no hold to deliver any more, or now it can be
                    if reasons:
                        arm_hold.call_async(Trigger.Request())
                ages = {f"age_ms.{k}": min(w.age(t) * 1e3, 1e9) for k, w in gate.streams.items()}
            diag.maybe_publish({"holding": bool(reasons), "reasons": "; ".join(reasons.values()) or "none",
                                "heartbeat_age_ms": min(gate.heartbeat.age(t) * 1e3, 1e9), **gate.checker.counts, **ages},
                               level_ok=not reasons)

    return node, loop


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
