"""The sim robot cell through real ROS 2: `robot-rl launch launch/sim_bringup.launch.yaml` in a
subprocess (six node processes over Fast DDS), probed from this process on its own domain."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels are part of `make test` (extra 'ros')")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseStamped, WrenchStamped  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, JointState  # noqa: E402
from std_msgs.msg import Bool, String  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402
from trajectory_msgs.msg import MultiDOFJointTrajectory  # noqa: E402

from robot_rl.nodes.common import msg_to_pose, qos, stamp_to_sec, targets_to_msg  # noqa: E402
from robot_rl.nodes.image_transport import decode_image  # noqa: E402
from tests.helpers.ros import ROOT, Probe, fresh_domain, launched, ros_env, stop  # noqa: E402

LAUNCH = "launch/sim_bringup.launch.yaml"


def _stamps(probe: Probe, topic: str) -> np.ndarray:
    with probe.lock:
        msgs = [m for _, m in probe.msgs[topic]]
    if topic.endswith("image_raw"):
        return np.array([decode_image(m).stamp_ns * 1e-9 for m in msgs])
    return np.array([stamp_to_sec(m.header.stamp) for m in msgs])


def _ee(probe: Probe) -> np.ndarray:
    return msg_to_pose(probe.latest("/arm/ee_pose").pose)


def _sim_now(probe: Probe) -> float:
    return max(stamp_to_sec(probe.latest("/clock").clock), stamp_to_sec(probe.latest("/arm/ee_pose").header.stamp))


def _stream(probe: Probe, pub, pose: np.ndarray, done, what: str, proc, log, timeout: float = 30.0) -> None:
    """Stream the same absolute target at ~20 Hz (as the executor would: a silent stream makes the arm
    hold) until `done()` or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = _sim_now(probe)
        pub.publish(targets_to_msg(t, [(t + 0.2, pose, None)]))
        if done():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-2000:]}")


def _stream_for(probe: Probe, pub, pose: np.ndarray, seconds: float, proc, log) -> None:
    t_end = _sim_now(probe) + seconds
    _stream(probe, pub, pose, lambda: _sim_now(probe) > t_end, "sim time to pass", proc, log)


def _subscribe_cell(probe: Probe) -> None:
    probe.subscribe("/clock", Clock, qos("clock"))
    for cam in ("front", "wrist"):
        probe.subscribe(f"/{cam}/image_raw", Image, qos("image"), raw=True)
        probe.subscribe(f"/{cam}/image_policy", Image, qos("image"))
        probe.subscribe(f"/{cam}/camera_info", CameraInfo, qos("state"))
    probe.subscribe("/joint_states", JointState, qos("state"))
    probe.subscribe("/arm/ee_pose", PoseStamped, qos("state"))
    probe.subscribe("/ft/wrench", WrenchStamped, qos("state"))
    probe.subscribe("/episode/state", String, qos("latched"))


def test_sim_bringup_topics_targets_safety_and_shutdown(tmp_path):
    domain = fresh_domain()
    log = tmp_path / "launch.log"
    with launched([LAUNCH], ros_env(domain), log) as proc:
        probe = Probe(domain)
        try:
            _subscribe_cell(probe)
            topics = ["/clock", "/front/image_raw", "/wrist/image_raw", "/front/image_policy", "/wrist/image_policy",
                      "/front/camera_info", "/joint_states", "/arm/ee_pose", "/ft/wrench"]
            probe.wait_for(lambda: all(probe.count(t) >= 5 for t in topics) and probe.count("/episode/state"), 60,
                           "every topic", proc, log)

            # every stream at its rate in sim time, with monotonic stamps
            probe.clear()
            probe.wait_for(lambda: probe.count("/front/image_raw") >= 30 and probe.count("/joint_states") >= 100,
                           60, "a second of data", proc, log)
            for topic, hz in [("/front/image_raw", 30), ("/wrist/image_raw", 30), ("/front/image_policy", 30),
                              ("/joint_states", 100), ("/arm/ee_pose", 100), ("/ft/wrench", 100)]:
                s = _stamps(probe, topic)
                assert np.all(np.diff(s) > 0), f"{topic}: stamps not monotonic"
                rate = (len(s) - 1) / (s[-1] - s[0])  # frames land on 10 ms physics ticks: use the mean
                assert rate == pytest.approx(hz, rel=0.1), f"{topic}: {rate:.1f} Hz in sim time, expected {hz}"
            img = decode_image(probe.latest("/front/image_raw"))
            assert img.pixels.shape == (480, 640, 3) and img.pixels.std() > 5, "full-resolution frame is blank"
            pol = probe.latest("/front/image_policy")
            assert (pol.height, pol.width) == (84, 84)
            info = probe.latest("/front/camera_info")
            assert info.width == 640 and info.k[0] > 100

            # the policy-resolution stream crosses machines: a UDP-only participant (no shared memory) gets it
            helpers = ROOT / "tests" / "helpers"
            udp = subprocess.run(
                [sys.executable, str(helpers / "udp_subscriber.py"), "4", "/front/image_policy", "/joint_states"],
                capture_output=True, text=True, timeout=60,
                env={**ros_env(domain), "FASTDDS_DEFAULT_PROFILES_FILE": str(helpers / "fastdds_udp_only.xml")})
            got = json.loads(udp.stdout.strip().splitlines()[-1])
            assert got["/front/image_policy"]["count"] >= 10 and got["/front/image_policy"]["last"] == [84, 84, 84 * 84 * 3]
            assert got["/joint_states"]["count"] >= 10  # (discovery takes part of the 4 s: this checks the path)

            # a camera no one watches is not rendered (sim_world's count stops); watched again, it streams
            probe.subscribe("/diagnostics", DiagnosticArray, qos("state"))
            for topic in ("/wrist/image_raw", "/wrist/image_policy", "/wrist/camera_info"):
                probe.unsubscribe(topic)

            def rendered() -> dict:
                d = probe.diagnostic("sim_world")
                return {c: int(d.get(f"frames_rendered.{c}", -1)) for c in ("front", "wrist")}

            def wrist_paused() -> bool:
                before = rendered()
                time.sleep(2.5)  # diagnostics come once a second
                after = rendered()
                return after["wrist"] == before["wrist"] >= 0 and after["front"] > before["front"]

            probe.wait_for(wrist_paused, 60, "sim_world to stop rendering the unwatched wrist camera", proc, log)
            probe.subscribe("/wrist/image_raw", Image, qos("image"), raw=True)
            probe.clear("/wrist/image_raw")
            probe.wait_for(lambda: probe.count("/wrist/image_raw") >= 5, 30, "the wrist camera streaming again",
                           proc, log)

            # F/T: the software bias zeroes the still tool's reading
            bias = probe.call(Trigger, "/ft/bias", Trigger.Request())
            assert bias.success, bias.message
            probe.clear("/ft/wrench")
            probe.wait_for(lambda: probe.count("/ft/wrench") >= 20, 30, "wrench samples", proc, log)
            with probe.lock:
                forces = np.array([[m.wrench.force.x, m.wrench.force.y, m.wrench.force.z] for _, m in probe.msgs["/ft/wrench"]])
            assert np.abs(forces.mean(axis=0)).max() < 0.3, f"biased still wrench {forces.mean(axis=0)}"

            # an episode, then absolute targets: the arm reaches them
            assert probe.call(Trigger, "/episode/reset", Trigger.Request()).success
            assert probe.call(Trigger, "/episode/start", Trigger.Request()).success
            target_pub = probe.node.create_publisher(MultiDOFJointTrajectory, "/arm/target", qos("command"))
            probe.wait_for(lambda: target_pub.get_subscription_count() > 0, 20, "arm_node subscribed to targets")
            start = _ee(probe)
            goal = start.copy()
            goal[:3] += [0.06, 0.04, -0.05]
            _stream(probe, target_pub, goal, lambda: np.linalg.norm(_ee(probe)[:3] - goal[:3]) < 0.005,
                    "the arm to reach the target", proc, log)

            _stream_for(probe, target_pub, goal, 0.5, proc, log)  # settle

            # outside the workspace, NaN: refused, the arm holds where it is
            for bad in (goal + np.r_[0, 0, 1.0, 0, 0, 0, 0], np.r_[goal[:3] + 0.02, [math.nan, 0, 1, 0]]):
                here = _ee(probe)
                _stream_for(probe, target_pub, bad, 0.8, proc, log)
                assert np.linalg.norm(_ee(probe)[:3] - here[:3]) < 0.003, f"arm moved on a refused target {bad}"

            # /estop (latched) holds the arm; released, it follows again
            estop = probe.node.create_publisher(Bool, "/estop", qos("latched"))
            estop.publish(Bool(data=True))
            _stream_for(probe, target_pub, _ee(probe), 0.3, proc, log)
            here = _ee(probe)
            moved = here.copy()
            moved[:3] += [-0.05, 0.0, 0.03]
            _stream_for(probe, target_pub, moved, 1.0, proc, log)
            assert np.linalg.norm(_ee(probe)[:3] - here[:3]) < 0.003, "arm moved under /estop"
            estop.publish(Bool(data=False))
            _stream(probe, target_pub, moved, lambda: np.linalg.norm(_ee(probe)[:3] - moved[:3]) < 0.005,
                    "the arm to move after release", proc, log)

            stop_resp = probe.call(SetBool, "/episode/stop", SetBool.Request(data=False))
            assert stop_resp.success and "failure" in stop_resp.message
        finally:
            probe.close()
        rc = stop(proc)
    assert rc == 0, f"launch did not shut down cleanly (exit {rc}):\n{log.read_text()[-2000:]}"
    assert "did not stop" not in log.read_text()


def _lockstep_run(tmp_path, name: str) -> np.ndarray:
    domain = fresh_domain()
    log = tmp_path / f"{name}.log"
    with launched([LAUNCH, "mode:=lockstep", "seed:=7"], ros_env(domain), log) as proc:
        probe = Probe(domain)
        try:
            probe.subscribe("/clock", Clock, qos("clock"))
            probe.subscribe("/joint_states", JointState, qos("state"))
            probe.subscribe("/arm/ee_pose", PoseStamped, qos("state"))
            probe.subscribe("/episode/state", String, qos("latched"))
            assert probe.call(Trigger, "/episode/reset", Trigger.Request()).success
            pub = probe.node.create_publisher(MultiDOFJointTrajectory, "/arm/target", qos("command"))

            def reset_pose_in() -> bool:  # a pose from before the reset (the launch's own) can still be the latest
                m, s = probe.latest("/episode/state"), probe.latest("/arm/ee_pose")
                ep = json.loads(m.data) if m is not None else {}
                return (pub.get_subscription_count() > 0 and ep.get("state") == "ready" and s is not None
                        and stamp_to_sec(s.header.stamp) >= ep["t"] - 1e-6)

            probe.wait_for(reset_pose_in, 60, "arm_node and the reset's first pose", proc, log)
            t0 = stamp_to_sec(probe.latest("/arm/ee_pose").header.stamp)
            start = _ee(probe)
            traj = [start]  # the start is part of what must repeat
            for k in range(1, 16):
                pose = start.copy()
                pose[:3] += 0.004 * k * np.array([1.0, -0.5, -0.6])
                pub.publish(targets_to_msg(t0, [(t0 + 0.1 * k, pose, None)]))
                probe.wait_for(lambda k=k: stamp_to_sec(probe.latest("/arm/ee_pose").header.stamp) >= t0 + 0.1 * k - 1e-6,
                               30, f"lock-step {k}", proc, log)
                with probe.lock:
                    hit = [m for _, m in probe.msgs["/arm/ee_pose"]
                           if abs(stamp_to_sec(m.header.stamp) - (t0 + 0.1 * k)) < 1e-6]
                traj.append(msg_to_pose(hit[-1].pose))
            # time does not advance without commands
            t_last = _sim_now(probe)
            probe.wait_for(lambda: True, 1, "nothing")
            time.sleep(0.5)
            assert _sim_now(probe) == pytest.approx(t_last), "lock-step sim advanced without a command"
        finally:
            probe.close()
        assert stop(proc) == 0
    return np.array(traj)


def test_lockstep_gives_the_same_trajectory_twice(tmp_path):
    a = _lockstep_run(tmp_path, "a")
    b = _lockstep_run(tmp_path, "b")
    assert np.linalg.norm(a[-1, :3] - a[0, :3]) > 0.03, "the arm did not follow the lock-step targets"
    np.testing.assert_array_equal(a, b)


def test_a_required_node_that_dies_stops_the_launch_and_says_why(tmp_path):
    import os
    import re

    cell = (tmp_path / "cell.yaml")
    text = (ROOT / "hardware_configs" / "sim.yaml").read_text()
    cell.write_text(re.sub(r"ft:\n  backend: mujoco", "ft:\n  backend: netft\n  address: 127.0.0.1", text))
    log = tmp_path / "launch.log"
    with launched([LAUNCH, f"hardware_config:={cell}"], ros_env(fresh_domain()), log) as proc:
        rc = proc.wait(90)
    out = log.read_text()
    assert rc == 1, out[-2000:]
    assert "required node 'ft_node' exited with status 2: error: netft: no RDT data from 127.0.0.1" in out, out[-2000:]
    for pid in map(int, re.findall(r"started \w+ \(pid (\d+)\)", out)):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
