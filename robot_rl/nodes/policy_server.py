"""`policy_server`: loads a checkpoint (safetensors + JSON + spec subset), refuses a graph that lacks a
key it reads, assembles one observation per policy period from the stamped topics (per stream the
sample within half a 100 Hz period of the step time; one that never came — a real arm's state
jitters — is replaced by the nearest within half a step; a longer gap skips the step, counted in
`skipped_steps`), runs the policy (one-step by default) and publishes each new action chunk on
`policy/chunk` stamped with the observation time: the executed part, as delta poses
(MultiDOFJointTrajectory, gripper as a joint).

The chunking is `learning.evaluate.ChunkAgent`'s, the same object the in-process evaluation uses, so
a lock-step rollout through ROS reproduces the in-process one.

Also: a heartbeat on `policy/heartbeat` (std_msgs/Header, frame_id `active` | `inactive`, ≥ 20 Hz
while the inference loop turns; the safety filter holds the arm when it stops); the latched
`policy/info` (JSON: checkpoint, version, sha256, sampler, device and the observation streams it
reads with their periods, which the safety filter watches); hot reload of weights announced on the
latched `policy/weights` (`{path, version, sha256}`): verified and loaded in the background, swapped
between two inferences. Lifecycle node: configure loads and warms up, deactivate stops the chunks and
says `inactive` last. `explore_std` > 0 adds Gaussian noise to every chunk (the RL fine-tuning actor).

Several robots, one model: `robots:=robot_a,robot_b` serves each namespace's topics (`robot_a/joint_states`
… → `robot_a/policy/chunk`, its own heartbeat and info, stamped with its own `robot_a/clock` in sim);
robots whose step comes due together are planned in one batch (a robot about to plan waits up to
`batch_wait_ms` for the others whose chunk has run out too or whose episode is about to start), each
row with its own window and noise. `launch/sim_fleet` runs it.

GPU flags (CPU-equivalence tested in tests/test_policies.py; on an H100, benchmarks/RESULTS.md
`policy_latency_h100`, chunks within 0.004 (fp16) / 0.034 (bf16) / 0.002 (compiled) of fp32 eager in
action units): `precision:=fp16|bf16` runs the encoder and denoiser under autocast (no faster for the
default network at batch 1 there); `compile:=default|reduce-overhead|max-autotune` applies
`torch.compile` — reduce-overhead (CUDA graphs) cut the one-step chunk from 8.2 to 2.3 ms on the
H100 — compiled during warm-up, before the server reports ready. The server itself (the ROS graph)
has not run on a GPU yet.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np

from robot_rl.nodes.common import (
    HISTORY,
    Diagnostics,
    Lifecycle,
    ObservationBuffers,
    RateMeter,
    cell_spec,
    declare,
    json_state,
    qos,
    run_node,
    sec_to_stamp,
    stamp_to_sec,
    targets_to_msg,
)

RESEND_S = 2.0  # wall seconds a cell may stand still on a chunk's observation before it is sent again


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


class Robot:
    """One robot the server drives: its namespace's topics, its episode, its agent (a window, a chunk
    queue and noise of its own; the model is shared) and its clock for the heartbeat."""

    def __init__(self, node, ns: str, sim_clock: bool):
        from std_msgs.msg import Header, String
        from trajectory_msgs.msg import MultiDOFJointTrajectory

        self.ns, self.node = ns, node
        self.prefix = f"{ns}/" if ns else ""
        self.ep = {"episode": None, "running": False, "t_next": None, "reset_seed": None, "state": ""}
        self.chunk_pub = node.create_publisher(MultiDOFJointTrajectory, f"{self.prefix}policy/chunk", qos("command"))
        self.beat_pub = node.create_publisher(Header, f"{self.prefix}policy/heartbeat", qos("state"))
        self.info_pub = node.create_publisher(String, f"{self.prefix}policy/info", qos("latched"))
        self.clock: float | None = None  # this robot's sim time when it has a clock of its own
        self.last_chunk = None  # (message, observation time, wall time sent): resent if the cell stalls on it
        self.resent = 0
        self.skipped = 0  # steps with no observation within half a step in some stream (a gap): not planned from
        self.agent = self.buffers = None
        self.beat = Header()
        if sim_clock and ns:
            from rosgraph_msgs.msg import Clock

            node.create_subscription(Clock, f"{self.prefix}clock", lambda m: setattr(
                self, "clock", stamp_to_sec(m.clock)), qos("clock"))

    def now_msg(self):
        return self.node.get_clock().now().to_msg() if self.clock is None else sec_to_stamp(self.clock)


def build(cfg, _rt_note, stop):
    import torch
    from rclpy.lifecycle import LifecycleNode
    from scipy.spatial.transform import Rotation
    from std_msgs.msg import String

    from robot_rl.geometry import action_to_delta, rot_to_quat
    from robot_rl.learning.evaluate import ChunkAgent, accelerate, act_batch
    from robot_rl.policies.checkpoint import default_sampler, load_policy
    from robot_rl.rollout import policy_rng
    from robot_rl.spec import ActionSpec, SpecError, check_compatible

    node = LifecycleNode("policy_server")
    p = declare(node, {"hardware_config": cfg.source, "ckpt": "", "sampler": "auto", "device": "auto",
                       "sim.task": cfg.sim.task, "cpu_threads": 1, "plan_ahead": 0, "explore_std": 0.0,
                       "precision": "fp32", "compile": "", "robots": "", "batch_wait_ms": 5.0, "autostart": True})
    if not p["ckpt"]:
        raise ValueError("policy_server: set the checkpoint: -p ckpt:=<folder>")
    device = "cuda" if p["device"] == "auto" and torch.cuda.is_available() else ("cpu" if p["device"] == "auto" else p["device"])
    if device == "cpu":  # beside the sim and drivers, one intra-op thread: no OpenMP barrier waits on a busy core
        torch.set_num_threads(max(1, int(p["cpu_threads"])))
    graph = cell_spec(cfg, p["sim.task"] if cfg.is_sim else None)  # in sim with the task's sim-only keys
    dt = 1.0 / cfg.rates.policy_hz
    lock = threading.Condition()
    s: dict = {"version": 0, "sha256": "", "path": "", "pending": None}  # the served model and a reload in waiting
    namespaces = [ns.strip().strip("/") for ns in str(p["robots"]).split(",")]
    if len(set(namespaces)) != len(namespaces) or (len(namespaces) > 1 and "" in namespaces):
        raise ValueError(f"policy_server: robots '{p['robots']}' must be distinct namespaces, comma-separated "
                         "('' alone: the server's own namespace)")
    sim_clock = bool(node.get_parameter("use_sim_time").value)
    robots = [Robot(node, ns, sim_clock) for ns in namespaces]
    diag, meter = Diagnostics(node), RateMeter()
    batches: list[int] = []  # robots per planning pass

    def load(path: str):
        """Load and check a checkpoint against this graph; ValueError (one line) if it does not fit."""
        policy = load_policy(path, device)
        try:
            check_compatible(policy.spec_subset, graph, hardware=not cfg.is_sim)
        except SpecError as e:
            raise ValueError(f"policy_server: checkpoint {path} does not fit this graph: {e}") from None
        return accelerate(policy, p["compile"])

    def agent_for(policy) -> ChunkAgent:
        return ChunkAgent(policy, sampler(policy), device, explore_std=p["explore_std"], precision=p["precision"])

    def dummy_obs(pcfg) -> dict:
        obs = {k: np.zeros(pcfg.state_dims[k], np.float32) for k in pcfg.state_keys}
        for k in pcfg.image_keys:
            cam = graph.camera(k.split(".", 1)[1])
            obs[k] = np.zeros((cam.policy_height, cam.policy_width, 3), np.uint8)
        return obs

    def warm_up(agents: list[ChunkAgent]) -> list[float]:
        """The first inferences pay for allocation, kernel selection and compilation (~0.5 s on a CPU
        eager), at every batch size the robots can make."""
        obs = dummy_obs(agents[0].policy.cfg)
        for b in range(1, len(agents) + 1):
            for a in agents[:b]:
                a.reset(policy_rng(0))
            for _ in range(3 * agents[0].n_act):
                act_batch(agents[:b], [obs] * b)
        out = agents[0].latencies_ms[:]
        for a in agents:
            a.latencies_ms.clear()
        return out

    def publish_info(**extra) -> None:
        for r in robots:
            r.info_pub.publish(String(data=json.dumps({
                "ckpt": s["path"], "version": s["version"], "sha256": s["sha256"], "kind": s["policy"].kind,
                "sampler": sampler(s["policy"]), "device": device, "precision": p["precision"],
                "compile": p["compile"], "robots": namespaces, "n_action_steps": r.agent.n_act,
                "policy_hz": cfg.rates.policy_hz, "streams": observation_streams(s["policy"].cfg, cfg),
                "active": life.active.is_set(), **extra})))

    def sampler(policy) -> str:
        return p["sampler"] if p["sampler"] not in ("", "auto") else default_sampler(policy.kind)

    def on_episode(r: Robot, m) -> None:
        if (state := json_state(m)) is None or "state" not in state:
            return
        with lock:
            r.ep["state"] = state["state"]
            if state["state"] == "running" and state.get("episode") != r.ep["episode"]:
                r.ep.update(episode=state["episode"], running=True, t_next=state.get("t"), reset_seed=state.get("seed") or 0)
            elif state["state"] != "running":
                r.ep["running"] = False
            lock.notify_all()

    def configure() -> None:
        if "policy" in s:
            return  # configured once per process; new weights come through policy/weights
        s["policy"] = policy = load(p["ckpt"])
        s["path"], s["sha256"] = str(p["ckpt"]), _file_sha256(Path(p["ckpt"]) / "model.safetensors")
        for r in robots:
            r.agent = agent_for(policy)
        n_act = robots[0].agent.n_act
        if not 0 <= int(p["plan_ahead"]) < n_act:
            raise ValueError(f"policy_server: plan_ahead {p['plan_ahead']} must be in [0, n_action_steps={n_act})")
        pcfg = policy.cfg
        # lock-step: the sim runs a whole chunk ahead at once (no rendering: in milliseconds); every sample of it
        # must still be here when the server steps through it, in the history and in the DDS queue
        depth = max(HISTORY, int(np.ceil((n_act + 2) * dt / min(observation_streams(pcfg, cfg).values()))))
        for r in robots:
            r.buffers = ObservationBuffers(node, [*pcfg.state_keys, *pcfg.image_keys], cfg, lock, history=depth,
                                           queue_depth=depth, prefix=r.prefix)
            node.create_subscription(String, f"{r.prefix}episode/state", lambda m, r=r: on_episode(r, m), qos("latched"))
        node.create_subscription(String, "policy/weights", on_weights, qos("latched"))
        warmup_ms = warm_up([r.agent for r in robots])
        node.get_logger().info(f"policy_server ready: {policy.kind} from {p['ckpt']} on {device} ({p['precision']}"
                               f"{', compiled ' + p['compile'] if p['compile'] else ''}), sampler {sampler(policy)}, "
                               f"keys {list(robots[0].buffers.bufs)}, robots {namespaces}; "
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
            warm_up([agent_for(new) for _ in robots])
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
        for r in robots:
            r.agent.swap_policy(new)
        s.update(policy=new, path=path, version=version, sha256=sha)
        publish_info()
        node.get_logger().info(f"policy_server: now serving v{version} from {path}")

    def heartbeat() -> None:
        """At most every 40 ms of wall time while the loop turns (a hung inference stops it), stamped
        with each robot's clock."""
        if time.monotonic() - last_beat[0] >= 0.04 or not life.active.is_set():
            last_beat[0] = time.monotonic()
            for r in robots:
                r.beat.stamp = r.now_msg()
                r.beat.frame_id = "active" if life.active.is_set() else "inactive"
                r.beat_pub.publish(r.beat)

    last_beat = [0.0]
    life = Lifecycle(node, configure, on_activate=lambda: publish_info(), on_deactivate=lambda: (
        publish_info(), heartbeat()))  # inactive: the last word is a heartbeat saying so
    if p["autostart"]:
        life.autostart()

    def due(r: Robot) -> tuple[float, dict] | None:
        """The robot's next step time and observation when all of it has arrived (call with the lock)."""
        agent, ob = r.agent, r.buffers
        if r.ep["reset_seed"] is not None:  # a new episode: fresh windows, noise seeded by the episode's seed
            agent.reset(policy_rng(r.ep["reset_seed"]))
            r.ep["reset_seed"], r.last_chunk = None, None
        bufs, tol = ob.bufs, ob.tol
        newest = [b[-1][0] for b in bufs.values() if b]
        if r.ep["t_next"] is None or (len(newest) == len(bufs) and any(
                b[0][0] > r.ep["t_next"] + tol[k] for k, b in bufs.items())):
            # hardware, a (re)started server joining a running episode, or a stream that stalled
            # for longer than the history: go on from the newest complete observation
            r.ep["t_next"] = min(newest) if len(newest) == len(bufs) else None
        t = r.ep["t_next"]
        obs = None if t is None else ob.at(t, max_skew=dt / 2)  # a sample that never came: the nearest within half a step
        if obs is None and t is not None and ob.moved_past(t):
            # a stream skipped more than half a step around t: go on from the newest complete observation
            r.skipped += 1
            r.ep["t_next"] = t = max(min(b[-1][0] for b in bufs.values()), round(t + dt, 9))
            obs = ob.at(t, max_skew=dt / 2)
        if obs is None:  # say what it waits for: the step time and each stream's newest stamp (-1: none yet)
            waiting[f"{r.prefix}waiting_for"] = -1.0 if t is None else t
            waiting.update({f"{r.prefix}newest.{k}": b[-1][0] if b else -1.0 for k, b in bufs.items()})
            return None
        return t, obs

    def plans(r: Robot) -> bool:
        """Whether the robot's next step plans a chunk."""
        return not r.agent.queue or len(r.agent.queue) == int(p["plan_ahead"])

    waiting: dict = {}
    first_ready = [None]

    def loop() -> None:
        while not stop.is_set():
            with lock:
                if "policy" in s:
                    heartbeat()
                running = [r for r in robots if r.ep["running"]] if life.active.is_set() else []
                if not running:
                    if "policy" in s:
                        swap_if_pending()  # between episodes there is no inference to wait for
                    lock.wait(0.04)
                    continue
                waiting.clear()
                ready = [(r, *step) for r in running if (step := due(r)) is not None]
                if not ready:
                    resend_if_stalled(running)
                    report()
                    lock.wait(0.04)
                    continue
                late = [r for r in robots if r not in {x for x, _, _ in ready} and (
                    r.ep["state"] == "ready" or (r.ep["running"] and not r.agent.queue))]
                if late and any(plans(r) for r, _, _ in ready):
                    # several robots: one about to plan waits a moment for those that plan next too (their
                    # chunk ran out, or their episode is about to start)
                    first_ready[0] = first_ready[0] or time.monotonic()
                    if time.monotonic() - first_ready[0] < p["batch_wait_ms"] * 1e-3:
                        lock.wait(0.001)
                        continue
                first_ready[0] = None
                for r, t, _ in ready:
                    r.ep["t_next"] = round(t + dt, 9)
                swap_if_pending()
            for r, _, _ in ready:
                if plans(r):
                    r.agent.queue.clear()  # real time: plan the next chunk `plan_ahead` steps before this one runs out
            planning = sum(not r.agent.queue for r, _, _ in ready)
            firsts = act_batch([r.agent for r, _, _ in ready], [obs for _, _, obs in ready])
            if planning:
                batches.append(planning)
            for (r, t, _), first in zip(ready, firsts):
                if len(r.agent.queue) == r.agent.n_act - 1:  # this step planned a new chunk: publish its executed part
                    publish_chunk(r, t, first)
            report()
            time.sleep(0)

    def publish_chunk(r: Robot, t: float, first: np.ndarray) -> None:
        action = ActionSpec(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in s["policy"].spec_subset["action"].items()})
        deltas = [action_to_delta(a, action.scale, action.mask) for a in [first, *r.agent.queue]]
        msg = targets_to_msg(t, [(t + (k + 1) * dt, np.concatenate([dp, rot_to_quat(Rotation.from_rotvec(dr))]), g)
                                 for k, (dp, dr, g) in enumerate(deltas)])
        r.chunk_pub.publish(msg)
        r.last_chunk = (msg, t, time.monotonic())
        meter.tick()

    def resend_if_stalled(running: list[Robot]) -> None:
        """A cell whose observations have not moved past a chunk's observation time for RESEND_S of
        wall time never got that chunk's first target (a lock-step sim waits for it forever): send the
        same chunk again. Idempotent downstream: the executor composes the same targets from the same
        base; in real time targets whose time has passed are skipped."""
        for r in running:
            if r.last_chunk is None or time.monotonic() - r.last_chunk[2] < RESEND_S:
                continue
            msg, t, _ = r.last_chunk
            newest = [b[-1][0] for b in r.buffers.bufs.values() if b]
            if newest and max(newest) < t + dt / 2:
                r.chunk_pub.publish(msg)
                r.last_chunk = (msg, t, time.monotonic())
                r.resent += 1
                diag.error(f"policy: {r.prefix or '/'} stalled at t={t:.3f} waiting for its chunk's targets; chunk sent again")

    def report() -> None:
        lat = np.asarray([x for r in robots for x in r.agent.latencies_ms[-1000:]] or [0.0])
        del batches[:-1000]
        diag.maybe_publish({"chunks_per_s": meter.rate(), "sampler": sampler(s["policy"]), "device": device,
                            "precision": p["precision"], "compile": p["compile"] or "off", "version": s["version"],
                            "inference_p50_ms": float(np.median(lat)), "inference_p99_ms": float(np.percentile(lat, 99)),
                            "robots": len(robots), "batch_mean": float(np.mean(batches)) if batches else 0.0,
                            "batch_max": max(batches, default=0), "resent_chunks": sum(r.resent for r in robots),
                            "skipped_steps": sum(r.skipped for r in robots),
                            **{f"{r.prefix}episode": r.ep["episode"] for r in robots}, **waiting})

    return node, loop


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
