"""`episode_manager`: owns the episode. Services `/episode/reset` (sim: a new seed per episode; robot:
home pose, then the operator prepares the scene), `/episode/start`, `/episode/stop` (SetBool: success)
and `/episode/abort`; publishes `/episode/state` (JSON in std_msgs/String, latched) and
`/episode/reward` while running: the task's reward in sim; on a robot cell whose hardware config has
a `reward` section (`kind: reach`), that reward computed from `/arm/ee_pose` — success within
`tolerance` of `goal`, reward success − distance, as the sim's `reach_point` — so episodes can run
unattended (RL fine-tuning on hardware). Without one, the operator says success."""

from __future__ import annotations

import json
import threading

import numpy as np

from robot_rl.drivers.sim_link import LinkClient, LinkError
from robot_rl.hardware import RewardSection, section_from_params
from robot_rl.nodes.common import (
    Diagnostics,
    RateMeter,
    declare,
    msg_to_pose,
    qos,
    run_node,
    sec_to_stamp,
    sim_link_dir,
    stamp_to_sec,
)

STATES = ("idle", "ready", "running", "stopped")
HOME_DISCOVERY_S = 5.0  # how long a reset waits for /arm/home to be discovered


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import PoseStamped, Vector3Stamped
    from rclpy.node import Node
    from std_msgs.msg import String
    from std_srvs.srv import SetBool, Trigger

    node = Node("episode_manager")
    p = declare(node, {"hardware_config": cfg.source, "seed": cfg.sim.seed, **cfg.ros_params("episode_manager")})
    link = LinkClient(sim_link_dir(node, p["sim.link"]), "episode", ["state"]) if cfg.is_sim else None
    home = None if cfg.is_sim else node.create_client(Trigger, "arm/home")
    lock = threading.Lock()
    done, started = threading.Event(), threading.Event()  # the sim's answers to reset and start
    t_start = [0.0]  # sim time at which sim_world started the episode
    ep = {"episode": -1, "state": "idle", "seed": None, "label": None, "success": False, "failed": False, "t": 0.0}
    diag, meter = Diagnostics(node), RateMeter()
    state_pub = node.create_publisher(String, "episode/state", qos("latched"))
    reward_pub = node.create_publisher(Vector3Stamped, "episode/reward", qos("state"))
    reward = Vector3Stamped()
    cell_reward = None if cfg.is_sim else section_from_params(RewardSection, p, "reward")

    def announce() -> None:
        state_pub.publish(String(data=json.dumps(ep)))

    def reset() -> tuple[bool, str]:
        if ep["state"] == "running":
            return False, "episode is running; stop or abort it first"
        episode = ep["episode"] + 1
        seed = int(p["seed"]) + episode
        if link is not None:
            done.clear()
            try:
                link.send({"op": "reset", "seed": seed, "episode": episode})
            except LinkError as e:
                return False, str(e)
            if not done.wait(10.0):  # the loop thread receives the answer
                return False, "sim_world did not confirm the reset within 10 s"
        elif home is not None:
            if not home.wait_for_service(timeout_sec=HOME_DISCOVERY_S):  # discovery lags on a loaded host
                return False, f"/arm/home is not available after {HOME_DISCOVERY_S:.0f} s; is arm_node running?"
            home.call_async(Trigger.Request())
            seed = None
        ep.update(episode=episode, state="ready", seed=seed, label=None, success=False, failed=False)
        announce()
        return True, f"episode {episode} ready" + (f" (seed {seed})" if seed is not None else "; prepare the scene")

    def start() -> tuple[bool, str]:
        if ep["state"] != "ready":
            return False, f"episode is '{ep['state']}', not 'ready'; call /episode/reset first"
        if link is not None:  # the sim accepts targets from now on; control starts at its time of the start
            started.clear()
            link.send({"op": "start"})
            if not started.wait(10.0):
                return False, "sim_world did not confirm the start within 10 s"
            ep["state"], ep["t"] = "running", max(t_start[0], ep["t"])
        else:
            ep["state"], ep["t"] = "running", stamp_to_sec(node.get_clock().now().to_msg())
        announce()
        return True, f"episode {ep['episode']} running"

    def finish(label: str) -> tuple[bool, str]:
        if ep["state"] != "running":
            return False, f"episode is '{ep['state']}', not 'running'"
        ep.update(state="stopped", label=label)
        if link is not None:
            link.send({"op": "stop"})
        announce()
        return True, f"episode {ep['episode']} stopped: {label}"

    def srv(fn):
        def cb(req, resp):
            with lock:
                resp.success, resp.message = fn(req)
            return resp
        return cb

    node.create_service(Trigger, "episode/reset", srv(lambda _r: reset()))
    node.create_service(Trigger, "episode/start", srv(lambda _r: start()))
    node.create_service(SetBool, "episode/stop", srv(lambda r: finish("success" if r.data else "failure")))
    node.create_service(Trigger, "episode/abort", srv(lambda _r: finish("abort")))
    announce()
    if link is not None:
        node.close = link.close

    def scored(stamp, value: float, success: bool, failed: bool) -> None:
        """A reward sample of the running episode; the first success (or failure) is announced."""
        reward.header.stamp = stamp
        reward.vector.x, reward.vector.y, reward.vector.z = float(value), float(success), float(failed)
        reward_pub.publish(reward)
        if (success and not ep["success"]) or (failed and not ep["failed"]):
            ep["success"], ep["failed"] = ep["success"] or success, ep["failed"] or failed
            announce()

    if cell_reward is not None and cell_reward.kind == "reach":
        goal, tol = np.asarray(cell_reward.goal, dtype=np.float64), float(cell_reward.tolerance)

        def on_pose(m) -> None:
            dist = float(np.linalg.norm(msg_to_pose(m.pose)[:3] - goal))
            if not np.isfinite(dist):
                return  # a garbage pose scores nothing (the arm node and the safety filter deal with it)
            with lock:
                if ep["state"] == "running" and stamp_to_sec(m.header.stamp) >= ep["t"]:
                    scored(m.header.stamp, float(dist < tol) - dist, dist < tol, False)

        node.create_subscription(PoseStamped, "arm/ee_pose", on_pose, qos("state"))

    def loop() -> None:
        while not stop.is_set():
            msg = link.recv(0.2)
            diag.maybe_publish({"episode": ep["episode"], "state": ep["state"], "sim_rate_hz": meter.rate(),
                                "age_s": meter.age()})
            if msg is not None and msg.get("op") == "reset_done":
                ep["t"] = msg["t"]
                done.set()
            if msg is not None and msg.get("op") == "start_done":
                t_start[0] = msg["t"]
                started.set()
            if msg is not None and msg.get("op") == "state":
                meter.tick()
            if msg is None or msg.get("op") != "state" or ep["state"] != "running":
                continue  # (a reset or start holds the lock while it waits for the sim's answer: never block here then)
            with lock:
                if ep["state"] == "running":
                    scored(sec_to_stamp(msg["t"]), msg["reward"], bool(msg["success"]), bool(msg.get("failed")))

    return node, (loop if link is not None else None)


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
