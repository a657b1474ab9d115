"""`episode_manager`: owns the episode. Services `/episode/reset` (sim: a new seed per episode; robot:
home pose, then the operator prepares the scene), `/episode/start`, `/episode/stop` (SetBool: success)
and `/episode/abort`; publishes `/episode/state` (JSON in std_msgs/String, latched) and
`/episode/reward` (the task's reward in sim while running)."""

from __future__ import annotations

import json
import threading

from robot_rl.drivers.sim_link import LinkClient, LinkError, default_link_dir
from robot_rl.nodes.common import Diagnostics, RateMeter, declare, qos, run_node, sec_to_stamp, stamp_to_sec

STATES = ("idle", "ready", "running", "stopped")


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import Vector3Stamped
    from rclpy.node import Node
    from std_msgs.msg import String
    from std_srvs.srv import SetBool, Trigger

    node = Node("episode_manager")
    p = declare(node, {"hardware_config": cfg.source, "seed": cfg.sim.seed, **cfg.ros_params("episode_manager")})
    link = LinkClient(default_link_dir(p["sim.link"]), "episode", ["state"]) if cfg.is_sim else None
    home = None if cfg.is_sim else node.create_client(Trigger, "arm/home")
    lock = threading.Lock()
    done, started = threading.Event(), threading.Event()  # the sim's answers to reset and start
    t_start = [0.0]  # sim time at which sim_world started the episode
    ep = {"episode": -1, "state": "idle", "seed": None, "label": None, "success": False, "failed": False, "t": 0.0}
    diag, meter = Diagnostics(node), RateMeter()
    state_pub = node.create_publisher(String, "episode/state", qos("latched"))
    reward_pub = node.create_publisher(Vector3Stamped, "episode/reward", qos("state"))
    reward = Vector3Stamped()

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
            if not home.service_is_ready():
                return False, "/arm/home is not available; is arm_node running?"
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
                    sec_to_stamp(msg["t"], reward.header.stamp)
                    reward.vector.x = float(msg["reward"])
                    reward.vector.y, reward.vector.z = float(bool(msg["success"])), float(bool(msg.get("failed")))
                    reward_pub.publish(reward)
                    if (msg["success"] and not ep["success"]) or (msg.get("failed") and not ep["failed"]):
                        ep["success"], ep["failed"] = ep["success"] or msg["success"], ep["failed"] or msg["failed"]
                        announce()

    return node, (loop if link is not None else None)


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
