"""`policy_server`: loads a checkpoint (safetensors + JSON + spec subset), refuses a graph that lacks a
key it reads, assembles one observation per policy period from the stamped topics, runs the policy
(one-step by default) and publishes each new action chunk on `policy/chunk` stamped with the
observation time: the executed part, as delta poses (MultiDOFJointTrajectory, gripper as a joint).

The chunking is `learning.evaluate.ChunkAgent`'s, the same object the in-process evaluation uses, so
a lock-step rollout through ROS reproduces the in-process one.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import deque

import numpy as np

from robot_rl.nodes.common import Diagnostics, RateMeter, declare, msg_to_pose, qos, run_node, stamp_to_sec, targets_to_msg

HISTORY = 64  # samples kept per stream


def _nearest(buf: deque, t: float, tol: float):
    """The sample nearest to time t within tol, or None."""
    best = None
    for stamp, value in reversed(buf):
        if abs(stamp - t) <= tol and (best is None or abs(stamp - t) < abs(best[0] - t)):
            best = (stamp, value)
        if stamp < t - tol:
            break
    return best


def build(cfg, _rt_note, stop):
    import torch
    from geometry_msgs.msg import PoseStamped, WrenchStamped
    from rclpy.node import Node
    from scipy.spatial.transform import Rotation
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    from robot_rl.geometry import action_to_delta, rot_to_quat
    from robot_rl.learning.evaluate import ChunkAgent
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rollout import policy_rng
    from robot_rl.spec import ActionSpec, SpecError, check_compatible

    node = Node("policy_server")
    p = declare(node, {"hardware_config": cfg.source, "ckpt": "", "sampler": "auto", "device": "auto",
                       "sim.task": cfg.sim.task, "cpu_threads": 1, "plan_ahead": 0})
    if not p["ckpt"]:
        raise ValueError("policy_server: set the checkpoint: -p ckpt:=<folder>")
    device = "cuda" if p["device"] == "auto" and torch.cuda.is_available() else ("cpu" if p["device"] == "auto" else p["device"])
    if device == "cpu":  # beside the sim and drivers, one intra-op thread: no OpenMP barrier waits on a busy core
        torch.set_num_threads(max(1, int(p["cpu_threads"])))
    policy = load_policy(p["ckpt"], device)
    graph = cfg.robot_spec()
    if cfg.is_sim:  # the sim offers its task's sim-only keys too
        from robot_rl.sim.registry import TASKS, _load
        from robot_rl.spec import object_key

        objects = _load(TASKS[p["sim.task"]].entry_point).objects
        graph = dataclasses.replace(graph, observations=graph.observations + tuple(
            object_key(o, graph.rates.policy_hz) for o in objects))
    try:
        check_compatible(policy.spec_subset, graph, hardware=not cfg.is_sim)
    except SpecError as e:
        raise ValueError(f"policy_server: checkpoint {p['ckpt']} does not fit this graph: {e}") from None
    sampler = p["sampler"] if p["sampler"] not in ("", "auto") else {"consistency": "cm1", "bc": "bc"}.get(policy.kind, "ddim10")
    action = ActionSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in policy.spec_subset["action"].items()})
    dt = 1.0 / cfg.rates.policy_hz
    agent = ChunkAgent(policy, sampler, device)
    plan_ahead = int(p["plan_ahead"])  # 0 = the in-process schedule (lock-step equivalence)
    if not 0 <= plan_ahead < agent.n_act:
        raise ValueError(f"policy_server: plan_ahead {plan_ahead} must be in [0, n_action_steps={agent.n_act})")
    pcfg = policy.cfg
    bufs: dict[str, deque] = {k: deque(maxlen=HISTORY) for k in (*pcfg.state_keys, *pcfg.image_keys)}
    tol = {k: 0.006 for k in bufs}  # half a 100 Hz period; cameras: half a frame period
    lock = threading.Condition()
    ep = {"episode": None, "running": False, "t_next": None, "reset_seed": None}

    def put(key: str, stamp, value) -> None:
        if key in bufs:
            with lock:
                bufs[key].append((stamp_to_sec(stamp), value))
                lock.notify_all()

    def on_joints(m) -> None:
        pos = np.asarray(m.position, dtype=np.float32)
        put("state.joint_pos", m.header.stamp, pos[:7])
        put("state.joint_vel", m.header.stamp, np.asarray(m.velocity, dtype=np.float32)[:7])
        put("state.gripper", m.header.stamp, pos[7:8])

    node.create_subscription(JointState, "joint_states", on_joints, qos("state"))
    node.create_subscription(PoseStamped, "arm/ee_pose", lambda m: put(
        "state.ee_pose", m.header.stamp, msg_to_pose(m.pose).astype(np.float32)), qos("state"))
    node.create_subscription(WrenchStamped, "ft/wrench", lambda m: put("state.wrench", m.header.stamp, np.array(
        [m.wrench.force.x, m.wrench.force.y, m.wrench.force.z, m.wrench.torque.x, m.wrench.torque.y,
         m.wrench.torque.z], np.float32)), qos("state"))
    for key in pcfg.state_keys:
        if key.startswith("state.object."):
            name = key.split(".", 2)[2]
            node.create_subscription(PoseStamped, f"sim/object/{name}", lambda m, k=key: put(
                k, m.header.stamp, msg_to_pose(m.pose).astype(np.float32)), qos("state"))
    for key in pcfg.image_keys:
        cam = key.split(".", 1)[1]
        tol[key] = 0.5 / graph.camera(cam).rate_hz
        node.create_subscription(Image, f"{cam}/image_policy", lambda m, k=key: put(
            k, m.header.stamp, np.frombuffer(m.data, np.uint8).reshape(m.height, m.width, 3).copy()), qos("image"))

    def on_episode(m) -> None:
        state = json.loads(m.data)
        with lock:
            if state["state"] == "running" and state["episode"] != ep["episode"]:
                ep.update(episode=state["episode"], running=True, t_next=state.get("t"), reset_seed=state.get("seed") or 0)
            elif state["state"] != "running":
                ep["running"] = False
            lock.notify_all()

    node.create_subscription(String, "episode/state", on_episode, qos("latched"))
    # warm-up before serving: the first inferences pay for allocation and kernel selection (~0.5 s on a CPU)
    dummy = {k: np.zeros(pcfg.state_dims[k], np.float32) for k in pcfg.state_keys}
    for k in pcfg.image_keys:
        cam = graph.camera(k.split(".", 1)[1])
        dummy[k] = np.zeros((cam.policy_height, cam.policy_width, 3), np.uint8)
    agent.reset(policy_rng(0))
    for _ in range(3 * agent.n_act):
        agent.act(dummy)
    warmup_ms = agent.latencies_ms[:]
    agent.latencies_ms.clear()
    chunk_pub = node.create_publisher(MultiDOFJointTrajectory, "policy/chunk", qos("command"))
    diag, meter = Diagnostics(node), RateMeter()
    node.get_logger().info(f"policy_server ready: {policy.kind} from {p['ckpt']} on {device}, sampler {sampler}, "
                           f"keys {list(bufs)}; warm-up chunks {', '.join(f'{x:.0f}' for x in warmup_ms)} ms")

    def observation(t: float) -> dict | None:
        obs = {}
        for k, buf in bufs.items():
            hit = _nearest(buf, t, tol[k])
            if hit is None:
                return None
            obs[k] = hit[1]
        return obs

    def loop() -> None:
        while not stop.is_set():
            with lock:
                if not ep["running"]:
                    lock.wait(0.1)
                    continue
                if ep["reset_seed"] is not None:  # a new episode: fresh windows, noise seeded by the episode's seed
                    agent.reset(policy_rng(ep["reset_seed"]))
                    ep["reset_seed"] = None
                if ep["t_next"] is None:  # hardware: start from the newest observation
                    ep["t_next"] = max((b[-1][0] for b in bufs.values() if b), default=None)
                    if ep["t_next"] is None:
                        lock.wait(0.05)
                        continue
                t = ep["t_next"]
                obs = observation(t)
                if obs is None:
                    lock.wait(0.05)
                    continue
                ep["t_next"] = round(t + dt, 9)
            if 0 < plan_ahead and len(agent.queue) == plan_ahead:
                agent.queue.clear()  # real time: plan the next chunk this many steps before this one runs out
            first = agent.act(obs)
            if len(agent.queue) == agent.n_act - 1:  # this step planned a new chunk: publish its executed part
                actions = [first, *agent.queue]
                deltas = [action_to_delta(a, action.scale, action.mask) for a in actions]
                msg = targets_to_msg(t, [(t + (k + 1) * dt, np.concatenate([dp, rot_to_quat(Rotation.from_rotvec(dr))]), g)
                                         for k, (dp, dr, g) in enumerate(deltas)])
                chunk_pub.publish(msg)
                meter.tick()
            lat = np.asarray(agent.latencies_ms[-1000:] or [0.0])
            diag.maybe_publish({"chunks_per_s": meter.rate(), "sampler": sampler, "device": device,
                                "inference_p50_ms": float(np.median(lat)), "inference_p99_ms": float(np.percentile(lat, 99)),
                                "episode": ep["episode"]})
            time.sleep(0)

    return node, loop


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
