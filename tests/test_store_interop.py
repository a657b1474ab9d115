"""Interop: LeRobotDataset v3 export checked independently of our importer (pyarrow + PyAV against
the v3 layout), round trips, and rosbag2 / MCAP import with mixed rates and out-of-order stamps."""

import json
from pathlib import Path

import numpy as np
import pytest

from robot_rl.store import EpisodeStore, EpisodeWriter, StoreError
from robot_rl.store.lerobot import export_lerobot, import_lerobot
from robot_rl.store.rosbag import import_rosbag
from tests.helpers.store_child import SPEC, episode


def write(store: Path, codec: str, n: int = 3) -> EpisodeStore:
    with EpisodeWriter(store, SPEC, image_codec=codec) as w:
        for k in range(n):
            ep = episode(k)
            w.begin_episode("hil", task=f"task{k % 2}")
            for t in range(len(ep["action"])):
                w.add_step({key: ep[key][t] for key in SPEC.keys()}, ep["action"][t], timestamp=float(ep["timestamp"][t]),
                           reward=float(ep["reward"][t]), intervention=bool(ep["intervention"][t]),
                           terminated=t == len(ep["action"]) - 1)
            w.end_episode(success=bool(k % 2))
    return EpisodeStore(store)


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("codec", ["blosc_zstd", "jpeg"])
def test_lerobot_v3_export_matches_the_layout(tmp_path, codec):
    import av
    import pyarrow.parquet as pq

    st = write(tmp_path / "s.zarr", codec)
    out = tmp_path / "lerobot"
    export_lerobot(st, out)
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["total_frames"] == st.n_steps
    assert info["total_tasks"] == 2 and info["splits"] == {"train": "0:3"}
    data_file = out / info["data_path"].format(chunk_index=0, file_index=0)
    table = pq.read_table(data_file)
    for col in ("timestamp", "frame_index", "episode_index", "index", "task_index", "action", "observation.state"):
        assert col in table.column_names, col
    assert str(table.schema.field("timestamp").type) == "float" and str(table.schema.field("index").type) == "int64"
    assert table.num_rows == st.n_steps
    assert np.array_equal(np.stack(table["action"].to_numpy(zero_copy_only=False)), st.load("action"))
    ep = np.asarray(table["episode_index"])
    ts = np.asarray(table["timestamp"])
    for e in range(3):  # timestamps restart at 0 per episode and rise by the device clock
        t = ts[ep == e]
        assert t[0] == 0 and np.all(np.diff(t) > 0)
    episodes = pq.read_table(out / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [e["length"] for e in episodes] == st.lengths.tolist()
    tasks = pq.read_table(out / "meta" / "tasks.parquet").to_pylist()
    assert {t["task"] for t in tasks} == {"task0", "task1"}
    vkey = "observation.images.cam"
    assert info["features"][vkey]["dtype"] == "video"
    video = out / info["video_path"].format(video_key=vkey, chunk_index=0, file_index=0)
    with av.open(str(video)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" or "264" in stream.codec_context.name
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert len(frames) == st.n_steps
    src = np.asarray(st.array("image.cam")[: st.n_steps])
    for e, row in enumerate(episodes):  # each episode's frames sit at its from/to timestamps
        first = int(round(row[f"videos/{vkey}/from_timestamp"] * info["fps"]))
        last = int(round(row[f"videos/{vkey}/to_timestamp"] * info["fps"]))
        assert last - first == st.lengths[e]
        if codec == "blosc_zstd":
            assert np.array_equal(frames[first:last], src[st.episode_slice(e)])  # lossless: bit-exact
        else:
            assert psnr(frames[first:last], src[st.episode_slice(e)]) >= 40


def test_lerobot_round_trip_reproduces_the_store(tmp_path):
    st = write(tmp_path / "s.zarr", "blosc_zstd")
    export_lerobot(st, tmp_path / "le")
    assert import_lerobot(tmp_path / "le", tmp_path / "back.zarr") == 3
    back = EpisodeStore(tmp_path / "back.zarr")
    assert back.spec == st.spec
    for k in st.keys():
        assert np.array_equal(np.asarray(back.array(k)[: back.n_steps]), np.asarray(st.array(k)[: st.n_steps]),
                              equal_nan=True), k
    assert [m["source"] for m in back.meta] == ["hil"] * 3 and back.meta[1]["success"] is True
    with pytest.raises(StoreError, match="not empty"):
        export_lerobot(st, tmp_path / "le")


def _write_bag(path: Path, storage: str) -> dict:
    """A bag with joint states at 100 Hz, poses at 50 Hz, images at 30 Hz, actions at 10 Hz; the
    image and pose publishers' messages are written out of stamp order."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    T = ts.types
    Header, Time = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"]

    def header(t):
        return Header(stamp=Time(sec=int(t), nanosec=int(round((t - int(t)) * 1e9))), frame_id="base")

    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    truth = {"joint": [], "pose": [], "image": [], "action": []}
    rng = np.random.default_rng(1)
    with Writer(path, version=8, storage_plugin=plugin) as w:
        cj = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=ts)
        cp = w.add_connection("/ee_pose", "geometry_msgs/msg/PoseStamped", typestore=ts)
        ci = w.add_connection("/cam/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        ca = w.add_connection("/action", "std_msgs/msg/Float32MultiArray", typestore=ts)
        msgs = []
        for i in range(300):  # 3 s at 100 Hz
            t = 100.0 + i / 100
            q = np.full(7, t, np.float64)
            msgs.append((t, cj, T["sensor_msgs/msg/JointState"](header=header(t), name=[f"j{k}" for k in range(7)],
                                                                  position=q, velocity=q * 0, effort=q * 0)))
            truth["joint"].append((t, q))
        for i in range(150):  # 50 Hz
            t = 100.0 + i / 50 + 0.003
            P = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=t, y=0.0, z=0.0),
                                            orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))
            msgs.append((t, cp, T["geometry_msgs/msg/PoseStamped"](header=header(t), pose=P)))
            truth["pose"].append((t, t))
        for i in range(90):  # 30 Hz
            t = 100.0 + i / 30 + 0.001
            img = np.full((6, 8, 3), i % 256, np.uint8)
            msgs.append((t, ci, T["sensor_msgs/msg/Image"](header=header(t), height=6, width=8, encoding="rgb8",
                                                            is_bigendian=0, step=24, data=img.reshape(-1))))
            truth["image"].append((t, i))
        for i in range(30):  # 10 Hz
            t = 100.0 + i / 10 + 0.002
            a = np.full(7, i, np.float32)
            layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
            msgs.append((t, ca, T["std_msgs/msg/Float32MultiArray"](layout=layout, data=a)))
            truth["action"].append((t, i))
        order = np.arange(len(msgs))
        swaps = rng.choice(len(msgs) - 1, 60, replace=False)  # receive order != stamp order
        for s in swaps:
            order[s], order[s + 1] = order[s + 1], order[s]
        for j in order:
            t, conn, msg = msgs[j]
            w.write(conn, int((t + rng.uniform(0, 0.02)) * 1e9), ts.serialize_cdr(msg, conn.msgtype))
    return truth


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_rosbag_import_aligns_mixed_rates_by_header_stamps(tmp_path, storage):
    truth = _write_bag(tmp_path / "bag", storage)
    topics = {"state.joint_pos": "/joint_states", "state.ee_pose": "/ee_pose", "image.cam": "/cam/image_raw",
              "action": "/action"}
    # Float32MultiArray actions carry no header: they are aligned by record time
    assert import_rosbag(tmp_path / "bag", tmp_path / "s.zarr", topics, rate_hz=10.0) == 1
    st = EpisodeStore(tmp_path / "s.zarr")
    ep = st.episode(0)
    t = ep["timestamp"]
    assert np.allclose(np.diff(t), 0.1)
    assert t[0] >= 100.003 - 1e-9  # starts once every stamped topic has a message
    for i, ti in enumerate(t):  # zero-order hold on header stamps
        jt = max(s for s, _ in truth["joint"] if s <= ti + 1e-9)
        assert np.allclose(ep["state.joint_pos"][i], jt)
        pt = max(s for s, _ in truth["pose"] if s <= ti + 1e-9)
        assert np.isclose(ep["state.ee_pose"][i][0], pt, atol=1e-5)
        frame = max((s, k) for s, k in truth["image"] if s <= ti + 1e-9)[1]
        assert np.all(ep["image.cam"][i] == frame % 256)
    assert st.spec.key("image.cam").shape == (6, 8, 3)
    with pytest.raises(StoreError, match="no topics"):
        import_rosbag(tmp_path / "bag", tmp_path / "x.zarr", {"state.q": "/nope", "action": "/action"})
