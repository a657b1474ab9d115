"""`recorder`: follows the episode manager and writes each episode into a zarr episode store
(robot_rl.store.EpisodeWriter: crash-safe, committed atomically at the episode's stop).

Per policy step (robot_rl.recording.StepAssembler): every observation key of the cell at full
resolution (cameras from `image_raw`), the executed action (from `arm/target`, what passed the
safety filter; a safety hold makes the measured pose the commanded target), the policy's proposed
action (`policy/target`), the intervention flag (`intervention`), the task reward
(`episode/reward`). An episode stopped with success/failure is committed with that label; an abort,
or `recorder/discard` while it runs, drops it. Samples that arrive too late for their step are
counted per key (`dropped` in the episode's metadata, in `recorder/status` and in /diagnostics),
never silently. The source is `teleop`, or `hil` once a policy's targets were seen (source:=<name>
forces it); the policy server's weights versions that acted in the episode (`policy/info`, hot
reloads included) are stored as `policy_versions`. `recorder/status` (latched JSON) says what the
store holds, what is being recorded, and which streams it still waits for (`waiting_for`: every
observation key and the intervention flag; `streams_ready` once all arrived — start episodes only then).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from robot_rl.nodes.common import (
    Diagnostics,
    ObservationBuffers,
    cell_spec,
    declare,
    is_holding,
    json_state,
    msg_to_targets,
    qos,
    run_node,
    stamp_to_sec,
)
from robot_rl.recording import StepAssembler, nearest

LOOP_PERIOD_S = 0.01
STATE_HISTORY = 512  # samples per state stream (5 s at 100 Hz); cameras keep 1 s of frames
SETTLE_S = 0.3  # after a stop, wait this long (wall) for samples still in flight
QUEUE_DEPTH = 50  # per subscription: a busy moment never makes DDS drop a sample


def _route(asm: StepAssembler, kind: str, item: tuple) -> None:
    if kind in ("executed", "proposed"):
        asm.add_target(*item, executed=kind == "executed")
    elif kind == "flags":
        asm.add_flag(*item)
    else:
        asm.add_reward(*item)


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import Vector3Stamped
    from rclpy.node import Node
    from std_msgs.msg import Header, String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    from robot_rl.store import EpisodeWriter, StoreError

    node = Node("recorder")
    # the task names the action mask (and in sim the sim-only keys); a robot cell records all 7 dims unless told
    p = declare(node, {"hardware_config": cfg.source, "store": "", "task": cfg.sim.task if cfg.is_sim else "",
                       "source": "auto", "operator": "", "image_codec": "blosc_zstd"})
    if not p["store"]:
        raise ValueError("recorder: set the store: -p store:=<path.zarr>")
    spec = cell_spec(cfg, p["task"])
    writer = EpisodeWriter(p["store"], spec, image_codec=p["image_codec"])
    node.close = writer.close
    keys = [k.name for k in spec.observations]
    cond = threading.Condition()
    fps = max((c.rate_hz for c in cfg.cameras), default=30.0)
    obs_in = ObservationBuffers(node, keys, cfg, cond, full_resolution=True, history=STATE_HISTORY,
                                image_history=int(fps) + 1, queue_depth=QUEUE_DEPTH)
    dt = 1.0 / cfg.rates.policy_hz
    side: dict[str, list] = {"executed": [], "proposed": [], "flags": [], "rewards": []}  # until an episode starts
    rec: dict = {"asm": None, "episode": None, "t0": None, "label": None, "stop_at": None, "policy_seen": False,
                 "seed": None, "discard": False, "served": None, "versions": set()}
    flags_seen = [False]  # the mux's flag stream reached us (DDS discovery can lag the mux's other readers)
    totals = {"episodes": writer.n_episodes, "steps": writer.n_steps, "dropped": 0, "discarded": 0}
    status_pub = node.create_publisher(String, "recorder/status", qos("latched"))
    diag = Diagnostics(node)

    def status() -> dict:
        asm = rec["asm"]
        waiting = sorted([k for k, n in obs_in.received.items() if n == 0] + ["intervention"] * (not flags_seen[0]))
        return {"store": str(p["store"]), **totals, "recording": asm is not None,
                "episode": rec["episode"], "episode_steps": writer.episode_steps,
                "episode_dropped": dict(asm.dropped) if asm else {}, "streams_ready": not waiting,
                "waiting_for": waiting}

    def announce() -> None:
        status_pub.publish(String(data=json.dumps(status())))

    def feed(kind: str, item) -> None:
        with cond:
            flags_seen[0] |= kind == "flags"
            asm = rec["asm"]
            if asm is None:
                side[kind].append(item)
                del side[kind][:-256]
                return
            _route(asm, kind, item)

    def on_targets(kind: str):
        def cb(m) -> None:
            try:
                targets = msg_to_targets(m)
            except ValueError:
                return  # the safety filter refuses it; nothing was executed
            if kind == "proposed":
                rec["policy_seen"] = True  # a policy ran during this recording: source 'hil'
            for t, pose, g in targets:
                feed(kind, (t, pose, g))
        return cb

    def on_safety(m) -> None:
        """A hold during the episode: the arm holds its measured pose, the commanded target from then on."""
        t = (json_state(m) or {}).get("t")
        if is_holding(m) and isinstance(t, (int, float)):
            with cond:
                if rec["asm"] is not None:
                    rec["asm"].add_hold(float(t))

    def on_episode(m) -> None:
        if (s := json_state(m)) is None:
            return
        with cond:
            if s.get("state") == "running" and s.get("episode") != rec["episode"] and rec["t0"] is None:
                rec.update(episode=s["episode"], t0=float(s["t"]), seed=s.get("seed"), label=None, stop_at=None,
                           discard=False)
            elif s.get("state") == "stopped" and s.get("episode") == rec["episode"] and rec["t0"] is not None:
                newest = obs_in.bufs["state.ee_pose"]
                rec.update(label=s.get("label"), stop_at=newest[-1][0] if newest else rec["t0"],
                           stop_wall=time.monotonic())
            cond.notify_all()

    def discard_srv(_req, resp):
        with cond:
            if rec["t0"] is None:
                resp.success, resp.message = False, "no episode is being recorded"
            else:
                rec["discard"] = True
                resp.success, resp.message = True, f"episode {rec['episode']} will not be stored"
        return resp

    def on_info(m) -> None:
        """The policy server's weights version: each episode records the versions that acted in it."""
        rec["policy_seen"] = True
        try:
            version = int(json.loads(m.data)["version"])
        except (ValueError, KeyError, TypeError):
            return
        with cond:
            rec["served"] = version
            rec["versions"].add(version)

    def begin() -> None:
        """The episode started: open it once the measured pose at its start time is in (or the first
        one after it, when the pose stream started late)."""
        poses = obs_in.bufs["state.ee_pose"]
        hit = nearest(poses, rec["t0"], obs_in.tol["state.ee_pose"])
        if hit is None and poses and poses[-1][0] > rec["t0"]:
            hit = next(x for x in poses if x[0] > rec["t0"])
        if hit is None:
            return
        g = nearest(obs_in.bufs["state.gripper"], rec["t0"], obs_in.tol["state.gripper"])
        asm = StepAssembler(rec["t0"], dt, obs_in.bufs, obs_in.tol, spec.action.scale, spec.action.mask,
                            hit[1], start_gripper=2.0 * float(g[1][0]) - 1.0 if g else -1.0)
        for kind, items in side.items():  # what arrived since the start (flags: also who had control before)
            for item in items:
                if item[0] >= rec["t0"] - dt or kind == "flags":
                    _route(asm, kind, item)
            items.clear()
        writer.begin_episode("teleop" if p["source"] == "auto" else p["source"], task=p["task"],
                             operator=p["operator"], start_time=time.time(), seed=rec["seed"], episode=rec["episode"],
                             stamp0=rec["t0"])
        rec["asm"] = asm
        rec["versions"] = {rec["served"]} - {None}  # the weights serving as the episode starts, and any swapped in
        announce()

    def write(steps) -> None:
        for st in steps:
            writer.add_step(st.obs, st.action, timestamp=st.stamp, reward=st.reward, intervention=st.intervention,
                            action_policy=None if np.isnan(st.action_policy).all() else st.action_policy)

    def finish(asm: StepAssembler, ended: dict) -> None:
        """Commit (or drop) the episode that ended; its last steps are written already."""
        label, dropped = ended["label"], dict(asm.dropped)
        totals["dropped"] += sum(dropped.values())
        if label == "abort" or ended["discard"] or writer.episode_steps == 0:
            writer.discard_episode()
            totals["discarded"] += 1
            why = "aborted" if label == "abort" else ("discarded" if ended["discard"] else "no complete step")
            node.get_logger().info(f"recorder: episode {ended['episode']} not stored ({why})")
        else:
            extra = {"source": "hil" if rec["policy_seen"] else "teleop"} if p["source"] == "auto" else {}
            if rec["policy_seen"] and rec["versions"]:
                extra["policy_versions"] = sorted(rec["versions"])
            k = writer.end_episode(success=label == "success", label=label, dropped=dropped,
                                   dropped_steps=asm.dropped_steps[:100], clipped_actions=asm.clipped, **extra)
            totals.update(episodes=writer.n_episodes, steps=writer.n_steps)
            node.get_logger().info(f"recorder: episode {ended['episode']} stored as {k} ({label}, "
                                   f"{writer.n_steps} steps in the store, dropped {dropped or 'none'})")
        announce()

    node.create_subscription(String, "episode/state", on_episode, qos("latched"))
    node.create_subscription(MultiDOFJointTrajectory, "arm/target", on_targets("executed"), qos("command"))
    node.create_subscription(MultiDOFJointTrajectory, "policy/target", on_targets("proposed"), qos("command"))
    node.create_subscription(Header, "intervention", lambda m: feed(
        "flags", (stamp_to_sec(m.stamp), m.frame_id == "human")), qos("state"))
    node.create_subscription(Vector3Stamped, "episode/reward", lambda m: feed(
        "rewards", (stamp_to_sec(m.header.stamp), m.vector.x)), qos("state"))
    node.create_subscription(String, "policy/info", on_info, qos("latched"))
    node.create_subscription(String, "safety/state", on_safety, qos("latched"))
    node.create_service(Trigger, "recorder/discard", discard_srv)
    announce()

    def loop() -> None:
        """Align under the lock; write outside it (a slow disk never stalls the subscriptions)."""
        ready = False
        while not stop.is_set():
            ended, announce_now = None, False
            with cond:
                cond.wait(LOOP_PERIOD_S)
                if rec["t0"] is not None and rec["asm"] is None:
                    begin()
                if rec["asm"] is None and rec["stop_at"] is not None:  # stopped before any pose came in
                    diag.error(f"recorder: episode {rec['episode']} not stored: no arm state during it")
                    totals["discarded"] += 1
                    rec.update(t0=None, stop_at=None)
                    announce_now = True
                if ready != (ready := status()["streams_ready"]):
                    announce_now = True
                asm, steps = rec["asm"], []
                if asm is not None and rec["stop_at"] is not None:
                    if time.monotonic() - rec["stop_wall"] >= SETTLE_S:
                        steps = asm.ready_steps(rec["stop_at"], final=True)
                        ended = {k: rec[k] for k in ("label", "discard", "episode")}
                        rec.update(asm=None, t0=None, stop_at=None)
                elif asm is not None:
                    newest = obs_in.bufs["state.ee_pose"]
                    steps = asm.ready_steps(newest[-1][0] if newest else asm.t0)
            try:
                write(steps)
                if ended is not None:
                    finish(asm, ended)
            except StoreError as e:  # never crash on one bad step: drop the episode and say why
                diag.error(f"recorder: episode {rec['episode']} dropped: {e}")
                writer.discard_episode()
                totals["discarded"] += 1
                with cond:
                    rec.update(asm=None, t0=None, stop_at=None)
                announce()
            if announce_now:
                announce()
            diag.maybe_publish({k: v for k, v in status().items() if not isinstance(v, (dict, list))},
                               level_ok=totals["dropped"] == 0)

    return node, loop


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
