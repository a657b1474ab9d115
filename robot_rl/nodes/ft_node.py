"""`ft_node`: the wrist force-torque sensor (backend `mujoco`, `netft` or `robotiq_ft300`). Publishes the
payload-compensated `/ft/wrench` and the raw `/ft/wrench_raw` (WrenchStamped, sensor frame, ≤ 100 Hz,
averaging faster sensors). Services: `/ft/bias`, `/ft/record_pose` (hold the tool still, call at ≥ 6
orientations), `/ft/fit_payload` (mass and centre of mass from the recorded poses)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import replace

import numpy as np

from robot_rl.drivers.ft import FT_BACKENDS, Payload, fit_payload
from robot_rl.geometry import quat_to_rot
from robot_rl.nodes.common import Diagnostics, RateMeter, declare, msg_to_pose, qos, run_node, sec_to_stamp, sim_link_dir

STILL_WINDOW = 20  # samples averaged for bias and pose records


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import PoseStamped, WrenchStamped
    from rclpy.node import Node
    from std_srvs.srv import Trigger

    node = Node("ft_node")
    p = declare(node, {"hardware_config": cfg.source, "sim.link": cfg.sim.link, **cfg.ros_params("ft_node")})
    section = replace(cfg.ft, backend=p["ft.backend"], address=p["ft.address"])
    sensor = FT_BACKENDS[section.backend](section, sim_link_dir(node, p["sim.link"]))
    sensor.start()
    payload = Payload(p["ft.payload_mass"], tuple(p["ft.payload_com"]))
    sensor_in_ee = quat_to_rot(np.asarray(p["ft.sensor_in_ee"]))
    lock = threading.Lock()
    recent: deque[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = deque(maxlen=STILL_WINDOW)
    poses: list[tuple[np.ndarray, np.ndarray]] = []
    ee_rot: list[np.ndarray | None] = [None]
    pub = node.create_publisher(WrenchStamped, "ft/wrench", qos("state"))
    raw_pub = node.create_publisher(WrenchStamped, "ft/wrench_raw", qos("state"))
    diag, meter = Diagnostics(node), RateMeter()
    period = 1.0 / min(p["ft.rate_hz"], 100.0)

    def on_pose(msg) -> None:
        ee_rot[0] = (quat_to_rot(msg_to_pose(msg.pose)[3:]) * sensor_in_ee).as_matrix()

    node.create_subscription(PoseStamped, "arm/ee_pose", on_pose, qos("state"))

    def still() -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        with lock:
            if len(recent) < STILL_WINDOW // 2:
                raise ValueError("not enough recent samples; is the sensor streaming?")
            raws, rots, weights = zip(*recent)
        return np.mean(raws, axis=0), rots[-1], None if weights[-1] is None else np.mean(weights, axis=0)

    def service(fn):
        def cb(_req, resp):
            try:
                resp.message, resp.success = fn(), True
            except ValueError as e:
                resp.message, resp.success = str(e), False
            return resp
        return cb

    def bias() -> str:
        nonlocal payload
        raw, rot, weight = still()
        gravity = weight if weight is not None else replace(payload, bias=(0.0,) * 6).wrench(rot)
        payload = replace(payload, bias=tuple(raw - gravity))
        return f"bias set: {np.round(payload.bias, 3).tolist()}"

    def record_pose() -> str:
        poses.append(still()[:2])
        return f"{len(poses)} poses recorded"

    def fit() -> str:
        nonlocal payload
        raws, rots = zip(*poses) if poses else ((), ())
        payload = fit_payload(np.array(raws), np.array(rots))
        poses.clear()
        return f"mass={payload.mass:.4f} com={np.round(payload.com, 4).tolist()}"

    node.create_service(Trigger, "ft/bias", service(bias))
    node.create_service(Trigger, "ft/record_pose", service(record_pose))
    node.create_service(Trigger, "ft/fit_payload", service(fit))
    node.close = sensor.close

    def publish(publisher, stamp: float, w: np.ndarray) -> None:
        m = WrenchStamped()
        m.header.frame_id = "ft_sensor"
        sec_to_stamp(stamp, m.header.stamp)
        m.wrench.force.x, m.wrench.force.y, m.wrench.force.z = (float(v) for v in w[:3])
        m.wrench.torque.x, m.wrench.torque.y, m.wrench.torque.z = (float(v) for v in w[3:])
        publisher.publish(m)

    def loop() -> None:
        acc: list[np.ndarray] = []
        next_pub = last_stamp = None
        while not stop.is_set():
            s = sensor.read()
            if s is None:
                if not getattr(sensor, "lockstep", False):
                    diag.error(f"ft: no sample from {section.backend} within the timeout")
                continue
            rot = s.rotation if s.rotation is not None else ee_rot[0]
            if rot is None:
                diag.error("ft: no /arm/ee_pose yet; cannot compensate the payload")
                continue
            if last_stamp is not None and s.stamp <= last_stamp:  # a lock-step heartbeat repeats the sample:
                if meter.age() < 0.5:  # re-published twice a second (late subscribers see it), not at 10 Hz
                    continue
                raw = s.wrench
            else:
                last_stamp = s.stamp
                acc.append(s.wrench)
                next_pub = s.stamp if next_pub is None else next_pub
                if s.stamp + 1e-9 < next_pub:
                    continue
                next_pub = max(next_pub + period, s.stamp)
                raw = np.mean(acc, axis=0)
                acc.clear()
            with lock:
                recent.append((raw, rot, s.payload_wrench))
            publish(raw_pub, s.stamp, raw)
            if s.payload_wrench is not None:  # sim: the model's exact tool weight
                publish(pub, s.stamp, raw - s.payload_wrench - np.asarray(payload.bias))
            else:
                publish(pub, s.stamp, payload.compensate(raw, rot))
            meter.tick()
            diag.maybe_publish({"rate_hz": meter.rate(), "age_s": meter.age(), "payload_mass": payload.mass,
                                "backend": section.backend, **sensor.stats()})

    return node, loop


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
