"""`policy_server`: loads a checkpoint (safetensors + JSON + spec subset), refuses a graph that lacks a
key it reads, assembles one observation per policy period from the stamped topics, runs the policy
(one-step by default) and publishes each new action chunk on `policy/chunk` stamped with the
observation time: the executed part, as delta poses (MultiDOFJointTrajectory, gripper as a joint).

The chunking is `learning.evaluate.ChunkAgent`'s, the same object the in-process evaluation uses, so
a lock-step rollout through ROS reproduces the in-process one.

Also: a heartbeat on `policy/heartbeat` (std_msgs/Header, frame_id `active` | `inactive`, ≥ 20 Hz
while the inference loop turns; the safety filter holds the arm when it stops); the latched
`policy/info` (JSON: checkpoint, version, sha256, sampler, device and the observation streams it
reads with their periods, which the safety filter watches); hot reload of weights announced on the
latched `policy/weights` (`{path, version, sha256}`): verified and loaded in the background, swapped
between two inferences. Lifecycle node: configure loads and warms up, deactivate stops the chunks and
says `inactive` last. `explore_std` > 0 adds Gaussian noise to every chunk (the RL fine-tuning actor).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np

from robot_rl.nodes.common import (
    Diagnostics,
    Lifecycle,
    ObservationBuffers,
    RateMeter,
    cell_spec,
    declare,
    json_state,
    qos,
    run_node,
    targets_to_msg,
)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def observation_streams(pcfg, cfg) -> dict[str, float]:
    """The topics (relative) a policy reads, with their nominal periods: what the safety filter watches."""
    out = {}
    for key in pcfg.state_keys:
        if key in ("state.joint_pos", "state.joint_vel", "state.gripper"):
            out["joint_states"] = 1.0 / cfg.arm.state_hz
        elif key == "state.ee_pose":
            out["arm/ee_pose"] = 1.0 / cfg.arm.state_hz
        elif key == "state.wrench":
            out["ft/wrench"] = 1.0 / cfg.ft.rate_hz
        elif key.startswith("state.object."):
            out[f"sim/object/{key.split('.', 2)[2]}"] = 1.0 / cfg.rates.command_hz
    for key in pcfg.image_keys:
        cam = key.split(".", 1)[1]
        out[f"{cam}/image_policy"] = 1.0 / cfg.camera(cam).rate_hz
    return out


def build(cfg, _rt_note, stop):
    import torch
    from rclpy.lifecycle import LifecycleNode
    from scipy.spatial.transform import Rotation
    from std_msgs.msg import Header, String
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    from robot_rl.geometry import action_to_delta, rot_to_quat
    from robot_rl.learning.evaluate import ChunkAgent
    from robot_rl.policies.checkpoint import default_sampler, load_policy
    from robot_rl.rollout import policy_rng
    from robot_rl.spec import ActionSpec, SpecError, check_compatible

    node = LifecycleNode("policy_server")
    p = declare(node, {"hardware_config": cfg.source, "ckpt": "", "sampler": "auto", "device": "auto",
                       "sim.task": cfg.sim.task, "cpu_threads": 1, "plan_ahead": 0, "explore_std": 0.0,
                       "autostart": True})
    if not p["ckpt"]:
        raise ValueError("policy_server: set the checkpoint: -p ckpt:=<folder>")
    device = "cuda" if p["device"] == "auto" and torch.cuda.is_available() else ("cpu" if p["device"] == "auto" else p["device"])
    if device == "cpu":  # beside the sim and drivers, one intra-op thread: no OpenMP barrier waits on a busy core
        torch.set_num_threads(max(1, int(p["cpu_threads"])))
    graph = cell_spec(cfg, p["sim.task"])  # in sim with the task's sim-only keys
    dt = 1.0 / cfg.rates.policy_hz
    lock = threading.Condition()
    ep = {"episode": None, "running": False, "t_next": None, "reset_seed": None}
    s: dict = {"version": 0, "sha256": "", "path": "", "pending": None}  # the served model and a reload in waiting
    obs_in: dict[str, ObservationBuffers] = {}  # created when configured (the keys come from the checkpoint)
    chunk_pub = node.create_publisher(MultiDOFJointTrajectory, "policy/chunk", qos("command"))
    beat_pub = node.create_publisher(Header, "policy/heartbeat", qos("state"))
    info_pub = node.create_publisher(String, "policy/info", qos("latched"))
    diag, meter = Diagnostics(node), RateMeter()
    beat = Header()

    def load(path: str):
        """Load and check a checkpoint against this graph; ValueError (one line) if it does not fit."""
        policy = load_policy(path, device)
        try:
            check_compatible(policy.spec_subset, graph, hardware=not cfg.is_sim)
        except SpecError as e:
            raise ValueError(f"policy_server: checkpoint {path} does not fit this graph: {e}") from None
        return policy

    def dummy_obs(pcfg) -> dict:
        obs = {k: np.zeros(pcfg.state_dims[k], np.float32) for k in pcfg.state_keys}
        for k in pcfg.image_keys:
            cam = graph.camera(k.split(".", 1)[1])
            obs[k] = np.zeros((cam.policy_height, cam.policy_width, 3), np.uint8)
        return obs

    def warm_up(agent) -> list[float]:
        """The first inferences pay for allocation and kernel selection (~0.5 s on a CPU)."""
        agent.reset(policy_rng(0))
        obs = dummy_obs(agent.policy.cfg)
        for _ in range(3 * agent.n_act):
            agent.act(obs)
        out = agent.latencies_ms[:]
        agent.latencies_ms.clear()
        return out

    def publish_info(**extra) -> None:
        info_pub.publish(String(data=json.dumps({
            "ckpt": s["path"], "version": s["version"], "sha256": s["sha256"], "kind": s["policy"].kind,
            "sampler": sampler(), "device": device, "n_action_steps": s["agent"].n_act, "policy_hz": cfg.rates.policy_hz,
            "streams": observation_streams(s["policy"].cfg, cfg), "active": life.active.is_set(), **extra})))

    def sampler() -> str:
        return p["sampler"] if p["sampler"] not in ("", "auto") else default_sampler(s["policy"].kind)

    def on_episode(m) -> None:
        if (state := json_state(m)) is None or "state" not in state:
            return
        with lock:
            if state["state"] == "running" and state.get("episode") != ep["episode"]:
                ep.update(episode=state["episode"], running=True, t_next=state.get("t"), reset_seed=state.get("seed") or 0)
            elif state["state"] != "running":
                ep["running"] = False
            lock.notify_all()

    def configure() -> None:
        if "policy" in s:
            return  # configured once per process; new weights come through policy/weights
        s["policy"] = policy = load(p["ckpt"])
        s["path"], s["sha256"] = str(p["ckpt"]), _file_sha256(Path(p["ckpt"]) / "model.safetensors")
        s["agent"] = agent = ChunkAgent(policy, sampler(), device, explore_std=p["explore_std"])
        plan_ahead = int(p["plan_ahead"])  # 0 = the in-process schedule (lock-step equivalence)
        if not 0 <= plan_ahead < agent.n_act:
            raise ValueError(f"policy_server: plan_ahead {plan_ahead} must be in [0, n_action_steps={agent.n_act})")
        pcfg = policy.cfg
        obs_in["buffers"] = ObservationBuffers(node, [*pcfg.state_keys, *pcfg.image_keys], cfg, lock)
        node.create_subscription(String, "episode/state", on_episode, qos("latched"))
        node.create_subscription(String, "policy/weights", on_weights, qos("latched"))
        warmup_ms = warm_up(agent)
        node.get_logger().info(f"policy_server ready: {policy.kind} from {p['ckpt']} on {device}, "
                               f"sampler {sampler()}, keys {list(obs_in['buffers'].bufs)}; "
                               f"warm-up chunks {', '.join(f'{x:.0f}' for x in warmup_ms)} ms")

    # ---- hot reload: verify, load and warm up in the background; swap between two inferences --------
    def on_weights(m) -> None:
        try:
            ann = json.loads(m.data)
            path, version, sha = str(ann["path"]), int(ann["version"]), str(ann["sha256"])
        except (ValueError, KeyError, TypeError) as e:
            diag.error(f"policy: malformed weights announcement ({e}); expected {{path, version, sha256}}")
            return
        if version <= s["version"] and path == s["path"]:
            return
        threading.Thread(target=reload, args=(path, version, sha), daemon=True).start()

    def reload(path: str, version: int, sha: str) -> None:
        try:
            digest = _file_sha256(Path(path) / "model.safetensors")
            if digest != sha:
                raise ValueError(f"model.safetensors has sha256 {digest[:12]}…, the announcement says {sha[:12]}…")
            new = load(path)
            old = s["policy"].cfg
            for field in ("state_keys", "image_keys", "n_obs_steps", "n_action_steps", "horizon", "action_dim"):
                if getattr(new.cfg, field, None) != getattr(old, field, None):
                    raise ValueError(f"{field} {getattr(new.cfg, field, None)} differs from the served model's "
                                     f"{getattr(old, field, None)}")
            warm_up(ChunkAgent(new, sampler(), device))
        except (ValueError, OSError) as e:
            diag.error(f"policy: weights v{version} from {path} refused ({e}); serving v{s['version']}")
            publish_info(refused={"path": path, "version": version, "why": str(e)})
            return
        with lock:
            s["pending"] = (new, path, version, sha)

    def swap_if_pending() -> None:
        if s["pending"] is None:
            return
        new, path, version, sha = s["pending"]
        s["pending"] = None
        s["agent"].swap_policy(new)
        s.update(policy=new, path=path, version=version, sha256=sha)
        publish_info()
        node.get_logger().info(f"policy_server: now serving v{version} from {path}")

    def heartbeat() -> None:
        """At most every 40 ms of wall time while the loop turns (a hung inference stops it)."""
        if time.monotonic() - last_beat[0] >= 0.04 or not life.active.is_set():
            last_beat[0] = time.monotonic()
            beat.stamp = node.get_clock().now().to_msg()
            beat.frame_id = "active" if life.active.is_set() else "inactive"
            beat_pub.publish(beat)

    last_beat = [0.0]
    life = Lifecycle(node, configure, on_activate=lambda: publish_info(), on_deactivate=lambda: (
        publish_info(), heartbeat()))  # inactive: the last word is a heartbeat saying so
    if p["autostart"]:
        life.autostart()

    def loop() -> None:
        while not stop.is_set():
            with lock:
                if "agent" in s:
                    heartbeat()
                if not (ep["running"] and life.active.is_set()):
                    if "agent" in s:
                        swap_if_pending()  # between episodes there is no inference to wait for
                    lock.wait(0.04)
                    continue
                agent = s["agent"]
                if ep["reset_seed"] is not None:  # a new episode: fresh windows, noise seeded by the episode's seed
                    agent.reset(policy_rng(ep["reset_seed"]))
                    ep["reset_seed"] = None
                ob = obs_in["buffers"]
                bufs, tol = ob.bufs, ob.tol
                newest = [b[-1][0] for b in bufs.values() if b]
                if ep["t_next"] is None or (len(newest) == len(bufs) and any(
                        b[0][0] > ep["t_next"] + tol[k] for k, b in bufs.items())):
                    # hardware, a (re)started server joining a running episode, or a stream that stalled
                    # for longer than the history: go on from the newest complete observation
                    ep["t_next"] = min(newest) if len(newest) == len(bufs) else None
                t = ep["t_next"]
                obs = None if t is None else ob.at(t)
                if obs is None:  # say what it waits for: the step time and each stream's newest stamp (-1: none yet)
                    report(waiting_for=-1.0 if t is None else t,
                           **{f"newest.{k}": b[-1][0] if b else -1.0 for k, b in bufs.items()})
                    lock.wait(0.04)
                    continue
                ep["t_next"] = round(t + dt, 9)
                swap_if_pending()
            plan_ahead = int(p["plan_ahead"])
            if 0 < plan_ahead and len(agent.queue) == plan_ahead:
                agent.queue.clear()  # real time: plan the next chunk this many steps before this one runs out
            first = agent.act(obs)
            if len(agent.queue) == agent.n_act - 1:  # this step planned a new chunk: publish its executed part
                action = ActionSpec(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in s["policy"].spec_subset["action"].items()})
                deltas = [action_to_delta(a, action.scale, action.mask) for a in [first, *agent.queue]]
                msg = targets_to_msg(t, [(t + (k + 1) * dt, np.concatenate([dp, rot_to_quat(Rotation.from_rotvec(dr))]), g)
                                         for k, (dp, dr, g) in enumerate(deltas)])
                chunk_pub.publish(msg)
                meter.tick()
            report()
            time.sleep(0)

    def report(**waiting) -> None:
        lat = np.asarray(s["agent"].latencies_ms[-1000:] or [0.0])
        diag.maybe_publish({"chunks_per_s": meter.rate(), "sampler": sampler(), "device": device,
                            "version": s["version"], "inference_p50_ms": float(np.median(lat)),
                            "inference_p99_ms": float(np.percentile(lat, 99)), "episode": ep["episode"], **waiting})

    return node, loop


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
