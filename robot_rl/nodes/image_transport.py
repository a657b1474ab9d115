"""Full-resolution images over DDS without Python message conversion: the camera node writes the CDR
bytes of a standard `sensor_msgs/Image` straight from the frame (one copy), subscribers take the raw
bytes and view the pixels in place (zero copies). Any ROS tool still sees an ordinary Image.

Together with the large-segment SHM profile (fastdds_shm.xml) and SCHED_FIFO for the image processes,
this is the `fast` path of benchmarks/transport.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_CDR_LE = b"\x00\x01\x00\x00"  # encapsulation: plain CDR, little endian
_BYTES_PER_PIXEL = {"rgb8": 3, "bgr8": 3, "mono8": 1, "rgba8": 4}


def _pad(buf: bytearray) -> None:
    buf.extend(b"\0" * ((-(len(buf) - 4)) % 4))  # CDR alignment counts from after the encapsulation


def _string(buf: bytearray, s: str) -> None:
    b = s.encode() + b"\0"
    _pad(buf)
    buf.extend(struct.pack("<I", len(b)) + b)


class ImageEncoder:
    """Serialises frames of one fixed geometry into a reusable buffer."""

    def __init__(self, frame_id: str, height: int, width: int, encoding: str = "rgb8"):
        if encoding not in _BYTES_PER_PIXEL:
            raise ValueError(f"image encoding '{encoding}' not supported ({sorted(_BYTES_PER_PIXEL)})")
        step = width * _BYTES_PER_PIXEL[encoding]
        head = bytearray(_CDR_LE)
        head.extend(b"\0" * 8)  # stamp, filled per frame
        _string(head, frame_id)
        _pad(head)
        head.extend(struct.pack("<II", height, width))
        _string(head, encoding)
        head.append(0)  # is_bigendian
        _pad(head)
        head.extend(struct.pack("<II", step, step * height))
        self.offset = len(head)
        self.shape = (height, width, _BYTES_PER_PIXEL[encoding])
        self.buf = bytearray(self.offset + step * height)
        self.buf[: self.offset] = head
        self.pixels = np.frombuffer(self.buf, np.uint8, step * height, self.offset).reshape(self.shape)

    def encode(self, stamp_ns: int, frame: np.ndarray | None = None) -> bytes:
        """The message bytes; pass `frame`, or write into `self.pixels` beforehand (saves a copy)."""
        struct.pack_into("<iI", self.buf, 4, *divmod(int(stamp_ns), 1_000_000_000))
        if frame is not None:
            self.pixels[...] = frame.reshape(self.shape)
        return bytes(self.buf)


@dataclass
class ImageView:
    stamp_ns: int
    frame_id: str
    encoding: str
    pixels: np.ndarray  # a read-only view into the received bytes


def decode_image(raw: bytes) -> ImageView:
    """View a serialised sensor_msgs/Image (little-endian CDR) without copying the pixels."""
    if raw[:4] != _CDR_LE:
        raise ValueError("image message is not little-endian CDR")
    sec, nsec, n = struct.unpack_from("<iII", raw, 4)
    frame_id = raw[16:16 + n - 1].decode()
    o = 16 + n
    o += (-(o - 4)) % 4
    height, width, n = struct.unpack_from("<III", raw, o)
    encoding = raw[o + 12:o + 12 + n - 1].decode()
    o += 12 + n + 1  # + is_bigendian
    o += (-(o - 4)) % 4
    step, size = struct.unpack_from("<II", raw, o)
    channels = _BYTES_PER_PIXEL.get(encoding, 1)
    pixels = np.frombuffer(raw, np.uint8, size, o + 8).reshape(height, step // channels, channels)[:, :width]
    return ImageView(sec * 1_000_000_000 + nsec, frame_id, encoding, pixels)
