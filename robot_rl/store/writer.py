"""Live, crash-safe episode writer: append step by step, commit an episode atomically.

Images are written frame by frame as they arrive (one chunk each, on a background thread);
state, actions and flags are buffered for the episode and written at commit. The commit record in
the root attributes moves last, so SIGKILL at any moment loses at most the episode in progress.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from robot_rl.spec import RobotSpec, SpecError
from robot_rl.store.codecs import IMAGE_CODECS, image_array_codecs
from robot_rl.store.format import FORMAT, GROW, SCHEMA_VERSION, SOURCES, STATE_CHUNK, StoreError

_CRASH = os.environ.get("ROBOT_RL_STORE_CRASH", "")  # tests only: "<phase>:<n>" -> SIGKILL self
_crash_hits: dict[str, int] = {}


def _crash_point(phase: str, store: Path | None = None) -> None:
    if not _CRASH:
        return
    want, _, n = _CRASH.partition(":")
    if want != phase:
        return
    _crash_hits[phase] = _crash_hits.get(phase, 0) + 1
    if _crash_hits[phase] == int(n or 1):
        if phase == "commit-midwrite" and store is not None:  # an interrupted atomic write
            (store / "zarr.json.deadbeef.partial").write_bytes(b'{"zarr_format": 3, "node_type": "gr')
        os.kill(os.getpid(), signal.SIGKILL)


class EpisodeWriter:
    """Writes episodes into a store, creating it (with `spec`) if needed. One writer per store."""

    def __init__(self, path: str | Path, spec: RobotSpec | None = None, *, image_codec: str = "blosc_zstd",
                 jpeg_quality: int = 95, action_dim: int | None = None,
                 streams: Mapping[str, tuple[int, ...]] | None = None, image_threads: int = 2):
        self.path = Path(path)
        if image_codec not in IMAGE_CODECS:
            raise StoreError(f"store {self.path}: image_codec '{image_codec}' is not one of {IMAGE_CODECS}")
        new = not (self.path / "zarr.json").exists()
        if new and spec is None:
            raise StoreError(f"store {self.path} does not exist; pass the robot spec to create it")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".writer.lock", "w")  # noqa: SIM115  (held for the writer's life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"store {self.path}: another writer has it open; one writer per store") from None
        for partial in self.path.rglob("*.partial"):  # leftovers of writes interrupted by a crash
            partial.unlink(missing_ok=True)
        if new:
            self.spec = spec.validate()
            self.root = self._create(spec, image_codec, jpeg_quality, action_dim or spec.action.dim, streams or {})
        else:
            self.root = zarr.open_group(self.path, mode="r+")
            attrs = self.root.attrs.asdict()
            if attrs.get("format") != FORMAT:
                raise StoreError(f"{self.path} is not a robot_rl episode store (format={attrs.get('format')!r})")
            if attrs.get("schema_version") != SCHEMA_VERSION:
                raise StoreError(f"store {self.path}: schema_version {attrs.get('schema_version')} is not "
                                 f"{SCHEMA_VERSION}; convert it with a matching robot_rl release")
            self.spec = RobotSpec.from_dict(attrs["spec"])
            if spec is not None and spec.to_dict() != self.spec.to_dict():
                raise StoreError(f"store {self.path}: spec '{spec.name}' differs from the store's spec "
                                 f"'{self.spec.name}'; write to a new store or use the store's spec")
        attrs = self.root.attrs.asdict()
        commit = attrs["commit"]
        self.n_episodes = int(commit["n_episodes"])
        self.n_steps = int(commit["n_steps"])
        self.stream_lengths = dict(commit.get("stream_lengths", {}))
        self.image_keys = list(self.spec.image_keys)
        self.state_keys = list(self.spec.state_keys)
        self.arrays = {k: self.root[f"data/{k}"] for k in [*self.spec.keys(), "action", "action_policy", "timestamp",
                                                          "reward", "intervention", "terminated", "truncated"]}
        self.action_dim = self.arrays["action"].shape[1]
        self.streams = {k: (self.root[f"streams/{k}/value"], self.root[f"streams/{k}/stamp"])
                        for k in attrs.get("streams", {})}
        self._pool = ThreadPoolExecutor(max_workers=image_threads)
        self._pending: list[Future] = []
        self._episode: dict[str, Any] | None = None

    # ---- creation --------------------------------------------------------------------------------
    def _create(self, spec: RobotSpec, codec: str, quality: int, action_dim: int,
                streams: Mapping[str, tuple[int, ...]]) -> zarr.Group:
        root = zarr.open_group(self.path, mode="w")
        for k in spec.observations:
            if k.is_image:
                root.create_array(f"data/{k.name}", shape=(0, *k.shape), chunks=(1, *k.shape), dtype=k.dtype,
                                  **image_array_codecs(codec, quality))
            else:
                root.create_array(f"data/{k.name}", shape=(0, *k.shape), chunks=(STATE_CHUNK, *k.shape), dtype=k.dtype)
        root.create_array("data/action", shape=(0, action_dim), chunks=(STATE_CHUNK, action_dim), dtype="f4")
        root.create_array("data/action_policy", shape=(0, action_dim), chunks=(STATE_CHUNK, action_dim), dtype="f4",
                          fill_value=np.nan)
        root.create_array("data/timestamp", shape=(0,), chunks=(STATE_CHUNK,), dtype="f8")
        root.create_array("data/reward", shape=(0,), chunks=(STATE_CHUNK,), dtype="f4")
        for f in ("intervention", "terminated", "truncated"):
            root.create_array(f"data/{f}", shape=(0,), chunks=(STATE_CHUNK,), dtype="bool")
        root.create_array("episodes/ends", shape=(0,), chunks=(STATE_CHUNK,), dtype="i8")
        root.create_array("episodes/meta", shape=(0,), chunks=(STATE_CHUNK,), dtype=str)
        for key, shape in streams.items():
            root.create_array(f"streams/{key}/value", shape=(0, *shape), chunks=(STATE_CHUNK * 4, *shape), dtype="f4")
            root.create_array(f"streams/{key}/stamp", shape=(0,), chunks=(STATE_CHUNK * 4,), dtype="f8")
        # One write: zarr's attrs.update() would write zarr.json once per key (it is a MutableMapping),
        # and a crash between those writes would leave a half-updated record.
        root.update_attributes({
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "spec": spec.to_dict(),
            "image_codec": codec, "jpeg_quality": quality, "created": time.time(),
            "streams": {k: list(s) for k, s in streams.items()},
            "commit": {"n_episodes": 0, "n_steps": 0, "stream_lengths": {k: 0 for k in streams}},
        })
        return root

    # ---- episodes --------------------------------------------------------------------------------
    @property
    def in_episode(self) -> bool:
        return self._episode is not None

    @property
    def episode_steps(self) -> int:
        """Steps added to the episode in progress (0 when none is open)."""
        return 0 if self._episode is None else self._episode["t"] - self._episode["start"]

    def begin_episode(self, source: str, task: str = "", robot: str = "", operator: str = "",
                      start_time: float | None = None, **extra: Any) -> None:
        if self._episode is not None:
            raise StoreError(f"store {self.path}: episode {self.n_episodes} is still open; end or discard it first")
        if source not in SOURCES:
            raise StoreError(f"store {self.path}: source '{source}' is not one of {SOURCES}")
        self._episode = {
            "meta": {"source": source, "task": task, "robot": robot or self.spec.robot, "operator": operator,
                     "start_time": time.time() if start_time is None else float(start_time), **extra},
            "start": self.n_steps, "t": self.n_steps,
            "buf": {k: [] for k in [*self.state_keys, "action", "action_policy", "timestamp", "reward",
                                    "intervention", "terminated", "truncated"]},
            "streams": {k: ([], []) for k in self.streams},
        }

    def add_step(self, obs: Mapping[str, Any], action: Any, *, timestamp: float, reward: float = 0.0,
                 intervention: bool = False, terminated: bool = False, truncated: bool = False,
                 action_policy: Any = None) -> None:
        ep = self._episode
        if ep is None:
            raise StoreError(f"store {self.path}: add_step outside an episode; call begin_episode first")
        where = f"store {self.path} episode {self.n_episodes} step {ep['t'] - ep['start']}"
        try:
            self.spec.check_observation(obs, where=where)
        except SpecError as e:
            raise StoreError(str(e)) from None
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape != (self.action_dim,) or not np.all(np.isfinite(a)):
            raise StoreError(f"{where} key 'action': need {self.action_dim} finite values, got {np.asarray(action)!r}")
        ts = ep["buf"]["timestamp"]
        if not np.isfinite(timestamp) or (ts and timestamp <= ts[-1]):
            raise StoreError(f"{where}: timestamp {timestamp} is not after the previous step's {ts[-1] if ts else None}; "
                             "stamps must be device times, strictly increasing")
        t = ep["t"]
        self._ensure_capacity(t + 1)
        for k in self.image_keys:
            frame = np.ascontiguousarray(obs[k])
            self._pending.append(self._pool.submit(self._write_frame, k, t, frame))
        b = ep["buf"]
        for k in self.state_keys:
            b[k].append(np.asarray(obs[k], dtype=self.spec.key(k).dtype))
        b["action"].append(a)
        b["action_policy"].append(np.full(self.action_dim, np.nan, np.float32) if action_policy is None
                                  else np.asarray(action_policy, np.float32).reshape(self.action_dim))
        ts.append(float(timestamp))
        b["reward"].append(float(reward))
        b["intervention"].append(bool(intervention))
        b["terminated"].append(bool(terminated))
        b["truncated"].append(bool(truncated))
        ep["t"] = t + 1
        if len(self._pending) > 64:
            self._drain(32)

    def add_stream_sample(self, key: str, value: Any, stamp: float) -> None:
        """A native-rate sample of a stream (e.g. 100 Hz joint state) during the episode."""
        if self._episode is None:
            raise StoreError(f"store {self.path}: stream sample outside an episode")
        if key not in self.streams:
            raise StoreError(f"store {self.path}: no stream '{key}'; streams: {sorted(self.streams)}")
        vals, stamps = self._episode["streams"][key]
        vals.append(np.asarray(value, np.float32))
        stamps.append(float(stamp))

    def _write_frame(self, key: str, t: int, frame: np.ndarray) -> None:
        _crash_point("image")
        self.arrays[key][t] = frame

    def _drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            self._pending.pop(0).result()

    def _ensure_capacity(self, n: int) -> None:
        arr = self.arrays["timestamp"]
        if arr.shape[0] >= n:
            return
        self._drain()
        cap = ((n + GROW - 1) // GROW) * GROW
        for a in self.arrays.values():
            a.resize((cap, *a.shape[1:]))

    def end_episode(self, success: bool | None = None, **meta: Any) -> int:
        """Commit the episode; returns its index. Empty episodes are refused."""
        ep = self._episode
        if ep is None:
            raise StoreError(f"store {self.path}: end_episode without an open episode")
        n = ep["t"] - ep["start"]
        if n == 0:
            raise StoreError(f"store {self.path} episode {self.n_episodes}: no steps; discard it instead")
        self._drain()
        start, end = ep["start"], ep["t"]
        for k, values in ep["buf"].items():
            _crash_point("state")
            self.arrays[k][start:end] = np.stack(values) if np.ndim(values[0]) else np.asarray(values)
        new_lengths = dict(self.stream_lengths)
        for k, (vals, stamps) in ep["streams"].items():
            if not vals:
                continue
            va, sa = self.streams[k]
            s0 = self.stream_lengths.get(k, 0)
            s1 = s0 + len(vals)
            if va.shape[0] < s1:
                cap = ((s1 + GROW * 4 - 1) // (GROW * 4)) * GROW * 4
                va.resize((cap, *va.shape[1:]))
                sa.resize((cap,))
            va[s0:s1] = np.stack(vals)
            sa[s0:s1] = np.asarray(stamps)
            new_lengths[k] = s1
        k_ep = self.n_episodes
        ends, metas = self.root["episodes/ends"], self.root["episodes/meta"]
        if ends.shape[0] <= k_ep:
            _crash_point("index")
            ends.resize((k_ep + GROW,))
            metas.resize((k_ep + GROW,))
        record = {**ep["meta"], **meta, "success": success, "length": n,
                  "stream_ends": new_lengths}
        _crash_point("index")
        ends[k_ep] = end
        metas[k_ep] = json.dumps(record, sort_keys=True)
        _crash_point("commit")
        _crash_point("commit-midwrite", self.path)
        # the commit record: one key, one atomic write of zarr.json
        self.root.update_attributes({"commit": {"n_episodes": k_ep + 1, "n_steps": end, "stream_lengths": new_lengths}})
        self.n_episodes, self.n_steps, self.stream_lengths = k_ep + 1, end, new_lengths
        self._episode = None
        return k_ep

    def discard_episode(self) -> None:
        """Drop the episode in progress (its steps are overwritten by the next one)."""
        self._drain()
        self._episode = None

    def close(self) -> None:
        if self._episode is not None:
            self.discard_episode()
        self._drain()
        self._pool.shutdown(wait=True)
        self._lock.close()

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
