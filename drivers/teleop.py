"""Teleoperation devices and the twist they command, in plain Python (`teleop_node` and
`intervention_mux` wrap them; no rclpy here).

Every device reduces to the same sample: six axes in [-1, 1] (x y z rx ry rz of the device), a
gripper command in [-1, 1] (-1 open, +1 closed; None = unchanged) and an engage-button edge.
`DeviceMapping` turns the axes into a twist in the robot's base frame (deadband, axis map and
signs, scale in m/s and rad/s, the operator's yaw about base z); `Engagement` decides when the
human has control (a button toggles it, motion above the deadband takes it, and motion-taken
control goes back after `release_after_s` without motion); `TwistIntegrator` turns the twist into
absolute targets from the measured pose (ARCHITECTURE.md: teleop and policy targets meet in one type).

Device protocols (REFERENCES.md §5):
- SpaceMouse HID: report 1 holds translation x y z as little-endian int16 in bytes 1-6, and on
  wireless/receiver models rotation in bytes 7-12; older devices send rotation as report 2; report 3
  carries the button bits. About 350 counts is full scale. On Linux `/dev/hidrawN` yields these
  reports (report id first) from a plain `read`.
- spacenavd socket: events of 8 native int32: type 0 motion (x y z rx ry rz period), 1 press,
  2 release (button number).
- Terminal keyboard: bytes (no key-release events): a motion key drives its axis until the opposite
  key, `space` (stop), or `key_timeout_s` without the key repeating; `g` closes, `h` opens the
  gripper (absolute commands: a reset episode starts open whatever was pressed before).
- Gamepad: `sensor_msgs/Joy` axes and buttons (from the standard `joy` node, evdev-backed).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import numpy as np
from robot_rl.drivers.safety import SafetyLimits
from scipy.spatial.transform import Rotation

from robot_rl.geometry import quat_to_rot, rot_to_quat

SPACEMOUSE_FULL_SCALE = 350.0  # counts
SPACEMOUSE_VENDORS = ("046d", "256f")  # Logitech (older 3Dconnexion) and 3Dconnexion USB vendor ids
SPNAV_EVENT = struct.Struct("=8i")


class TeleopError(ValueError):
    """One line for the operator: which device, what is wrong, what to do."""


@dataclass(frozen=True)
class DeviceMapping:
    """Device axes → base-frame twist. `axis_map[i]` is the device axis that drives base axis i
    (x y z rx ry rz), `axis_sign[i]` its sign."""

    deadband: float = 0.1  # fraction of full scale, per axis
    max_linear: float = 0.1  # m/s at full deflection
    max_angular: float = 0.5  # rad/s at full deflection
    axis_map: tuple[int, int, int, int, int, int] = (0, 1, 2, 3, 4, 5)
    axis_sign: tuple[float, float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    frame_yaw_deg: float = 0.0  # the operator's frame, rotated about base z (an operator facing the robot: 180)

    def __post_init__(self):
        if not 0.0 <= self.deadband < 1.0:
            raise TeleopError(f"teleop: deadband {self.deadband} must be in [0, 1)")
        if sorted(self.axis_map) != list(range(6)) or len(self.axis_sign) != 6:
            raise TeleopError(f"teleop: axis_map {list(self.axis_map)} must order the six axes 0..5 "
                              f"and axis_sign needs six signs")

    def shape(self, axes: np.ndarray) -> np.ndarray:
        """Six device axes in [-1, 1] → twist (vx vy vz m/s, wx wy wz rad/s) in the base frame."""
        a = np.clip(np.nan_to_num(np.asarray(axes, dtype=np.float64), nan=0.0), -1.0, 1.0)
        live = np.abs(a) > self.deadband  # rescaled so that the output starts at 0 past the deadband
        a = np.where(live, np.sign(a) * (np.abs(a) - self.deadband) / (1.0 - self.deadband), 0.0)
        mapped = a[list(self.axis_map)] * np.asarray(self.axis_sign)
        rot = Rotation.from_euler("z", self.frame_yaw_deg, degrees=True)
        return np.concatenate([rot.apply(mapped[:3]) * self.max_linear, rot.apply(mapped[3:]) * self.max_angular])

    def moving(self, axes: np.ndarray) -> bool:
        return bool(np.any(np.abs(np.nan_to_num(np.asarray(axes, dtype=np.float64))) > self.deadband))


@dataclass
class TeleopSample:
    axes: np.ndarray = field(default_factory=lambda: np.zeros(6))
    gripper: float | None = None
    engage_pressed: bool = False  # an engage-button press since the last sample (an edge, not a level)


# ---- SpaceMouse (HID reports) --------------------------------------------------------------------
class SpaceMouseDecoder:
    """HID reports → axes and buttons. Button 0 toggles engagement, button 1 toggles the gripper."""

    def __init__(self, full_scale: float = SPACEMOUSE_FULL_SCALE):
        self.full_scale = full_scale
        self.axes = np.zeros(6)
        self.buttons = 0
        self.gripper = -1.0
        self._edges = {"engage": False, "gripper": False}

    def feed(self, report: bytes) -> bool:
        """One report (report id first). False for a report this decoder does not know."""
        if len(report) < 2:
            return False
        rid = report[0]
        if rid == 1 and len(report) >= 7:
            n = 6 if len(report) >= 13 else 3
            self.axes[:n] = np.array(struct.unpack_from(f"<{n}h", report, 1)) / self.full_scale
        elif rid == 2 and len(report) >= 7:
            self.axes[3:] = np.array(struct.unpack_from("<3h", report, 1)) / self.full_scale
        elif rid == 3:
            bits = int.from_bytes(report[1:], "little")
            pressed = bits & ~self.buttons
            self._edges["engage"] |= bool(pressed & 1)
            if pressed & 2:
                self.gripper = -self.gripper
                self._edges["gripper"] = True
            self.buttons = bits
        else:
            return False
        self.axes = np.clip(self.axes, -1.0, 1.0)
        return True

    def sample(self) -> TeleopSample:
        s = TeleopSample(self.axes.copy(), self.gripper if self._edges["gripper"] else None, self._edges["engage"])
        self._edges = {"engage": False, "gripper": False}
        return s


def find_spacemouse(sys_class: str = "/sys/class/hidraw") -> str:
    """The /dev/hidrawN of the first 3Dconnexion device, from sysfs; TeleopError if there is none."""
    from pathlib import Path

    for dev in sorted(Path(sys_class).glob("hidraw*")):
        try:
            uevent = (dev / "device" / "uevent").read_text().lower()
        except OSError:
            continue
        ids = next((ln.split("=", 1)[1] for ln in uevent.splitlines() if ln.startswith("hid_id=")), "")
        parts = ids.split(":")  # bus:vendor:product, 8 hex digits each
        if len(parts) == 3 and parts[1][-4:] in SPACEMOUSE_VENDORS:
            return f"/dev/{dev.name}"
    raise TeleopError("teleop: no SpaceMouse found under /sys/class/hidraw; plug it in, add a udev rule giving "
                      "your user read access to its hidraw node, or set teleop.device_path")


# ---- spacenavd (socket events) -----------------------------------------------------------------
def decode_spacenav(event: bytes) -> tuple[str, np.ndarray | int]:
    """One 32-byte spacenavd event → ('motion', six axes in [-1, 1]) | ('press' | 'release', button)."""
    if len(event) != SPNAV_EVENT.size:
        raise TeleopError(f"teleop: spacenavd event of {len(event)} bytes, expected {SPNAV_EVENT.size}")
    kind, *rest = SPNAV_EVENT.unpack(event)
    if kind == 0:
        return "motion", np.clip(np.array(rest[:6], dtype=np.float64) / SPACEMOUSE_FULL_SCALE, -1.0, 1.0)
    if kind in (1, 2):
        return ("press" if kind == 1 else "release"), int(rest[0])
    raise TeleopError(f"teleop: unknown spacenavd event type {kind}")


class SpacenavDecoder(SpaceMouseDecoder):
    """spacenavd events → the same state as the HID decoder (button 0 engage, button 1 gripper)."""

    def feed_event(self, event: bytes) -> None:
        kind, value = decode_spacenav(event)
        if kind == "motion":
            self.axes = value
        else:
            bits = self.buttons | (1 << value) if kind == "press" else self.buttons & ~(1 << value)
            self.feed(bytes([3]) + bits.to_bytes(4, "little"))


# ---- keyboard (terminal bytes) -------------------------------------------------------------------
# key → (device axis, sign); the device axes are the base axes unless the mapping says otherwise
KEY_AXES = {"w": (0, 1.0), "s": (0, -1.0), "a": (1, 1.0), "d": (1, -1.0), "r": (2, 1.0), "f": (2, -1.0),
            "q": (5, 1.0), "e": (5, -1.0)}
ESCAPE_SEQUENCE = re.compile(r"\x1b(\[[0-9;]*[A-Za-z~]|O.|.)?")
KEY_HELP = "w/s ±x  a/d ±y  r/f ±z  q/e ±yaw  space stop  g close / h open the gripper  t takeover/hand back"


class KeyboardDecoder:
    """Terminal key bytes → axes. A terminal sends no key releases: a held key repeats, and an axis
    goes back to 0 after `key_timeout_s` without its key (longer than the auto-repeat delay)."""

    def __init__(self, key_timeout_s: float = 0.6):
        self.key_timeout_s = key_timeout_s
        self.held: dict[int, tuple[float, float]] = {}  # axis → (sign, time of the last key)
        self.gripper = -1.0
        self._engage, self._gripper_edge = False, False

    def feed(self, data: bytes, now: float) -> None:
        text = ESCAPE_SEQUENCE.sub("", data.decode("ascii", errors="ignore"))  # arrows, function keys
        for ch in text.lower():
            if ch in KEY_AXES:
                axis, sign = KEY_AXES[ch]
                self.held[axis] = (sign, now)
            elif ch == " ":
                self.held.clear()
            elif ch in ("g", "h"):  # absolute: the arm's gripper may have changed since the last key
                self.gripper, self._gripper_edge = (1.0 if ch == "g" else -1.0), True
            elif ch in ("t", "\n", "\r"):
                self._engage = True

    def sample(self, now: float) -> TeleopSample:
        self.held = {a: v for a, v in self.held.items() if now - v[1] <= self.key_timeout_s}
        axes = np.zeros(6)
        for axis, (sign, _) in self.held.items():
            axes[axis] = sign
        s = TeleopSample(axes, self.gripper if self._gripper_edge else None, self._engage)
        self._engage, self._gripper_edge = False, False
        return s


# ---- gamepad (sensor_msgs/Joy) -------------------------------------------------------------------
@dataclass(frozen=True)
class JoyLayout:
    """Which Joy axes are the six device axes, and which buttons engage and toggle the gripper
    (defaults: an Xbox-style pad under the `joy` node: sticks for x y / z yaw, triggers unused)."""

    axes: tuple[int, int, int, int, int, int] = (1, 0, 4, -1, -1, 3)  # -1: not on this pad
    engage_button: int = 0
    gripper_button: int = 1


class JoyDecoder:
    def __init__(self, layout: JoyLayout = JoyLayout()):
        self.layout = layout
        self.axes = np.zeros(6)
        self.gripper = -1.0
        self._prev: tuple[int, ...] = ()
        self._engage, self._gripper_edge = False, False

    def feed(self, axes: list[float], buttons: list[int]) -> None:
        self.axes = np.array([axes[i] if 0 <= i < len(axes) else 0.0 for i in self.layout.axes], dtype=np.float64)

        def pressed(i: int) -> bool:
            return 0 <= i < len(buttons) and bool(buttons[i]) and not (i < len(self._prev) and self._prev[i])

        self._engage |= pressed(self.layout.engage_button)
        if pressed(self.layout.gripper_button):
            self.gripper, self._gripper_edge = -self.gripper, True
        self._prev = tuple(buttons)

    def sample(self) -> TeleopSample:
        s = TeleopSample(self.axes.copy(), self.gripper if self._gripper_edge else None, self._engage)
        self._engage, self._gripper_edge = False, False
        return s


# ---- who has control ---------------------------------------------------------------------------
class Engagement:
    """`mode`: button (the engage button toggles), motion (motion above the deadband takes control,
    `release_after_s` without motion gives it back) or both."""

    def __init__(self, mode: str = "both", release_after_s: float = 0.5):
        if mode not in ("button", "motion", "both"):
            raise TeleopError(f"teleop: engage '{mode}' must be button, motion or both")
        self.mode, self.release_after_s = mode, release_after_s
        self.engaged, self.by_button = False, False
        self.last_motion = -np.inf

    def update(self, now: float, moving: bool, button: bool) -> bool:
        if moving:
            self.last_motion = now
        if button and self.mode != "motion":
            self.engaged = not self.engaged
            self.by_button = self.engaged
        elif moving and not self.engaged and self.mode != "button":
            self.engaged, self.by_button = True, False
        elif self.engaged and not self.by_button and now - self.last_motion > self.release_after_s:
            self.engaged = False
        return self.engaged


class TwistIntegrator:
    """Absolute targets from a twist: start at the measured pose when the human takes control, then
    `target ← target ⊕ twist·dt`, kept inside the workspace box and the tilt limit (the operator
    slides along a wall instead of having the whole target refused)."""

    def __init__(self, limits: SafetyLimits):
        self.limits = limits
        self.target: np.ndarray | None = None

    def start(self, pose: np.ndarray) -> None:
        self.target = np.asarray(pose, dtype=np.float64).copy()

    def step(self, twist: np.ndarray, dt: float) -> np.ndarray:
        if self.target is None:
            raise TeleopError("teleop: integrating a twist before control started from a measured pose")
        tw = np.asarray(twist, dtype=np.float64)
        t = self.target.copy()
        t[:3] = np.clip(t[:3] + tw[:3] * dt, self.limits.workspace_low, self.limits.workspace_high)
        r_new = Rotation.from_rotvec(tw[3:] * dt) * quat_to_rot(t[3:])
        nominal_z = quat_to_rot(self.limits.nominal_quat).as_matrix()[:, 2]
        tilt = float(np.arccos(np.clip(r_new.as_matrix()[:, 2] @ nominal_z, -1.0, 1.0)))
        if tilt <= self.limits.max_tilt_rad:  # past the limit: the rotation part of this step is dropped
            t[3:] = rot_to_quat(r_new)
        self.target = t
        return t.copy()


# ---- scripted operator -------------------------------------------------------------------------
class ScriptedOperator:
    """A stand-in for a person watching the robot: takes over when the end effector is more than
    `takeover_m` from where the scripted expert would have it, hands back within `handback_m`,
    and in between drives toward the expert's point through a device's axes (what a human's hand
    would do with the same device): `keys` for the terminal keyboard, `axes` for a joystick."""

    def __init__(self, takeover_m: float = 0.05, handback_m: float = 0.01, tolerance_m: float = 0.004,
                 tolerance_rad: float = 0.03):
        if not 0 <= handback_m < takeover_m:
            raise TeleopError("scripted operator: handback_m must be below takeover_m")
        self.takeover_m, self.handback_m, self.tolerance_m = takeover_m, handback_m, tolerance_m
        self.tolerance_rad = tolerance_rad
        self.driving = False

    def decide(self, ee_pos: np.ndarray, reference: np.ndarray) -> tuple[bool, np.ndarray]:
        """(whether the operator drives now, the position error it steers against)."""
        err = np.asarray(reference, dtype=np.float64)[:3] - np.asarray(ee_pos, dtype=np.float64)[:3]
        d = float(np.linalg.norm(err))
        if not self.driving and d > self.takeover_m:
            self.driving = True
        elif self.driving and d < self.handback_m:
            self.driving = False
        return self.driving, err

    def pose_error(self, reference: np.ndarray, ee_pose: np.ndarray) -> np.ndarray:
        """(dx, dy, dz, dyaw) from the end effector to a reference pose (xyz + wxyz); yaw about base z."""
        dyaw = (quat_to_rot(reference[3:]) * quat_to_rot(ee_pose[3:]).inv()).as_rotvec()[2]
        return np.append(np.asarray(reference[:3], dtype=np.float64) - ee_pose[:3], dyaw)

    def reached(self, err: np.ndarray) -> bool:
        e = np.asarray(err, dtype=np.float64)
        return bool(np.all(np.abs(e[:3]) < self.tolerance_m) and (len(e) < 4 or abs(e[3]) < self.tolerance_rad))

    def axes(self, err: np.ndarray, full_scale_m: float = 0.05, full_scale_rad: float = 0.3) -> np.ndarray:
        """Proportional deflection: full scale at `full_scale_m` of error (and yaw at `full_scale_rad`)."""
        e = np.asarray(err, dtype=np.float64)
        a = np.zeros(6)
        a[:3] = np.clip(e[:3] / full_scale_m, -1.0, 1.0)
        if len(e) > 3:
            a[5] = np.clip(e[3] / full_scale_rad, -1.0, 1.0)
        return a

    def keys(self, err: np.ndarray) -> str:
        """Terminal keys for the sign of each axis error beyond the tolerance (bang-bang, as a
        person tapping keys; yaw too when the error has it); a space first stops the other axes."""
        e = np.asarray(err, dtype=np.float64)
        out = " "
        for axis, (pos, neg) in enumerate((("w", "s"), ("a", "d"), ("r", "f"), ("q", "e"))[:len(e)]):
            tol = self.tolerance_m if axis < 3 else self.tolerance_rad
            if e[axis] > tol:
                out += pos
            elif e[axis] < -tol:
                out += neg
        return out
