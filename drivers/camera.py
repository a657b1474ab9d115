"""Camera backends (`mujoco`, `opencv`, `realsense`): each fills a caller-owned RGB buffer with the
next frame and returns its device timestamp, so `camera_node` copies a frame exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def pinhole(width: int, height: int, fovy_deg: float) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) of an ideal camera with the given vertical field of view."""
    fy = 0.5 * height / np.tan(np.deg2rad(fovy_deg) / 2)
    return float(fy), float(fy), (width - 1) / 2.0, (height - 1) / 2.0


class MujocoCamera:
    """A camera of the sim cell: sim_world renders into a shared-memory ring and announces each frame."""

    def __init__(self, name: str, link_dir: Path, timeout: float = 1.0, **_: object):
        from robot_rl.drivers.sim_link import LinkClient

        self.name = name
        self.link = LinkClient(link_dir, f"camera_{name}", [f"camera/{name}"])
        self.lockstep = self.link.info.get("mode") == "lockstep"  # silence = the sim waiting for a command
        self.ring = self.link.ring(name)
        self.width, self.height = self.ring.width, self.ring.height
        self.intrinsics = pinhole(self.width, self.height, self.link.info["cameras"][name]["fovy_deg"])
        self.timeout = timeout
        self.overwritten = 0

    def set_streaming(self, on: bool) -> None:
        """Pause or resume the frames: sim_world renders a camera only while someone receives it."""
        self.link.set_streaming(on)

    def read_into(self, out: np.ndarray) -> float | None:
        msg, latest = self.link.recv(self.timeout), None
        while msg is not None:
            if msg.get("op") == "frame":
                latest = msg
            msg = self.link.recv(0.0)  # a consumer that fell behind skips to the newest frame
            if msg is None and latest is not None:
                if self.ring.read_into(latest["slot"], latest["seq"], out):
                    return float(latest["stamp"])
                self.overwritten += 1
        return None

    def close(self) -> None:
        self.link.close()


class OpenCVCamera:
    """A V4L2 device index or a video file through OpenCV (a file exercises the same code path).
    Files are paced at `rate_hz` and loop; devices are paced by the device."""

    def __init__(self, name: str, device: str | int, width: int, height: int, rate_hz: float = 30.0,
                 fovy_deg: float = 60.0, loop: bool = True, **_: object):
        import cv2

        self.cv2, self.name = cv2, name
        src = int(device) if str(device).isdigit() else str(device)
        self.is_file = isinstance(src, str)
        if self.is_file and not Path(src).exists():
            raise FileNotFoundError(f"camera '{name}': video file {src} does not exist")
        self.cap = cv2.VideoCapture(src, cv2.CAP_ANY if self.is_file else cv2.CAP_V4L2)
        if not self.cap.isOpened():
            raise ConnectionError(f"camera '{name}': OpenCV cannot open {src!r}; check the device in the hardware config")
        if not self.is_file:
            self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            self.cap.set(cv2.CAP_PROP_FPS, rate_hz)
        self.width, self.height, self.loop = width, height, loop
        self.period = 1.0 / rate_hz
        self.intrinsics = pinhole(width, height, fovy_deg)
        self._next = time.monotonic()
        self._bgr: np.ndarray | None = None

    def read_into(self, out: np.ndarray) -> float | None:
        if self.is_file:
            time.sleep(max(0.0, self._next - time.monotonic()))
            self._next = max(self._next + self.period, time.monotonic() - self.period)
        ok, self._bgr = self.cap.read(self._bgr)
        if not ok and self.is_file and self.loop:
            self.cap.set(self.cv2.CAP_PROP_POS_FRAMES, 0)
            ok, self._bgr = self.cap.read(self._bgr)
        if not ok:
            return None
        stamp = time.time() if self.is_file else self.cap.get(self.cv2.CAP_PROP_POS_MSEC) / 1e3 or time.time()
        if self._bgr.shape[:2] != (self.height, self.width):
            self._bgr = self.cv2.resize(self._bgr, (self.width, self.height), interpolation=self.cv2.INTER_AREA)
        self.cv2.cvtColor(self._bgr, self.cv2.COLOR_BGR2RGB, dst=out)
        return stamp

    def close(self) -> None:
        self.cap.release()


class RealSenseCamera:
    """Intel RealSense colour stream via pyrealsense2 (selected by serial). Intrinsics come from the device."""

    def __init__(self, name: str, serial: str, width: int, height: int, rate_hz: float = 30.0, **_: object):
        try:
            import pyrealsense2 as rs
        except ImportError:
            raise ImportError(f"camera '{name}': backend realsense needs pyrealsense2 (pip install pyrealsense2; "
                              "Debian libusb-1.0-0)") from None
        self.name, self.width, self.height = name, width, height
        self.pipe = rs.pipeline()
        cfg = rs.config()
        if serial:
            cfg.enable_device(str(serial))
        cfg.enable_stream(rs.stream.color, width, height, rs.format.rgb8, int(rate_hz))
        try:
            profile = self.pipe.start(cfg)
        except RuntimeError as e:
            raise ConnectionError(f"camera '{name}': RealSense {serial or '(any)'} did not start: {e}") from None
        i = profile.get_stream(rs.stream.color).as_video_stream_profile().get_intrinsics()
        self.intrinsics = (i.fx, i.fy, i.ppx, i.ppy)

    def read_into(self, out: np.ndarray) -> float | None:
        try:
            frames = self.pipe.wait_for_frames(1000)
        except RuntimeError:  # timeout: the node reports the missing frame
            return None
        color = frames.get_color_frame()
        out[...] = np.asanyarray(color.get_data())
        return color.get_timestamp() / 1e3  # device clock, ms

    def close(self) -> None:
        self.pipe.stop()


CAMERA_BACKENDS = {"mujoco": MujocoCamera, "opencv": OpenCVCamera, "realsense": RealSenseCamera}
