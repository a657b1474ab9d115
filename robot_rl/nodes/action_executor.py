"""`action_executor`: turns each action chunk (`policy/chunk`, delta poses stamped with the observation
time) into absolute, time-stamped end-effector targets on `policy/target` (robot_rl.executor.ChunkExecutor)
for the intervention mux / safety filter: composed on the commanded target, which resets to the
measured pose when an episode starts, after every hold of the safety filter (`safety/state`) and
while a human drives (`intervention`): control changes hands. Targets whose time has passed are
skipped, never shifted; `ensemble_decay` ≥ 0 turns on temporal ensembling of overlapping chunks
(the server's `plan_ahead`; < 0, the default: a newer chunk replaces the tail). Reports late targets
and chunks in /diagnostics. Lifecycle node: deactivate
sends the hold last (one target at the measured pose, which replaces the buffered tail downstream)."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from scipy.spatial.transform import Rotation

from robot_rl.executor import ChunkExecutor, chunk_problem
from robot_rl.nodes.common import (
    Diagnostics,
    Lifecycle,
    RateMeter,
    declare,
    is_holding,
    json_state,
    msg_to_pose,
    msg_to_targets,
    qos,
    run_node,
    stamp_to_sec,
    targets_to_msg,
)
from robot_rl.recording import nearest


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import PoseStamped
    from rclpy.lifecycle import LifecycleNode
    from std_msgs.msg import Header, String
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    node = LifecycleNode("action_executor")
    p = declare(node, {"hardware_config": cfg.source, "ensemble_decay": -1.0, "autostart": True})
    s = cfg.safety
    ex = ChunkExecutor(s.workspace_low, s.workspace_high, 1.0 / cfg.rates.policy_hz,
                       ensemble_decay=None if p["ensemble_decay"] < 0 else p["ensemble_decay"])
    lock = threading.Lock()
    poses: deque[tuple[float, np.ndarray]] = deque(maxlen=200)  # measured ee poses by stamp
    episode = {"id": None, "t": None}
    pending: deque = deque()  # chunks waiting for their episode state or their measured pose
    latency_ms: deque[float] = deque(maxlen=1000)
    refused = [0]  # chunks refused as malformed or garbage
    pub = node.create_publisher(MultiDOFJointTrajectory, "policy/target", qos("command"))
    diag, meter = Diagnostics(node), RateMeter()

    def pose_at(t: float) -> np.ndarray | None:
        """The measured pose at t: within half a 100 Hz period, or — once the stream has moved past t
        (the sample due never came) — the nearest within half a policy step (ObservationBuffers.at)."""
        hit = nearest(poses, t, 0.006)
        if hit is None and poses and poses[-1][0] > t + 0.006:
            hit = nearest(poses, t, ex.dt / 2)
        return None if hit is None else hit[1]

    def process() -> None:
        """Execute pending chunks in order, once the episode they belong to and, for its first chunk,
        the measured pose at its observation time are known (messages may arrive in any order)."""
        while pending:
            t_obs, chunk = pending[0]
            if episode["t"] is None:
                return  # no episode running (yet): keep it until one starts
            if t_obs < episode["t"] - 1e-9:
                pending.popleft()  # a chunk from before this episode: drop it
                continue
            if abs(t_obs - episode["t"]) < 1e-9 or ex.target is None:  # control starts: target := measured pose
                pose = pose_at(t_obs)
                if pose is None and poses and poses[-1][0] > t_obs + ex.dt / 2:
                    pending.popleft()  # no pose near its observation time will come: it can never start; late
                    ex.late += len(chunk)
                    continue
                if pose is None:
                    return
                ex.reset(pose)
            pending.popleft()
            deltas = [(p[:3], Rotation.from_quat(p[3:], scalar_first=True).as_rotvec(), g) for _, p, g in chunk]
            now = stamp_to_sec(node.get_clock().now().to_msg())
            targets = ex.execute(t_obs, deltas, now)
            latency_ms.append(1e3 * (now - t_obs))  # observation to targets, on the node clock
            if targets:
                pub.publish(targets_to_msg(t_obs, targets))
            meter.tick()
        lat = np.asarray(latency_ms) if latency_ms else np.zeros(1)
        diag.maybe_publish({"chunks_per_s": meter.rate(), "chunks": ex.chunks, "refused_chunks": refused[0],
                            "late_targets": ex.late, "targets": ex.composed,
                            "ensembled_targets": ex.ensembled, "pending": len(pending),
                            "obs_to_target_p50_ms": float(np.median(lat)),
                            "obs_to_target_p99_ms": float(np.percentile(lat, 99))})

    def on_pose(m) -> None:
        with lock:
            poses.append((stamp_to_sec(m.header.stamp), msg_to_pose(m.pose)))
            process()

    def on_episode(m) -> None:
        if (state := json_state(m)) is None or "state" not in state:
            return
        with lock:
            if state["state"] == "running" and state.get("episode") != episode["id"]:
                episode.update(id=state["episode"], t=state.get("t"))
                ex.target = None
                process()
            elif state["state"] != "running":  # between episodes no chunk runs; the next waits for its start
                episode.update(id=None, t=None)
                ex.target = None

    def on_chunk(m) -> None:
        try:
            chunk = msg_to_targets(m)
            if why := chunk_problem(stamp_to_sec(m.header.stamp), stamp_to_sec(node.get_clock().now().to_msg()), chunk):
                raise ValueError(why)
        except ValueError as e:
            refused[0] += 1
            diag.error(f"executor: chunk refused ({e}); ignored")
            return
        with lock:
            if not life.active.is_set():
                return
            pending.append((stamp_to_sec(m.header.stamp), chunk))
            process()

    def on_safety(m) -> None:
        """A hold: the arm holds its measured pose and control restarts from there with the next chunk.
        Chunks planned before the hold are dropped; one planned at or after it (topics arrive in any
        order) is kept — dropping it would leave a lock-step clock waiting for targets forever. The
        hold's time counts at most as the newest measured pose: a filter whose clock has not yet
        caught up with a sim reset never makes a chunk from the newest observation stale."""
        if not is_holding(m):
            return
        t_hold = (json_state(m) or {}).get("t")
        with lock:
            ex.target = None
            if isinstance(t_hold, (int, float)) and poses:
                t_hold = min(t_hold, poses[-1][0])
            kept = [c for c in pending if isinstance(t_hold, (int, float)) and c[0] >= t_hold - 1e-9]
            pending.clear()
            pending.extend(kept)

    def on_intervention(m) -> None:
        if m.frame_id == "human":  # the operator drives: when control comes back, the next chunk starts fresh
            with lock:
                ex.target = None
                pending.clear()

    def on_deactivate() -> None:
        with lock:
            pending.clear()
            ex.target = None
            if poses:  # last: one target at the measured pose replaces whatever is buffered downstream
                stamp, pose = poses[-1]
                now = stamp_to_sec(node.get_clock().now().to_msg())
                pub.publish(targets_to_msg(now, [(max(now, stamp) + ex.dt, pose, None)]))

    life = Lifecycle(node, on_deactivate=on_deactivate)

    node.create_subscription(PoseStamped, "arm/ee_pose", on_pose, qos("state"))
    node.create_subscription(String, "episode/state", on_episode, qos("latched"))
    node.create_subscription(MultiDOFJointTrajectory, "policy/chunk", on_chunk, qos("command"))
    node.create_subscription(String, "safety/state", on_safety, qos("latched"))
    node.create_subscription(Header, "intervention", on_intervention, qos("state"))
    if p["autostart"]:
        life.autostart()
    return node, None


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
