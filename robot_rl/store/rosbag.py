"""Import rosbag2 bags (sqlite3 or MCAP storage, and ROS 1 bags) with the `rosbags` library.

Each bag is one episode. Topics map to spec keys (`{state.joint_pos: /joint_states, image.front:
/camera/front/image_raw, action: /policy/action}`); messages are ordered by their *header* stamps
(not by the order they were recorded, which is out of order across publishers), and aligned to a
fixed step rate by zero-order hold: each step takes, per key, the latest message stamped at or
before the step time. Steps start once every key has a message and end at the earliest last one.

Supported messages: sensor_msgs/JointState (position for joint_pos, velocity for joint_vel),
geometry_msgs/PoseStamped (xyz + wxyz), geometry_msgs/WrenchStamped, sensor_msgs/Image (rgb8,
bgr8, mono8) and CompressedImage, std_msgs Float32/Float64 and their MultiArrays (raw vectors).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from robot_rl.spec import ActionSpec, Camera, ObsKey, Rates, RobotSpec, image_key
from robot_rl.store.format import StoreError
from robot_rl.store.writer import EpisodeWriter


def _stamp(msg, fallback_ns: int) -> float:
    header = getattr(msg, "header", None)
    if header is not None:
        return header.stamp.sec + header.stamp.nanosec * 1e-9
    return fallback_ns * 1e-9


def _value(key: str, msgtype: str, msg) -> np.ndarray:
    t = msgtype.split("/")[-1]
    if t == "JointState":
        return np.asarray(msg.velocity if key.endswith("joint_vel") else msg.position, np.float32)
    if t == "PoseStamped":
        p, q = msg.pose.position, msg.pose.orientation
        return np.array([p.x, p.y, p.z, q.w, q.x, q.y, q.z], np.float32)  # ROS xyzw -> wxyz
    if t == "WrenchStamped":
        f, tq = msg.wrench.force, msg.wrench.torque
        return np.array([f.x, f.y, f.z, tq.x, tq.y, tq.z], np.float32)
    if t == "Image":
        data = np.frombuffer(bytes(msg.data), np.uint8)
        if msg.encoding in ("rgb8", "bgr8"):
            img = data.reshape(msg.height, msg.step)[:, : msg.width * 3].reshape(msg.height, msg.width, 3)
            return img[..., ::-1].copy() if msg.encoding == "bgr8" else img.copy()
        if msg.encoding == "mono8":
            return np.repeat(data.reshape(msg.height, msg.step)[:, : msg.width, None], 3, axis=2)
        raise StoreError(f"image encoding '{msg.encoding}' on key '{key}' is not supported (rgb8, bgr8, mono8)")
    if t == "CompressedImage":
        import cv2

        bgr = cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise StoreError(f"key '{key}': a CompressedImage does not decode")
        return bgr[..., ::-1].copy()
    if t in ("Float32", "Float64"):
        return np.array([msg.data], np.float32)
    if t.endswith("MultiArray"):
        return np.asarray(msg.data, np.float32)
    raise StoreError(f"key '{key}': message type {msgtype} is not supported for import")


def read_bag(path: Path, topics: Mapping[str, str]) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """{key: (stamps sorted, values)} for the mapped topics of one bag."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    wanted = {topic: key for key, topic in topics.items()}
    samples: dict[str, list[tuple[float, np.ndarray]]] = {k: [] for k in topics}
    with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        missing = set(wanted) - {c.topic for c in reader.connections}
        if missing:
            raise StoreError(f"bag {path}: no topics {sorted(missing)}; it has {sorted({c.topic for c in reader.connections})}")
        conns = [c for c in reader.connections if c.topic in wanted]
        for conn, t_ns, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            key = wanted[conn.topic]
            samples[key].append((_stamp(msg, t_ns), _value(key, conn.msgtype, msg)))
    out = {}
    for key, rows in samples.items():
        if not rows:
            raise StoreError(f"bag {path}: topic {topics[key]} ('{key}') has no messages")
        rows.sort(key=lambda r: r[0])  # header-stamp order
        stamps = np.array([r[0] for r in rows])
        keep = np.concatenate([[True], np.diff(stamps) > 0])  # drop duplicate stamps
        out[key] = (stamps[keep], [r[1] for r, k in zip(rows, keep) if k])
    return out


def align(series: Mapping[str, tuple[np.ndarray, list[np.ndarray]]], rate_hz: float
          ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Step times and, per key, the indices of the latest sample at or before each step."""
    t0 = max(s[0] for s, _ in series.values())
    t1 = min(s[-1] for s, _ in series.values())
    if t1 <= t0:
        raise StoreError("the topics never overlap in time; nothing to align")
    times = t0 + np.arange(int(np.floor((t1 - t0) * rate_hz + 1e-9)) + 1) / rate_hz
    idx = {k: np.searchsorted(s, times + 1e-9, side="right") - 1 for k, (s, _) in series.items()}
    return times, idx


def spec_from_samples(series, rate_hz: float, name: str) -> RobotSpec:
    obs, cams = [], []
    for key, (_, values) in series.items():
        v = values[0]
        if key.startswith("image."):
            cam = Camera(key.split(".", 1)[1], v.shape[1], v.shape[0], v.shape[1], v.shape[0], rate_hz=rate_hz)
            cams.append(cam)
            obs.append(image_key(cam, rate_hz))
        elif key != "action":
            obs.append(ObsKey(key, tuple(v.shape), rate_hz=rate_hz, sim_only=key.startswith("state.object.")))
    if "action" in series:
        a = len(series["action"][1][0])
        action = (ActionSpec() if a == 7 else
                  ActionSpec(kind="env", frame="env", names=tuple(f"a{i}" for i in range(a)), scale=(1.0,) * a,
                             low=(-1e9,) * a, high=(1e9,) * a, mask=(True,) * a, gripper="none"))
    else:
        raise StoreError("the topic mapping needs an 'action' topic (the commanded action per step)")
    return RobotSpec(name=name, observations=tuple(obs), cameras=tuple(cams), action=action,
                     rates=Rates(policy_hz=rate_hz, command_hz=max(rate_hz, 100.0))).validate()


def import_rosbag(src: str | Path, dest: str | Path, topics: Mapping[str, str], rate_hz: float = 10.0,
                  image_codec: str = "blosc_zstd", source: str = "teleop", task: str = "", spec: RobotSpec | None = None,
                  **meta: Any) -> int:
    src = Path(src)
    bags = [src] if (src / "metadata.yaml").exists() or src.suffix in (".bag", ".mcap", ".db3") else \
        sorted(p.parent for p in src.rglob("metadata.yaml"))
    if not bags:
        raise StoreError(f"{src}: no rosbag2 bag (metadata.yaml) found")
    n = 0
    writer = None
    try:
        for bag in bags:
            series = read_bag(bag, topics)
            times, idx = align(series, rate_hz)
            if writer is None:
                spec = spec or spec_from_samples(series, rate_hz, f"rosbag/{src.name}")
                writer = EpisodeWriter(dest, spec, image_codec=image_codec)
            writer.begin_episode(source, task=task, imported_from=str(bag), **meta)
            for i, t in enumerate(times):
                obs = {k: series[k][1][idx[k][i]].astype(spec.key(k).dtype) for k in topics if k != "action"}
                writer.add_step(obs, series["action"][1][idx["action"][i]], timestamp=float(t))
            writer.end_episode(success=None)
            n += 1
    finally:
        if writer is not None:
            writer.close()
    return n
