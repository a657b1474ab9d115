"""Teleop devices decoded from their documented wire formats (REFERENCES.md §5: SpaceMouse HID
reports, spacenavd events), the keyboard and gamepad paths, the mapping into the base frame, who
has control, the twist integrated into absolute targets, and the scripted operator."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from robot_rl.drivers.safety import SafetyLimits
from robot_rl.drivers.teleop import (
    DeviceMapping,
    Engagement,
    JoyDecoder,
    KeyboardDecoder,
    ScriptedOperator,
    SpaceMouseDecoder,
    SpacenavDecoder,
    TeleopError,
    TwistIntegrator,
    decode_spacenav,
    find_spacemouse,
)

from robot_rl.geometry import quat_to_rot
from robot_rl.hardware import HardwareConfigError, TeleopSection, load_hardware_config, section_from_params


def hid(report_id: int, *values: int) -> bytes:
    return bytes([report_id]) + struct.pack(f"<{len(values)}h", *values)


def test_spacemouse_hid_reports():
    d = SpaceMouseDecoder()
    assert d.feed(hid(1, 175, -350, 0))  # translation only (report 1, 7 bytes)
    assert np.allclose(d.axes, [0.5, -1.0, 0, 0, 0, 0])
    assert d.feed(hid(2, 35, 0, -700))  # rotation in report 2 (older devices), clipped at full scale
    assert np.allclose(d.axes, [0.5, -1.0, 0, 0.1, 0, -1.0])
    assert d.feed(hid(1, 0, 0, 70, -35, 0, 350))  # wireless models: all six axes in report 1
    assert np.allclose(d.axes, [0, 0, 0.2, -0.1, 0, 1.0])
    assert not d.feed(bytes([7, 1, 2])) and not d.feed(b"\x01")  # unknown report, truncated report
    d.feed(bytes([3, 0b01, 0]))  # button 0 pressed: one engage edge
    s = d.sample()
    assert s.engage_pressed and s.gripper is None
    d.feed(bytes([3, 0b01, 0]))  # still held: no new edge
    assert not d.sample().engage_pressed
    d.feed(bytes([3, 0b10, 0]))  # button 1: gripper toggles closed, once
    assert d.sample().gripper == 1.0 and d.sample().gripper is None


def test_spacenavd_events():
    motion = struct.pack("=8i", 0, 350, 0, -175, 0, 0, 35, 8)
    kind, axes = decode_spacenav(motion)
    assert kind == "motion" and np.allclose(axes, [1.0, 0, -0.5, 0, 0, 0.1])
    assert decode_spacenav(struct.pack("=8i", 1, 1, 0, 0, 0, 0, 0, 0)) == ("press", 1)
    assert decode_spacenav(struct.pack("=8i", 2, 0, 0, 0, 0, 0, 0, 0)) == ("release", 0)
    with pytest.raises(TeleopError, match="32"):
        decode_spacenav(motion[:20])
    with pytest.raises(TeleopError, match="type 9"):
        decode_spacenav(struct.pack("=8i", 9, 0, 0, 0, 0, 0, 0, 0))
    d = SpacenavDecoder()
    d.feed_event(motion)
    d.feed_event(struct.pack("=8i", 1, 0, 0, 0, 0, 0, 0, 0))
    s = d.sample()
    assert np.allclose(s.axes[:3], [1.0, 0, -0.5]) and s.engage_pressed
    d.feed_event(struct.pack("=8i", 2, 0, 0, 0, 0, 0, 0, 0))
    d.feed_event(struct.pack("=8i", 1, 1, 0, 0, 0, 0, 0, 0))
    s = d.sample()
    assert not s.engage_pressed and s.gripper == 1.0


def test_find_spacemouse_reads_sysfs(tmp_path):
    for name, hid_id in (("hidraw0", "0003:0000046D:0000C52B"), ("hidraw3", "0003:0000256F:0000C635")):
        (tmp_path / name / "device").mkdir(parents=True)
        (tmp_path / name / "device" / "uevent").write_text(f"DRIVER=hid-generic\nHID_ID={hid_id}\nHID_NAME=x\n")
    assert find_spacemouse(str(tmp_path)) == "/dev/hidraw0"  # 046d is Logitech-era 3Dconnexion
    (tmp_path / "hidraw0" / "device" / "uevent").write_text("HID_ID=0003:00001234:00000001\n")
    assert find_spacemouse(str(tmp_path)) == "/dev/hidraw3"
    with pytest.raises(TeleopError, match="udev"):
        find_spacemouse(str(tmp_path / "none"))


def test_keyboard_keys_hold_until_timeout_or_stop():
    k = KeyboardDecoder(key_timeout_s=0.6)
    k.feed(b"wA", now=0.0)  # case-insensitive
    assert np.allclose(k.sample(0.5).axes, [1, 1, 0, 0, 0, 0])
    k.feed(b"w", now=0.5)  # auto-repeat keeps x alive; y times out
    assert np.allclose(k.sample(0.9).axes, [1, 0, 0, 0, 0, 0])
    k.feed(b"s", now=0.9)  # the opposite key reverses
    assert k.sample(1.0).axes[0] == -1
    k.feed(b" ", now=1.0)
    assert not k.sample(1.0).axes.any()
    k.feed(b"gt\x1b[A", now=1.0)  # close the gripper, takeover; an arrow key's escape sequence is ignored
    s = k.sample(1.0)
    assert s.gripper == 1.0 and s.engage_pressed and not s.axes.any()
    s = k.sample(1.1)
    assert s.gripper is None and not s.engage_pressed
    k.feed(b"gg", now=1.2)  # absolute, not a toggle: still closed
    assert k.sample(1.2).gripper == 1.0
    k.feed(b"h", now=1.3)
    assert k.sample(1.3).gripper == -1.0


def test_joy_layout_and_button_edges():
    j = JoyDecoder()
    j.feed([0.2, -0.5, 0, 0, 0.9], [1, 0])  # axes (1, 0, 4, -, -, 3): x from axis 1, y from 0, z from 4
    s = j.sample()
    assert np.allclose(s.axes, [-0.5, 0.2, 0.9, 0, 0, 0]) and s.engage_pressed
    j.feed([0, 0], [1, 1])  # a short axes array (another pad) reads as 0; engage held, gripper pressed
    s = j.sample()
    assert not s.engage_pressed and s.gripper == 1.0 and not s.axes.any()


def test_mapping_deadband_axes_and_operator_frame():
    m = DeviceMapping(deadband=0.1, max_linear=0.2, max_angular=1.0, axis_map=(1, 0, 2, 3, 4, 5),
                      axis_sign=(1, -1, 1, 1, 1, 1))
    tw = m.shape([0.55, 0.05, np.nan, 0, 0, -1.0])  # x device → base y (sign -1); y device below the deadband
    assert np.allclose(tw, [0, -0.1, 0, 0, 0, -1.0])
    assert m.moving([0.0, 0.2, 0, 0, 0, 0]) and not m.moving([0.05] * 6)
    facing = DeviceMapping(deadband=0.0, max_linear=0.1, frame_yaw_deg=90.0)
    assert np.allclose(facing.shape([1, 0, 0, 0, 0, 0])[:3], [0, 0.1, 0], atol=1e-12)
    with pytest.raises(TeleopError, match="deadband"):
        DeviceMapping(deadband=1.0)
    with pytest.raises(TeleopError, match="axis_map"):
        DeviceMapping(axis_map=(0, 0, 1, 2, 3, 4))


def test_engagement_modes():
    e = Engagement("both", release_after_s=0.5)
    assert e.update(0.0, moving=True, button=False)  # motion takes control
    assert e.update(0.4, moving=False, button=False)
    assert not e.update(0.6, moving=False, button=False)  # and gives it back when idle
    assert e.update(1.0, moving=False, button=True)  # the button takes it and keeps it without motion
    assert e.update(5.0, moving=False, button=False)
    assert not e.update(5.1, moving=False, button=True)
    b = Engagement("button")
    assert not b.update(0.0, moving=True, button=False)
    m = Engagement("motion")
    assert not m.update(0.0, moving=False, button=True)
    with pytest.raises(TeleopError):
        Engagement("voice")


def test_twist_integrates_into_targets_inside_the_limits():
    limits = SafetyLimits(workspace_low=(0.3, -0.2, 0.1), workspace_high=(0.6, 0.2, 0.4), max_tilt_rad=0.5)
    integ = TwistIntegrator(limits)
    with pytest.raises(TeleopError, match="measured pose"):
        integ.step(np.zeros(6), 0.01)
    down = np.array([0.5, 0.0, 0.2, 0.0, 1.0, 0.0, 0.0])  # tool pointing down (the nominal orientation)
    integ.start(down)
    for _ in range(10):
        t = integ.step(np.array([0.1, 0, 0, 0, 0, 0.5]), 0.01)  # 10 cm/s along x, yawing
    assert np.allclose(t[:3], [0.51, 0, 0.2])
    assert np.isclose((quat_to_rot(t[3:]) * quat_to_rot(down[3:]).inv()).magnitude(), 0.05)
    for _ in range(200):
        t = integ.step(np.array([0.1, 0, -0.1, 0, 0, 0]), 0.01)  # into the wall and the floor: slides along
    assert np.allclose(t[:3], [0.6, 0, 0.1])
    for _ in range(200):
        t = integ.step(np.array([0, 0, 0, 1.0, 0, 0]), 0.01)  # tilting: stops at the tilt limit
    tilt = np.arccos(quat_to_rot(t[3:]).as_matrix()[:, 2] @ quat_to_rot(down[3:]).as_matrix()[:, 2])
    assert 0.45 < tilt <= 0.5


def test_scripted_operator_hysteresis_and_keys():
    op = ScriptedOperator(takeover_m=0.05, handback_m=0.01, tolerance_m=0.004)
    ref = np.array([0.5, 0.0, 0.2])
    assert not op.decide([0.5, 0.03, 0.2], ref)[0]  # 3 cm off: watching
    driving, err = op.decide([0.5, 0.06, 0.19], ref)  # 6 cm off: takes over
    assert driving and op.keys(err) == " dr"
    assert op.decide([0.5, 0.02, 0.2], ref)[0]  # still 2 cm: keeps driving
    assert not op.decide([0.5, 0.005, 0.2], ref)[0]  # within 1 cm: hands back
    assert np.allclose(op.axes(np.array([0.1, -0.025, 0])), [1, -0.5, 0, 0, 0, 0])
    with pytest.raises(TeleopError):
        ScriptedOperator(takeover_m=0.01, handback_m=0.02)


def test_teleop_config_per_device_and_overrides(tmp_path):
    cfg = load_hardware_config("sim")
    assert cfg.teleop.mapping() == cfg.teleop.keyboard
    params = cfg.ros_params("teleop_node")
    params.update({"teleop.device": "spacemouse", "teleop.spacemouse.deadband": 0.2})
    t = section_from_params(TeleopSection, params, "teleop")
    assert t.device == "spacemouse" and t.mapping().deadband == 0.2
    bad = tmp_path / "cell.yaml"
    bad.write_text("name: cell\nteleop:\n  spacemouse: {deadband: 1.5}\n")
    with pytest.raises(HardwareConfigError, match=r"teleop.spacemouse.*deadband 1.5"):
        load_hardware_config(bad)
    bad.write_text("name: cell\nteleop: {device: theremin}\n")
    with pytest.raises(HardwareConfigError, match="teleop.device"):
        load_hardware_config(bad)
    bad.write_text("name: cell\nteleop: {lead_ms: 0}\n")  # teleop targets due the moment they are made: all late
    with pytest.raises(HardwareConfigError, match=r"teleop.lead_ms.*\(0, 1000\]"):
        load_hardware_config(bad)
