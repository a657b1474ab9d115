"""The hardware path end to end: `robot-rl launch robot_bringup` on a `kind: hardware` cell whose
devices are peers speaking the real protocols — the Franka through `franka-sim` (FCI), the cameras
as OpenCV video files, the ATI Net F/T as a UDP peer streaming RDT records."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels are part of `make test` (extra 'ros')")

from geometry_msgs.msg import PoseStamped, WrenchStamped  # noqa: E402
from robot_rl.drivers.ft import RDT_RECORD, RDT_START, RDT_STOP  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import MultiDOFJointTrajectory  # noqa: E402

from robot_rl.nodes.common import msg_to_pose, qos, targets_to_msg  # noqa: E402
from robot_rl.nodes.image_transport import decode_image  # noqa: E402
from tests.helpers.ros import Probe, fresh_domain, launched, ros_env, stop  # noqa: E402

CELL = """
name: bench_cell
kind: hardware
arm: {{backend: franka, address: 127.0.0.1, home_qpos: [0.0, 0.0, 0.0, -1.5708, 0.0, 1.5708, 0.785],
       translational_stiffness: 800.0, rotational_stiffness: 40.0, max_pos_error: 0.02, max_rot_error: 0.1}}
safety: {{workspace_low: [0.3, -0.4, 0.3], workspace_high: [0.8, 0.4, 0.9], max_tilt_deg: 80.0, max_speed: 0.3}}
cameras:
  - {{name: front, backend: opencv, device: {front}, width: 320, height: 240, rate_hz: 30.0}}
  - {{name: wrist, backend: opencv, device: {wrist}, width: 320, height: 240, rate_hz: 30.0}}
ft: {{backend: netft, address: "127.0.0.1:{port}", counts_per_force: 1000.0, counts_per_torque: 1000.0, rate_hz: 100.0}}
transport: {{rt_priority: 0}}
"""
WRENCH_COUNTS = (1000, -2000, 3000, 100, 200, -300)  # 1 N, -2 N, 3 N, 0.1 Nm, 0.2 Nm, -0.3 Nm


class RdtStreamer(threading.Thread):
    """A Net F/T box: streams RDT records at 500 Hz after a start request, until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.002)
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()

    def run(self):
        client, seq = None, 0
        while not self.done.is_set():
            try:
                data, addr = self.sock.recvfrom(64)
                command = struct.unpack(">HHI", data)[1]
                client = addr if command == RDT_START else None if command == RDT_STOP else client
            except (TimeoutError, OSError):
                pass
            if client is not None:
                seq += 1
                self.sock.sendto(RDT_RECORD.pack(seq, seq, 0, *WRENCH_COUNTS), client)


def video(path, bgr, size=(320, 240)):
    """A short MJPG file of one colour: an OpenCV camera's device."""
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, size)
    for _ in range(10):
        w.write(np.full((size[1], size[0], 3), bgr, np.uint8))
    w.release()


def test_robot_bringup_with_franka_sim_opencv_cameras_and_a_netft_peer(tmp_path, franka_sim_lenient):
    video(tmp_path / "front.avi", (0, 0, 200))  # red in RGB
    video(tmp_path / "wrist.avi", (200, 0, 0))  # blue in RGB
    rdt = RdtStreamer()
    rdt.start()
    cell = tmp_path / "cell.yaml"
    cell.write_text(CELL.format(front=tmp_path / "front.avi", wrist=tmp_path / "wrist.avi", port=rdt.port))
    domain, log = fresh_domain(), tmp_path / "launch.log"
    try:
        with launched(["robot_bringup", f"hardware_config:={cell}"], ros_env(domain), log) as proc:
            probe = Probe(domain)
            try:
                probe.subscribe("/joint_states", JointState, qos("state"))
                probe.subscribe("/arm/ee_pose", PoseStamped, qos("state"))
                probe.subscribe("/ft/wrench", WrenchStamped, qos("state"))
                for cam in ("front", "wrist"):
                    probe.subscribe(f"/{cam}/image_raw", Image, qos("image"), raw=True)
                topics = ["/joint_states", "/arm/ee_pose", "/ft/wrench", "/front/image_raw", "/wrist/image_raw"]
                probe.wait_for(lambda: all(probe.count(t) >= 10 for t in topics), 60, "every hardware topic", proc, log)

                front, wrist = (decode_image(probe.latest(f"/{c}/image_raw")).pixels for c in ("front", "wrist"))
                assert front.shape == (240, 320, 3) and front[..., 0].mean() > 150 and front[..., 2].mean() < 50
                assert wrist[..., 2].mean() > 150 and wrist[..., 0].mean() < 50
                w = probe.latest("/ft/wrench").wrench
                np.testing.assert_allclose([w.force.x, w.force.y, w.force.z, w.torque.x, w.torque.y, w.torque.z],
                                           [1.0, -2.0, 3.0, 0.1, 0.2, -0.3], atol=1e-6)

                pub = probe.node.create_publisher(MultiDOFJointTrajectory, "/arm/target", qos("command"))
                probe.wait_for(lambda: pub.get_subscription_count() > 0, 20, "arm_node")
                start = msg_to_pose(probe.latest("/arm/ee_pose").pose)
                goal = start.copy()
                goal[:3] += [0.04, -0.03, -0.04]

                def ee_error() -> float:
                    return float(np.linalg.norm(msg_to_pose(probe.latest("/arm/ee_pose").pose)[:3] - goal[:3]))

                deadline = time.monotonic() + 20
                while ee_error() > 0.003 and time.monotonic() < deadline:
                    now = time.time()  # hardware: targets are stamped on the wall clock
                    pub.publish(targets_to_msg(now, [(now + 0.15, goal, None)]))
                    time.sleep(0.05)
                assert ee_error() < 0.003, f"the Franka did not reach the target: {ee_error():.4f} m"

                reset = probe.call(Trigger, "/episode/reset", Trigger.Request())
                assert reset.success and "prepare the scene" in reset.message
            finally:
                probe.close()
            rc = stop(proc)
        assert rc == 0, log.read_text()[-2000:]
    finally:
        rdt.done.set()
