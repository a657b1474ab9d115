"""Image codecs for the store. Lossless Blosc-zstd is zarr's own codec; JPEG is a zarr v3
array-to-bytes codec backed by OpenCV, registered as `robot_rl.jpeg` (one frame per chunk)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

IMAGE_CODECS = ("blosc_zstd", "jpeg", "raw")


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Encodes a (1, H, W, 3) uint8 chunk as one baseline JPEG (OpenCV/libjpeg-turbo)."""

    is_fixed_size = False
    quality: int = 95

    def __init__(self, *, quality: int = 95) -> None:
        object.__setattr__(self, "quality", int(quality))

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**(data.get("configuration") or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": "robot_rl.jpeg", "configuration": {"quality": self.quality}}

    def evolve_from_array_spec(self, array_spec):
        return self

    def compute_encoded_size(self, input_byte_length: int, chunk_spec) -> int:
        raise NotImplementedError("JPEG output size is data dependent")

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec) -> NDBuffer:
        img = decode_jpeg(chunk_bytes.to_bytes())
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(img.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec) -> Buffer | None:
        a = chunk_array.as_ndarray_like()
        data = encode_jpeg(np.asarray(a).reshape(a.shape[-3:]), self.quality)
        return chunk_spec.prototype.buffer.from_bytes(data)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("corrupt JPEG chunk")
    return bgr[..., ::-1]


register_codec("robot_rl.jpeg", JpegCodec)


def image_array_codecs(codec: str, quality: int = 95) -> dict[str, Any]:
    """Keyword arguments for zarr.create_array for an image key."""
    if codec == "blosc_zstd":
        return {"compressors": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]}
    if codec == "jpeg":
        return {"serializer": JpegCodec(quality=quality), "compressors": None}
    if codec == "raw":
        return {"compressors": None}
    raise ValueError(f"image codec '{codec}' is not one of {IMAGE_CODECS}")
