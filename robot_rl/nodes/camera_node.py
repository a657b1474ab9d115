"""`camera_node`: one camera (backend `mujoco`, `opencv` or `realsense` from the hardware config).
Publishes `/<camera>/image_raw` (full resolution, written as CDR bytes in one copy),
`/<camera>/image_policy` (resized here to the policy resolution; small enough for any network) and
`/<camera>/camera_info` (intrinsics at full resolution), stamped with the device (or sim) time.
A sim camera streams only while one of these topics has a subscriber: sim_world renders no frame
that no one receives (a state-only policy runs without any rendering); a hardware camera always streams."""

from __future__ import annotations

import time

import numpy as np

from robot_rl.drivers.camera import CAMERA_BACKENDS
from robot_rl.nodes.common import Diagnostics, RateMeter, declare, qos, run_node, sim_link_dir
from robot_rl.nodes.image_transport import ImageEncoder

IDLE_POLL_S = 0.05  # a paused sim camera checks for subscribers this often


def build(cfg, rt_note, stop):
    import cv2
    from rclpy.node import Node
    from sensor_msgs.msg import CameraInfo, Image

    node = Node("camera_node")
    name = node.declare_parameter("camera", cfg.cameras[0].name if cfg.cameras else "").value
    p = declare(node, {"hardware_config": cfg.source, "stamp_source": "device", "sim.link": cfg.sim.link,
                       **cfg.ros_params("camera_node", camera=name)})
    if p["stamp_source"] not in ("device", "wall"):
        raise ValueError(f"camera_node: stamp_source '{p['stamp_source']}' is not 'device' or 'wall'")
    c = {k.split(".", 1)[1]: v for k, v in p.items() if k.startswith("camera.")}
    backend = CAMERA_BACKENDS[c["backend"]]
    cam = backend(name=name, link_dir=sim_link_dir(node, p["sim.link"]), device=c["device"], serial=c["serial"],
                  width=c["width"], height=c["height"], rate_hz=c["rate_hz"], fovy_deg=c["fovy_deg"])
    w, h, pw, ph = cam.width, cam.height, c["policy_width"], c["policy_height"]
    frame_id = f"{name}_optical_frame"
    raw_pub = node.create_publisher(Image, f"{name}/image_raw", qos("image"))
    pol_pub = node.create_publisher(Image, f"{name}/image_policy", qos("image"))
    info_pub = node.create_publisher(CameraInfo, f"{name}/camera_info", qos("state"))
    enc = ImageEncoder(frame_id, h, w)
    info = CameraInfo(width=w, height=h, distortion_model="plumb_bob", d=[0.0] * 5)
    info.header.frame_id = frame_id
    fx, fy, cx, cy = cam.intrinsics
    info.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    pol = Image(height=ph, width=pw, encoding="rgb8", step=pw * 3)
    pol.header.frame_id = frame_id
    small = np.empty((ph, pw, 3), np.uint8)
    diag, meter = Diagnostics(node), RateMeter()
    missed = published = 0
    if rt_note not in ("", "off"):
        diag.error(rt_note)
    def close() -> None:
        print(f"camera '{name}': published {published} frames, {missed} missed, "
              f"{getattr(cam, 'overwritten', 0)} overwritten in the ring", flush=True)
        cam.close()

    node.close = close
    node.get_logger().info(f"camera '{name}': {c['backend']} {w}x{h} -> policy {pw}x{ph}")

    on_demand = hasattr(cam, "set_streaming")  # the sim renders a camera only while someone receives it
    streaming = True

    def loop() -> None:
        nonlocal missed, published, streaming
        while not stop.is_set():
            if on_demand and streaming != (wanted := raw_pub.get_subscription_count() + pol_pub.get_subscription_count()
                                           + info_pub.get_subscription_count() > 0):
                cam.set_streaming(streaming := wanted)
                node.get_logger().info(f"camera '{name}': " + ("streaming" if wanted else "paused: no subscribers"))
            if not streaming:
                diag.maybe_publish({"state": "paused (no subscribers)", "published": published,
                                    "backend": c["backend"]})
                stop.wait(IDLE_POLL_S)
                continue
            stamp = cam.read_into(enc.pixels)
            if stamp is None:
                if getattr(cam, "lockstep", False):
                    continue  # lock-step: no frame until the sim advances
                missed += 1
                diag.error(f"camera '{name}': no frame within the timeout ({missed} so far)")
                continue
            t_ns = time.time_ns() if p["stamp_source"] == "wall" else int(round(stamp * 1e9))
            raw_pub.publish(enc.encode(t_ns))
            published += 1
            meter.tick()
            if pol_pub.get_subscription_count():
                cv2.resize(enc.pixels, (pw, ph), dst=small, interpolation=cv2.INTER_AREA)
                pol.header.stamp.sec, pol.header.stamp.nanosec = divmod(t_ns, 1_000_000_000)
                pol.data = small.tobytes()
                pol_pub.publish(pol)
            info.header.stamp.sec, info.header.stamp.nanosec = divmod(t_ns, 1_000_000_000)  # exactly the image's
            info_pub.publish(info)
            diag.maybe_publish({"rate_hz": meter.rate(), "age_s": meter.age(), "published": published, "missed": missed,
                                "overwritten": getattr(cam, "overwritten", 0), "backend": c["backend"],
                                "realtime_priority": rt_note or "SCHED_FIFO"})

    return node, loop


def main() -> int:
    return run_node(build, realtime=True)


if __name__ == "__main__":
    raise SystemExit(main())
