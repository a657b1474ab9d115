"""Fast frame reads for image arrays stored one frame per chunk.

zarr's general read path costs ~0.2 ms of Python per call; for training, a batch of random frames
is read here straight from the chunk files of a local store and decoded with the array's own
codec (Blosc via numcodecs, JPEG via OpenCV, raw bytes), falling back to zarr for anything else.
Tests check both paths return the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from robot_rl.store.codecs import decode_jpeg


class FrameReader:
    def __init__(self, array: zarr.Array, directory: Path):
        self.array = array
        self.dir = Path(directory)
        self.frame_shape = tuple(array.shape[1:])
        self.dtype = np.dtype(array.dtype.to_native_dtype() if hasattr(array.dtype, "to_native_dtype") else array.dtype)
        meta = array.metadata.to_dict()
        codecs = [c["name"] for c in meta.get("codecs", [])]
        enc = meta.get("chunk_key_encoding", {})
        sep = (enc.get("configuration") or {}).get("separator", "/")
        default_keys = enc.get("name", "default") == "default"
        one_frame = tuple(array.chunks) == (1, *self.frame_shape)
        self.kind = None
        if one_frame and default_keys and sep == "/" and self.dir.exists():
            if codecs == ["bytes", "blosc"]:
                self.kind = "blosc"
            elif codecs == ["robot_rl.jpeg"]:
                self.kind = "jpeg"
            elif codecs == ["bytes"]:
                self.kind = "raw"
        self._suffix = "/".join("0" for _ in self.frame_shape)
        self._fill = np.full(self.frame_shape, meta.get("fill_value", 0) or 0, self.dtype)

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if self.kind is None:
            order = np.argsort(indices)
            frames = np.empty((len(indices), *self.frame_shape), self.dtype)
            frames[order] = self.array.oindex[indices[order]] if len(indices) else frames[:0]
            return frames
        out = np.empty((len(indices), *self.frame_shape), self.dtype)
        for j, t in enumerate(indices):
            out[j] = self._read_one(int(t))
        return out

    def _read_one(self, t: int) -> np.ndarray:
        try:
            data = (self.dir / "c" / str(t) / self._suffix).read_bytes()
        except FileNotFoundError:
            return self._fill
        if self.kind == "blosc":
            from numcodecs import blosc

            return np.frombuffer(blosc.decompress(data), self.dtype).reshape(self.frame_shape)
        if self.kind == "jpeg":
            return decode_jpeg(data).reshape(self.frame_shape)
        return np.frombuffer(data, self.dtype).reshape(self.frame_shape)
