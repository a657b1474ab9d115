"""Export to and import from LeRobotDataset v3 (parquet + mp4), the Hugging Face robot data format.

Mapping (documented in datasets/README.md):

    store                         LeRobotDataset v3
    state.<name>                  observation.state.<name>   float32 vector (sim-only keys included)
    (non-sim-only state keys)     observation.state          their concatenation, with per-dim names
    image.<camera>                observation.images.<camera> video: h264 in mp4, all episodes of a file
                                  concatenated; lossless stores -> libx264rgb qp 0 (bit-exact RGB),
                                  lossy stores -> libx264 yuv444p crf 8
    action                        action
    reward / terminated / truncated / intervention   next.reward, next.done (terminated|truncated),
                                  terminated, truncated, intervention
    timestamp (device clock)      device_timestamp (float64); `timestamp` is LeRobot's time since the
                                  episode start, `frame_index / fps` in the videos
    episode metadata              meta/episodes: tasks, length, offsets, video from/to timestamps, and
                                  robot_rl/source, robot_rl/success, robot_rl/meta (JSON)
    the spec                      meta/robot_rl_spec.json (so an import reproduces the store exactly)

One data file and one video file per camera (chunk-000/file-000): LeRobot's own writer splits at
100/200 MB; readers follow `data/chunk_index`/`file_index` either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from robot_rl.spec import ActionSpec, Camera, ObsKey, Rates, RobotSpec, image_key
from robot_rl.store.format import StoreError
from robot_rl.store.reader import EpisodeStore
from robot_rl.store.tools import _identity
from robot_rl.store.writer import EpisodeWriter

CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
LOSSLESS = ("blosc_zstd", "raw")


def _video_key(image_key_name: str) -> str:
    return "observation.images." + image_key_name.split(".", 1)[1]


def export_lerobot(st: EpisodeStore, out: str | Path, progress: Callable = _identity) -> dict:
    import av
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"export target {out} is not empty; choose a new directory")
    if st.n_episodes == 0:
        raise StoreError(f"store {st.path}: nothing to export (no committed episodes)")
    spec = st.spec
    fps = spec.rates.policy_hz
    lossless = st.image_codec in LOSSLESS
    n = st.n_steps
    ep_index = np.repeat(np.arange(st.n_episodes), st.lengths)
    frame_index = np.arange(n) - np.repeat(st.starts, st.lengths)
    stamps = st.load("timestamp")
    rel = (stamps - np.repeat(stamps[st.starts], st.lengths)).astype(np.float32)
    tasks = sorted({m.get("task", "") for m in st.meta})
    task_of = {t: i for i, t in enumerate(tasks)}
    task_index = np.repeat([task_of[m.get("task", "")] for m in st.meta], st.lengths)
    terminated, truncated = st.load("terminated"), st.load("truncated")

    cols: dict[str, pa.Array] = {}
    features: dict[str, dict] = {}

    def vec(name: str, x: np.ndarray, names=None):
        x = x.reshape(n, -1).astype(np.float32)
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        features[name] = {"dtype": "float32", "shape": [x.shape[1]], "names": names}

    proprio = [k for k in spec.state_keys if not spec.key(k).sim_only]
    if proprio:
        names = [f"{k.split('.', 1)[1]}.{i}" for k in proprio for i in range(int(np.prod(spec.key(k).shape)))]
        vec("observation.state", np.concatenate([st.load(k).reshape(n, -1) for k in proprio], axis=1), names)
    for k in spec.state_keys:
        vec(f"observation.{k}", st.load(k))
    vec("action", st.load("action"), list(spec.action.names))
    for name, arr, dtype in (("next.reward", st.load("reward"), "float32"),
                             ("next.done", terminated | truncated, "bool"), ("terminated", terminated, "bool"),
                             ("truncated", truncated, "bool"), ("intervention", st.load("intervention"), "bool"),
                             ("device_timestamp", stamps, "float64"), ("timestamp", rel, "float32"),
                             ("frame_index", frame_index, "int64"), ("episode_index", ep_index, "int64"),
                             ("index", np.arange(n), "int64"), ("task_index", task_index, "int64")):
        cols[name] = pa.array(np.asarray(arr).astype(dtype))
        features[name] = {"dtype": dtype, "shape": [1], "names": None}

    loc = {"chunk_index": 0, "file_index": 0}
    data_file = out / DATA_PATH.format(**loc)
    data_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), data_file)

    for key in spec.image_keys:
        vkey = _video_key(key)
        k = spec.key(key)
        h, w = k.shape[:2]
        path = out / VIDEO_PATH.format(video_key=vkey, **loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        codec = "libx264rgb" if lossless else "libx264"
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=int(round(fps)))
            stream.width, stream.height = w, h
            stream.pix_fmt = "rgb24" if lossless else "yuv444p"
            stream.options = {"qp": "0", "preset": "veryfast"} if lossless else {"crf": "8", "preset": "veryfast"}
            arr = st.array(key)
            for lo in progress(range(0, n, 256)):
                for img in np.asarray(arr[lo:min(n, lo + 256)]):
                    for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                        container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        features[vkey] = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                          "info": {"video.height": h, "video.width": w, "video.codec": "h264",
                                   "video.pix_fmt": "rgb24" if lossless else "yuv444p", "video.is_depth_map": False,
                                   "video.fps": fps, "video.channels": 3, "has_audio": False}}

    ep_cols: dict[str, list] = {"episode_index": list(range(st.n_episodes)),
                                "tasks": [[m.get("task", "")] for m in st.meta], "length": st.lengths.tolist(),
                                "data/chunk_index": [0] * st.n_episodes, "data/file_index": [0] * st.n_episodes,
                                "dataset_from_index": st.starts.tolist(), "dataset_to_index": st.ends.tolist(),
                                "robot_rl/source": [m.get("source") for m in st.meta],
                                "robot_rl/success": [m.get("success") for m in st.meta],
                                "robot_rl/meta": [json.dumps(m, sort_keys=True) for m in st.meta]}
    for key in spec.image_keys:
        vkey = _video_key(key)
        ep_cols[f"videos/{vkey}/chunk_index"] = [0] * st.n_episodes
        ep_cols[f"videos/{vkey}/file_index"] = [0] * st.n_episodes
        ep_cols[f"videos/{vkey}/from_timestamp"] = (st.starts / fps).tolist()
        ep_cols[f"videos/{vkey}/to_timestamp"] = (st.ends / fps).tolist()
    ep_file = out / EPISODES_PATH.format(**loc)
    ep_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(ep_cols), ep_file)
    pq.write_table(pa.table({"task_index": list(range(len(tasks))), "task": tasks}), out / "meta" / "tasks.parquet")

    stats = {}
    for name, f in features.items():
        if f["dtype"] in ("float32", "float64") and name in cols:
            col = cols[name]
            x = np.asarray(col.flatten() if isinstance(col, pa.FixedSizeListArray) else col, dtype=np.float64)
            x = x.reshape(n, -1)
            stats[name] = {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
                           "std": x.std(0).tolist(), "count": [n]}
    (out / "meta" / "stats.json").write_text(json.dumps(stats, indent=2))
    info = {"codebase_version": "v3.0", "robot_type": spec.robot, "total_episodes": st.n_episodes, "total_frames": n,
            "total_tasks": len(tasks), "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "fps": fps, "splits": {"train": f"0:{st.n_episodes}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if spec.image_keys else None, "features": features}
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    (out / "meta" / "robot_rl_spec.json").write_text(spec.to_json())
    return info


def import_lerobot(src: str | Path, dest: str | Path, image_codec: str = "blosc_zstd",
                   progress: Callable = _identity) -> int:
    """A LeRobotDataset v3 folder -> a new store. Uses meta/robot_rl_spec.json when present; otherwise
    derives a spec: observation.state -> state.proprio, observation.images.X -> image.X, the
    action as the env's own vector."""
    import pyarrow.parquet as pq

    src = Path(src)
    info_file = src / "meta" / "info.json"
    if not info_file.exists():
        raise StoreError(f"{src}: no meta/info.json; not a LeRobotDataset")
    info = json.loads(info_file.read_text())
    if not str(info.get("codebase_version", "")).startswith("v3"):
        raise StoreError(f"{src}: codebase_version {info.get('codebase_version')} is not v3.x; convert it with LeRobot first")
    feats = info["features"]
    fps = float(info["fps"])
    spec_file = src / "meta" / "robot_rl_spec.json"
    tables = [pq.read_table(f) for f in sorted((src / "data").rglob("*.parquet"))]
    import pyarrow as pa

    data = pa.concat_tables(tables)
    order = np.lexsort((np.asarray(data["frame_index"]), np.asarray(data["episode_index"])))
    data = data.take(order)
    videos = [k for k, f in feats.items() if f["dtype"] == "video"]
    if spec_file.exists():
        spec = RobotSpec.from_json(spec_file.read_text())
        key_of = {f"observation.{k}": k for k in spec.state_keys}
        key_of.update({_video_key(k): k for k in spec.image_keys})
    else:
        obs, cams, key_of = [], [], {}
        if "observation.state" in feats:
            obs.append(ObsKey("state.proprio", tuple(feats["observation.state"]["shape"]), rate_hz=fps))
            key_of["observation.state"] = "state.proprio"
        for v in videos:
            name = v.rsplit(".", 1)[-1].lower().replace("-", "_")
            h, w = feats[v]["shape"][:2] if feats[v].get("names", [""])[0] in ("height", None) else feats[v]["shape"][1:]
            cam = Camera(name, int(w), int(h), int(w), int(h), rate_hz=fps)
            cams.append(cam)
            obs.append(image_key(cam, fps))
            key_of[v] = f"image.{name}"
        a = int(feats["action"]["shape"][0])
        spec = RobotSpec(name=f"lerobot/{src.name}", observations=tuple(obs), cameras=tuple(cams),
                         rates=Rates(policy_hz=fps),
                         action=ActionSpec(kind="env", frame="env", names=tuple(f"a{i}" for i in range(a)),
                                           scale=(1.0,) * a, low=(-1e9,) * a, high=(1e9,) * a, mask=(True,) * a,
                                           gripper="none"), robot=info.get("robot_type") or "unknown").validate()
    video_cache: dict[tuple[str, int, int], np.ndarray] = {}
    ep_meta = {}
    for f in sorted((src / "meta" / "episodes").rglob("*.parquet")):
        t = pq.read_table(f).to_pylist()
        for row in t:
            ep_meta[int(row["episode_index"])] = row
    col = {name: data[name] for name in data.column_names}
    n = data.num_rows
    ep_idx = np.asarray(col["episode_index"])
    stamps = np.asarray(col["device_timestamp"] if "device_timestamp" in col else col["timestamp"], dtype=np.float64)
    state = {k: np.asarray(col[f].to_pylist() if hasattr(col[f], "to_pylist") else col[f], dtype=np.float32).reshape(n, -1)
             for f, k in key_of.items() if not k.startswith("image.")}
    action = np.asarray(col["action"].to_pylist(), np.float32)
    flag = lambda name: np.asarray(col[name]) if name in col else np.zeros(n, bool)  # noqa: E731
    reward = np.asarray(col["next.reward"], np.float32) if "next.reward" in col else np.zeros(n, np.float32)
    terminated = flag("terminated") if "terminated" in col else flag("next.done")
    truncated, intervention = flag("truncated"), flag("intervention")
    boundaries = np.flatnonzero(np.diff(ep_idx)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [n]])
    count = 0
    with EpisodeWriter(dest, spec, image_codec=image_codec) as w:
        for s, e in progress(list(zip(starts, ends))):
            e_i = int(ep_idx[s])
            row = ep_meta.get(e_i, {})
            meta = json.loads(row["robot_rl/meta"]) if row.get("robot_rl/meta") else {}
            for k in ("length", "stream_ends"):
                meta.pop(k, None)
            success = meta.pop("success", row.get("robot_rl/success"))
            meta.setdefault("source", row.get("robot_rl/source") or "teleop")
            meta.setdefault("task", (row.get("tasks") or [""])[0])
            meta["imported_from"] = f"{src}#{e_i}"
            w.begin_episode(**meta)
            frames = {}
            for v in videos:
                if v not in key_of:
                    continue
                loc = (v, int(row.get(f"videos/{v}/chunk_index", 0)), int(row.get(f"videos/{v}/file_index", 0)))
                if loc not in video_cache:
                    video_cache.clear()  # one file per camera in memory at a time
                    video_cache[loc] = _decode_video(src / info["video_path"].format(
                        video_key=v, chunk_index=loc[1], file_index=loc[2]))
                first = int(round(float(row.get(f"videos/{v}/from_timestamp", s / fps)) * fps))
                frames[key_of[v]] = video_cache[loc][first:first + (e - s)]
                if len(frames[key_of[v]]) != e - s:
                    raise StoreError(f"{src} episode {e_i}: video {v} has {len(frames[key_of[v]])} frames, data {e - s}")
            for t in range(s, e):
                obs = {k: v[t].reshape(spec.key(k).shape).astype(spec.key(k).dtype) for k, v in state.items()}
                for k, fr in frames.items():
                    obs[k] = fr[t - s]
                w.add_step(obs, action[t], timestamp=float(stamps[t]), reward=float(reward[t]),
                           intervention=bool(intervention[t]), terminated=bool(terminated[t]), truncated=bool(truncated[t]))
            w.end_episode(success=success)
            count += 1
    return count


def _decode_video(path: Path) -> np.ndarray:
    """Every frame of one mp4 as RGB."""
    import av

    if not path.exists():
        raise StoreError(f"missing video {path}")
    with av.open(str(path)) as c:
        frames = [frame.to_ndarray(format="rgb24") for frame in c.decode(video=0)]
    if not frames:
        raise StoreError(f"no frames in {path}")
    return np.stack(frames)
