"""Force-torque backends (`mujoco`, `netft`, `robotiq_ft300`), tool-payload compensation and the
payload fit. Each backend yields raw wrenches in the sensor frame; `ft_node` compensates and publishes.

Sign convention: a raw wrench is the load the tool applies to the sensor (a still tool reads its
weight), so the external wrench is raw - bias - payload(orientation).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRAVITY = np.array([0.0, 0.0, -9.81])


@dataclass
class WrenchSample:
    stamp: float  # device time (s); sim time for the mujoco backend
    wrench: np.ndarray  # fx fy fz (N), tx ty tz (Nm), raw, sensor frame
    rotation: np.ndarray | None = None  # sensor orientation in the base frame (3x3) when the backend knows it
    payload_wrench: np.ndarray | None = None  # sim only: the model's exact tool weight in the reading


@dataclass
class Payload:
    """Tool payload below the sensor: mass (kg), centre of mass in the sensor frame (m), sensor bias."""

    mass: float = 0.0
    com: tuple[float, float, float] = (0.0, 0.0, 0.0)
    bias: tuple[float, ...] = (0.0,) * 6

    def wrench(self, rotation: np.ndarray) -> np.ndarray:
        """The raw reading a still, untouched tool gives at this orientation (bias included)."""
        g_s = rotation.T @ (self.mass * GRAVITY)
        return np.concatenate([g_s, np.cross(self.com, g_s)]) + np.asarray(self.bias)

    def compensate(self, raw: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        return np.asarray(raw, dtype=np.float64) - self.wrench(rotation)


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])


def fit_payload(raw: np.ndarray, rotations: np.ndarray, min_poses: int = 6) -> Payload:
    """Least-squares payload from still readings at several orientations.

    Force: f = m R^T g + b_f (linear in m, b_f). Torque: t = c × (m R^T g) + b_t = -[m R^T g]_× c + b_t
    (linear in c, b_t once m is known). Needs orientations that excite all axes.
    """
    raw, rotations = np.asarray(raw, dtype=np.float64), np.asarray(rotations, dtype=np.float64)
    n = len(raw)
    if n < min_poses:
        raise ValueError(f"payload fit: {n} poses recorded, need at least {min_poses}; add more orientations")
    g_s = np.einsum("nji,j->ni", rotations, GRAVITY)  # R^T g per pose
    a_f = np.zeros((3 * n, 4))
    a_f[:, 0] = g_s.reshape(-1)
    a_f[:, 1:] = np.tile(np.eye(3), (n, 1))
    sol_f, *_ = np.linalg.lstsq(a_f, raw[:, :3].reshape(-1), rcond=None)
    mass = float(sol_f[0])
    a_t = np.zeros((3 * n, 6))
    for i in range(n):
        a_t[3 * i:3 * i + 3, :3] = -_skew(mass * g_s[i])
        a_t[3 * i:3 * i + 3, 3:] = np.eye(3)
    sol_t, *_ = np.linalg.lstsq(a_t, raw[:, 3:].reshape(-1), rcond=None)
    if np.linalg.matrix_rank(a_t) < 6 or np.linalg.matrix_rank(a_f) < 4:
        raise ValueError("payload fit: the recorded orientations do not excite every axis; tilt the tool "
                         "about at least two different axes")
    return Payload(mass, tuple(sol_t[:3].tolist()), tuple(np.concatenate([sol_f[1:], sol_t[3:]]).tolist()))


# ---- ATI Net F/T (RDT over UDP) ----------------------------------------------------------------
RDT_PORT = 49152
RDT_HEADER = 0x1234
RDT_STOP, RDT_START, RDT_BUFFERED, RDT_BIAS = 0x0000, 0x0002, 0x0003, 0x0042
_RDT_REQUEST = struct.Struct(">HHI")
RDT_RECORD = struct.Struct(">III6i")  # rdt_sequence, ft_sequence, status, Fx Fy Fz Tx Ty Tz counts


class NetFT:
    """ATI Net F/T over RDT. counts_per_force / counts_per_torque come from the box's netftapi2.xml
    (`cfgcpf`, `cfgcpt`) and live in the hardware config. Lost and out-of-order packets are counted
    from the RDT sequence; out-of-order records are dropped (never delivered backwards)."""

    def __init__(self, host: str, counts_per_force: float, counts_per_torque: float, port: int = RDT_PORT,
                 timeout: float = 0.5):
        self.addr = (host, port)
        self.cpf, self.cpt = float(counts_per_force), float(counts_per_torque)
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.last_seq: int | None = None
        self._pending: bytes | None = None
        self.received = self.lost = self.out_of_order = self.status_errors = 0

    def _command(self, command: int, count: int = 0) -> None:
        self.sock.sendto(_RDT_REQUEST.pack(RDT_HEADER, command, count), self.addr)

    def start(self, retries: int = 5) -> None:
        """Start real-time streaming; UDP may drop the request, so it is retried until data flows."""
        for _ in range(retries):
            self._command(RDT_START)
            if select.select([self.sock], [], [], self.timeout)[0]:
                try:
                    self._pending = self.sock.recv(64)
                    return
                except ConnectionRefusedError:  # ICMP port unreachable: nothing listens there (yet)
                    time.sleep(self.timeout)
        raise ConnectionError(f"netft: no RDT data from {self.addr[0]}:{self.addr[1]} after {retries} start "
                              "requests; check the sensor address in the hardware config and that RDT is enabled")

    def stop(self) -> None:
        self._command(RDT_STOP)

    def bias(self) -> None:
        """The sensor's own software bias (tares the current reading)."""
        self._command(RDT_BIAS)

    def read(self) -> WrenchSample | None:
        """Next in-order sample; None on timeout. Stamped with the host receive time (RDT has none)."""
        while True:
            try:
                data, self._pending = self._pending or self.sock.recv(64), None
            except TimeoutError:
                return None
            except ConnectionRefusedError:
                raise ConnectionError(f"netft: {self.addr[0]}:{self.addr[1]} refused the stream; is the sensor "
                                      "still powered and reachable?") from None
            if len(data) != RDT_RECORD.size:
                continue
            rdt_seq, _ft_seq, status, *counts = RDT_RECORD.unpack(data)
            if self.last_seq is not None:
                gap = (rdt_seq - self.last_seq) & 0xFFFFFFFF
                if gap == 0 or gap > 0x7FFFFFFF:  # duplicate or older than what we delivered
                    self.out_of_order += 1
                    continue
                self.lost += gap - 1
            self.last_seq = rdt_seq
            self.received += 1
            if status != 0:
                self.status_errors += 1
            c = np.asarray(counts, dtype=np.float64)
            return WrenchSample(time.monotonic(), np.concatenate([c[:3] / self.cpf, c[3:] / self.cpt]))

    def stats(self) -> dict[str, int]:
        return {"received": self.received, "lost": self.lost, "out_of_order": self.out_of_order,
                "status_errors": self.status_errors}

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.sock.close()


# ---- Robotiq FT-300 (serial stream) ----------------------------------------------------------------
FT300_SYNC = b"\x20\x4e"
FT300_FRAME = 16
FT300_STOP = b"\xff" * 50


def crc16_modbus(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def modbus_write_register(slave: int, register: int, value: int) -> bytes:
    """Modbus RTU 'write single register' (function 6) with its CRC."""
    pdu = struct.pack(">BBHH", slave, 6, register, value)
    return pdu + struct.pack("<H", crc16_modbus(pdu))


def ft300_frame(wrench: np.ndarray) -> bytes:
    """Encode one stream frame (the format the sensor sends): forces N×100, torques Nm×1000."""
    w = np.asarray(wrench, dtype=np.float64)
    body = FT300_SYNC + struct.pack("<6h", *np.round(np.concatenate([w[:3] * 100, w[3:] * 1000])).astype(int))
    return body + struct.pack("<H", crc16_modbus(body))


class RobotiqFT300:
    """Robotiq FT-300 on a serial port (19200 8N1, Modbus slave 9): starts the stream by writing 0x0200
    to register 410, then resynchronises on 0x20 0x4E and checks each frame's CRC-16/Modbus."""

    def __init__(self, port: str, slave: int = 9, timeout: float = 0.5):
        self.port, self.slave, self.timeout = port, slave, timeout
        try:
            self.fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
        except OSError as e:
            raise ConnectionError(f"robotiq_ft300: cannot open serial port {port}: {e.strerror}; "
                                  "check the port in the hardware config and udev permissions") from None
        if os.isatty(self.fd):
            attrs = termios.tcgetattr(self.fd)
            attrs[0] = 0  # iflag: raw
            attrs[1] = 0  # oflag
            attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL  # 8N1
            attrs[3] = 0  # lflag: no echo, non-canonical
            attrs[4] = attrs[5] = termios.B19200
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        self._buf = bytearray()
        self.frames = self.crc_errors = self.resyncs = 0

    def start(self) -> None:
        self._buf.clear()  # anything before the command is not part of the stream
        os.write(self.fd, modbus_write_register(self.slave, 410, 0x0200))

    def stop(self) -> None:
        os.write(self.fd, FT300_STOP)

    def read(self) -> WrenchSample | None:
        deadline = time.monotonic() + self.timeout
        while True:
            i = self._buf.find(FT300_SYNC)
            if i > 0:
                del self._buf[:i]
                self.resyncs += 1
            if i >= 0 and len(self._buf) >= FT300_FRAME:
                frame = bytes(self._buf[:FT300_FRAME])
                if struct.unpack("<H", frame[14:])[0] == crc16_modbus(frame[:14]):
                    del self._buf[:FT300_FRAME]
                    self.frames += 1
                    v = np.asarray(struct.unpack("<6h", frame[2:14]), dtype=np.float64)
                    return WrenchSample(time.monotonic(), np.concatenate([v[:3] / 100.0, v[3:] / 1000.0]))
                self.crc_errors += 1
                del self._buf[:1]  # a false sync: search again from the next byte
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            self._buf += os.read(self.fd, 4096)

    def stats(self) -> dict[str, int]:
        return {"frames": self.frames, "crc_errors": self.crc_errors, "resyncs": self.resyncs}

    def close(self) -> None:
        try:
            self.stop()
        finally:
            os.close(self.fd)


# ---- MuJoCo (through sim_world) ----------------------------------------------------------------
class MujocoFT:
    """The wrist sensor of the sim cell, read from sim_world's state stream (raw, sensor frame). The sim
    also says exactly how much of the reading is the tool's weight, so the published wrench equals the
    in-process observation (a real cell uses the configured or fitted payload instead)."""

    def __init__(self, link_dir: Path, timeout: float = 0.5):
        from robot_rl.drivers.sim_link import LinkClient

        self.link = LinkClient(link_dir, "ft", ["state"])
        self.lockstep = self.link.info.get("mode") == "lockstep"  # silence = the sim waiting for a command
        self.timeout = timeout

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def bias(self) -> None:
        pass  # a simulated sensor has no drift; the node's software bias still applies

    def read(self) -> WrenchSample | None:
        msg = self.link.recv(self.timeout)
        while msg is not None and msg.get("op") != "state":
            msg = self.link.recv(self.timeout)
        if msg is None:
            return None
        return WrenchSample(msg["t"], np.asarray(msg["wrench_raw"]), np.asarray(msg["ft_rot"]).reshape(3, 3),
                            np.asarray(msg["payload_wrench"]))

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self.link.close()


FT_BACKENDS = {  # backend name -> opener(ft section of the hardware config, sim link directory)
    "mujoco": lambda s, link_dir: MujocoFT(link_dir),
    "netft": lambda s, link_dir: NetFT(s.address.partition(":")[0], s.counts_per_force, s.counts_per_torque,
                                       int(s.address.partition(":")[2] or RDT_PORT)),
    "robotiq_ft300": lambda s, link_dir: RobotiqFT300(s.address),
}
