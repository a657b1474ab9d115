"""`teleop_node`: the operator's device → `teleop/twist` and `teleop/state` (common.TeleopOutput)
at `teleop.rate_hz`. Devices (drivers/teleop.py): `keyboard` (the terminal, or a
FIFO named by `teleop.device_path` — what `robot-rl record` and the scripted operator write into),
`spacemouse` (/dev/hidrawN reports), `spacenav` (the spacenavd socket), `joy` (sensor_msgs/Joy on
`joy` from the standard joy node). The intervention mux integrates the twist while `engaged`.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time

from robot_rl.drivers.teleop import (
    KEY_HELP,
    Engagement,
    JoyDecoder,
    KeyboardDecoder,
    SpaceMouseDecoder,
    SpacenavDecoder,
    TeleopError,
    find_spacemouse,
)
from robot_rl.hardware import TeleopSection, section_from_params
from robot_rl.nodes.common import Diagnostics, TeleopOutput, declare, qos, run_node

SPNAV_SOCKET = "/var/run/spnav.sock"


class _Reader:
    """Feeds a decoder from a blocking source in its own thread; `error` says why it stopped."""

    def __init__(self, t: TeleopSection, decoder, stop: threading.Event):
        self.t, self.decoder, self.stop = t, decoder, stop
        self.lock = threading.Lock()
        self.error = ""
        self.bytes = 0
        self.fd = self._open()
        threading.Thread(target=self._run, daemon=True).start()

    def _open(self) -> int | socket.socket:
        t = self.t
        if t.device == "keyboard":
            if t.device_path:
                return os.open(t.device_path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO: a writer may come later
            if not sys.stdin.isatty():
                raise TeleopError("teleop: keyboard needs a terminal, or teleop.device_path naming a FIFO to read keys "
                                  "from (robot-rl record makes one)")
            import termios
            import tty

            fd = sys.stdin.fileno()
            old = termios.tcgetattr(fd)
            tty.setcbreak(fd)  # keys arrive one by one, unechoed
            self.restore = lambda: termios.tcsetattr(fd, termios.TCSADRAIN, old)
            return fd
        if t.device == "spacemouse":
            path = t.device_path or find_spacemouse()
            try:
                return os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError as e:
                raise TeleopError(f"teleop: cannot open {path} ({e.strerror}); a udev rule must give your user read "
                                  "access to the SpaceMouse's hidraw node") from None
        if t.device == "spacenav":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(t.device_path or SPNAV_SOCKET)
            except OSError as e:
                raise TeleopError(f"teleop: cannot reach spacenavd at {t.device_path or SPNAV_SOCKET} ({e}); "
                                  "is spacenavd running?") from None
            return s
        raise TeleopError(f"teleop: device '{t.device}' has no reader")

    def _run(self) -> None:
        pending = b""
        while not self.stop.is_set():
            src = self.fd
            ready, _, _ = select.select([src], [], [], 0.1)
            if not ready:
                continue
            try:
                data = src.recv(4096) if isinstance(src, socket.socket) else os.read(src, 4096)
            except BlockingIOError:
                continue
            except OSError as e:
                self.error = f"teleop: reading the {self.t.device} failed ({e}); the twist stops"
                return
            if not data:
                if self.t.device == "keyboard" and self.t.device_path:  # the FIFO's writer left: wait for the next
                    os.close(src)
                    self.fd = self._open()
                    time.sleep(0.05)
                    continue
                self.error = f"teleop: the {self.t.device} closed its stream; the twist stops"
                return
            self.bytes += len(data)
            with self.lock:
                if self.t.device == "keyboard":
                    self.decoder.feed(data, time.monotonic())
                elif self.t.device == "spacemouse":
                    self.decoder.feed(data)  # one read is one report
                else:
                    pending += data
                    while len(pending) >= 32:
                        self.decoder.feed_event(pending[:32])
                        pending = pending[32:]

    def sample(self):
        with self.lock:
            return self.decoder.sample(time.monotonic()) if self.t.device == "keyboard" else self.decoder.sample()


def build(cfg, _rt_note, stop):
    from rclpy.node import Node
    from sensor_msgs.msg import Joy

    node = Node("teleop_node")
    p = declare(node, {"hardware_config": cfg.source, **cfg.ros_params("teleop_node")})
    t = section_from_params(TeleopSection, p, "teleop")
    if t.device == "web":  # the web console publishes the operator's twist itself
        node.get_logger().info("teleop: the web console is the teleop device; this node stays idle")
        return node, None
    if t.device not in ("keyboard", "spacemouse", "spacenav", "joy"):
        raise TeleopError(f"teleop: device '{t.device}' must be keyboard, spacemouse, spacenav, joy or web")
    mapping = t.mapping()
    engagement = Engagement(t.engage, t.release_after_s)
    if t.device == "joy":
        joy = JoyDecoder()
        reader = None
        node.create_subscription(Joy, "joy", lambda m: joy.feed(list(m.axes), list(m.buttons)), qos("state"))
    else:
        decoder = {"keyboard": lambda: KeyboardDecoder(t.key_timeout_s), "spacemouse": SpaceMouseDecoder,
                   "spacenav": SpacenavDecoder}[t.device]()
        reader = _Reader(t, decoder, stop)
    if t.device == "keyboard":
        node.get_logger().info(f"keyboard teleop: {KEY_HELP}")
    out = TeleopOutput(node)
    diag = Diagnostics(node)
    counts = {"samples": 0, "engagements": 0}

    def loop() -> None:
        period = 1.0 / t.rate_hz
        next_t = time.monotonic()
        while not stop.is_set():
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))
            s = reader.sample() if reader is not None else joy.sample()
            was = engagement.engaged
            engaged = engagement.update(time.monotonic(), mapping.moving(s.axes), s.engage_pressed)
            counts["engagements"] += int(engaged and not was)
            out.publish(mapping.shape(s.axes), s.gripper, engaged)
            counts["samples"] += 1
            error = reader.error if reader is not None else ""
            if error:
                diag.error(error)
            diag.maybe_publish({"device": t.device, "engaged": engaged, **counts,
                                "bytes": reader.bytes if reader is not None else 0, "error": error or "none"},
                               level_ok=not error)
        if reader is not None and hasattr(reader, "restore"):
            reader.restore()

    return node, loop


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
