"""The link between `sim_world` (the one process owning MuJoCo) and the `mujoco` backends of the
camera, F/T, arm and episode nodes. Plain Python, no ROS: the nodes stay thin shells.

Small messages (state, targets, resets) are JSON datagrams on Unix sockets in one run directory;
camera frames go into per-camera shared-memory rings (files in /dev/shm) and are announced by a
datagram carrying the slot and sequence number, so a frame is copied once, into the consumer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import select
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SLOTS = 4  # frames in flight per camera; a consumer has SLOTS-1 camera periods to copy one
_SLOT_HEADER = struct.Struct("<Qd")  # sequence number, stamp (s); sequence 0 = being written
_MAX_DATAGRAM = 65536
_FULL_QUEUE_RETRY_S = 0.0002
LOCKSTEP_SEND_WAIT_S = 2.0  # lock-step: how long a send waits for a consumer that has not read (then drops)
CONTROL_WAIT_S = 2.0  # commands and their answers (target, reset, reset_done...) wait for a slow reader in any mode


class LinkError(RuntimeError):
    """The sim link is missing or broken. One line: what, where, what to do."""


def default_link_dir(name: str = "") -> Path:
    """One run directory per ROS domain (and optional name), so parallel test runs never meet."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    domain = os.environ.get("ROS_DOMAIN_ID", "0")
    return Path(base) / f"robot_rl_sim_d{domain}{'_' + name if name else ''}"


def _ring_path(link_dir: Path, camera: str) -> str:
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    tag = hashlib.sha1(str(link_dir.resolve()).encode()).hexdigest()[:10]
    return f"{shm}/robot_rl_{tag}_{camera}"


class FrameRing:
    """A camera's ring of SLOTS frames in a shared-memory file, with a seqlock per slot."""

    def __init__(self, path: str, width: int, height: int, create: bool):
        self.path, self.width, self.height = path, width, height
        self.frame_bytes = width * height * 3
        self.slot_bytes = _SLOT_HEADER.size + self.frame_bytes
        size = self.slot_bytes * SLOTS
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise LinkError(f"sim link: frame ring {path} is smaller than {width}x{height} frames; "
                                "restart sim_world")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._buf = np.frombuffer(self._mm, np.uint8)
        self._next = 0
        self._seq = 0

    def frame_view(self, slot: int) -> np.ndarray:
        o = slot * self.slot_bytes + _SLOT_HEADER.size
        return self._buf[o:o + self.frame_bytes].reshape(self.height, self.width, 3)

    def write(self, image: np.ndarray, stamp: float) -> tuple[int, int]:
        slot, self._seq = self._next, self._seq + 1
        self._next = (slot + 1) % SLOTS
        o = slot * self.slot_bytes
        _SLOT_HEADER.pack_into(self._mm, o, 0, stamp)
        self.frame_view(slot)[...] = image
        _SLOT_HEADER.pack_into(self._mm, o, self._seq, stamp)
        return slot, self._seq

    def read_into(self, slot: int, seq: int, out: np.ndarray) -> bool:
        """Copy the frame announced as (slot, seq) into `out`; False if it was overwritten meanwhile."""
        o = slot * self.slot_bytes
        if _SLOT_HEADER.unpack_from(self._mm, o)[0] != seq:
            return False
        out[...] = self.frame_view(slot)
        return _SLOT_HEADER.unpack_from(self._mm, o)[0] == seq

    def close(self, unlink: bool = False) -> None:
        self._buf = None  # release the exported buffer before closing the map
        with contextlib.suppress(BufferError):
            self._mm.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


class _Endpoint:
    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.path = path
        self.dropped = 0  # datagrams dropped on a full peer queue

    def try_send(self, addr: str, data: bytes) -> bool | None:
        """One non-blocking send: True sent, False the peer's queue is full, None the peer is gone."""
        try:
            self.sock.sendto(data, addr)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return None
            raise

    def send(self, addr: str, msg: dict[str, Any], wait_s: float = 0.0) -> bool:
        """Send without blocking; False when the peer is gone (the caller forgets it). A peer's queue
        holds few datagrams (net.unix.max_dgram_qlen, 10 by default): when it is full the sample is
        dropped, or with `wait_s` retried until the peer has read (lock-step loses nothing)."""
        data, deadline = _encode(msg), time.monotonic() + wait_s
        while (sent := self.try_send(addr, data)) is False:
            if time.monotonic() >= deadline:
                self.dropped += 1
                return True  # real time: this sample is dropped, the next one will do
            time.sleep(_FULL_QUEUE_RETRY_S)
        return sent is True

    def recv(self, timeout: float | None = 0.0) -> tuple[dict[str, Any], str] | None:
        if timeout and not select.select([self.sock], [], [], timeout)[0]:
            return None
        try:
            data, addr = self.sock.recvfrom(_MAX_DATAGRAM)
        except BlockingIOError:
            return None
        try:
            return json.loads(data), addr
        except ValueError:
            return None  # a malformed datagram is ignored, never fatal

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class CameraRingInfo:
    name: str
    width: int
    height: int
    fovy_deg: float
    path: str


class WorldLink:
    """sim_world's side: owns the rings, keeps subscribers per stream, receives commands."""

    def __init__(self, link_dir: Path, cameras: list[tuple[str, int, int, float]], info: dict[str, Any]):
        self.dir = Path(link_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ep = _Endpoint(self.dir / "world.sock")
        self.rings = {name: FrameRing(_ring_path(self.dir, name), w, h, create=True) for name, w, h, _ in cameras}
        self.cameras = {name: CameraRingInfo(name, w, h, fovy, self.rings[name].path) for name, w, h, fovy in cameras}
        self.info = info
        self.subscribers: dict[str, set[str]] = {}
        self.send_wait_s = LOCKSTEP_SEND_WAIT_S if info.get("mode") == "lockstep" else 0.0
        self._answers: list[tuple[str, bytes, float]] = []  # (reader, datagram, give-up time), oldest first

    def poll(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Drain pending datagrams. Hellos are answered here; everything else is returned."""
        self._send_answers()
        out, first = [], True
        while (got := self.ep.recv(timeout if first else 0.0)) is not None:
            first = False
            msg, addr = got
            if msg.get("op") == "hello":
                for stream in msg.get("streams", []):
                    self.subscribers.setdefault(stream, set()).add(addr)
                self.ep.send(addr, {"op": "welcome", "cameras": {k: vars(v) for k, v in self.cameras.items()},
                                    **self.info})  # (a client says hello until it is welcomed)
            elif msg.get("op") == "bye":  # a client pauses streams (a camera no one watches is not rendered)
                for stream in msg.get("streams", []):
                    self.subscribers.get(stream, set()).discard(addr)
            else:
                msg["_from"] = addr
                out.append(msg)
        return out

    def reply(self, msg: dict[str, Any], answer: dict[str, Any]) -> None:
        """An answer is not dropped for a reader's full queue of samples (a lost `reset_done` failed the
        reset it answered) and does not stall the sim's loop either: it waits here, in order, and is
        sent again at each poll until the reader has room (for up to CONTROL_WAIT_S)."""
        if "_from" in msg:  # (a message handed over directly, not through the link, has no one to answer)
            self._answers.append((msg["_from"], _encode(answer), time.monotonic() + CONTROL_WAIT_S))
            self._send_answers()

    def _send_answers(self) -> None:
        waiting, blocked = [], set()
        for addr, data, deadline in self._answers:
            if addr in blocked or self.ep.try_send(addr, data) is False:
                if time.monotonic() < deadline:
                    waiting.append((addr, data, deadline))
                    blocked.add(addr)  # the next answers to that reader keep their order
                else:
                    self.ep.dropped += 1
        self._answers = waiting

    def publish(self, stream: str, msg: dict[str, Any]) -> None:
        subs = self.subscribers.get(stream)
        if subs:
            for addr in [a for a in subs if not self.ep.send(a, msg, self.send_wait_s)]:
                subs.discard(addr)

    def publish_frame(self, camera: str, image: np.ndarray, stamp: float) -> None:
        slot, seq = self.rings[camera].write(image, stamp)
        self.publish(f"camera/{camera}", {"op": "frame", "slot": slot, "seq": seq, "stamp": stamp})

    def has_subscribers(self, stream: str) -> bool:
        return bool(self.subscribers.get(stream))

    def close(self) -> None:
        self.ep.close()
        for r in self.rings.values():
            r.close(unlink=True)


class LinkClient:
    """A backend's side: says hello for its streams, then receives and sends small messages."""

    def __init__(self, link_dir: Path, role: str, streams: list[str], timeout: float = 30.0):
        self.dir = Path(link_dir)
        self.world = str(self.dir / "world.sock")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ep = _Endpoint(self.dir / f"{role}-{os.getpid()}.sock")
        self.streams = streams
        self.info = self._handshake(timeout)
        self._rings: dict[str, FrameRing] = {}

    def _handshake(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ep.send(self.world, {"op": "hello", "streams": self.streams})
            got = self.ep.recv(0.2)
            while got is not None and got[0].get("op") != "welcome":
                got = self.ep.recv(0.05)
            if got is not None:
                return got[0]
        self.ep.close()
        raise LinkError(f"sim link: no sim_world answered at {self.dir} within {timeout:.0f} s; "
                        "start sim_world (launch/sim_bringup.launch.yaml) with the same sim_link")

    def set_streaming(self, on: bool) -> None:
        """Resume (hello) or pause (bye) this client's streams; sim_world skips work no one receives."""
        self.send({"op": "hello" if on else "bye", "streams": self.streams})

    def send(self, msg: dict[str, Any]) -> None:
        """A command to sim_world (a target, a reset...): waits for a busy sim rather than being dropped."""
        if not self.ep.send(self.world, msg, CONTROL_WAIT_S):
            raise LinkError(f"sim link: sim_world at {self.dir} is gone")

    def recv(self, timeout: float | None = 0.0) -> dict[str, Any] | None:
        got = self.ep.recv(timeout)
        return None if got is None else got[0]

    def ring(self, camera: str) -> FrameRing:
        if camera not in self._rings:
            cams = self.info.get("cameras", {})
            if camera not in cams:
                raise LinkError(f"sim link: sim_world has no camera '{camera}' (cameras: {', '.join(cams)})")
            c = cams[camera]
            self._rings[camera] = FrameRing(c["path"], c["width"], c["height"], create=False)
        return self._rings[camera]

    def close(self) -> None:
        self.ep.close()
        for r in self._rings.values():
            r.close()
