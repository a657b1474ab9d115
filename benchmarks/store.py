"""Episode store benchmark, per image codec (lossless Blosc-zstd vs JPEG):

- record: 3 cameras 640x480 RGB at 30 Hz + 7-DoF state at 100 Hz (a native-rate stream), real
  rendered frames. `realtime_factor` = seconds of data written per wall second, unpaced;
  `dropped` = frames that missed their 30 Hz slot in a paced, real-time run (the writer applies
  backpressure when it falls behind; a frame that cannot be handed over in time is dropped);
- size per hour of 3-camera recording;
- sample: state windows (n_obs 2, horizon 16, batch 256) from the store vs a vectorised in-RAM
  numpy baseline (fancy indexing into contiguous arrays) on the same data;
- 84x84 image windows (2 cameras x 2 observation steps) per second with 2 DataLoader workers.

    python benchmarks/store.py [--record-seconds 12] [--paced-seconds 10]
"""
# ruff: noqa: I001

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import robot_rl  # noqa: F401  (sets MUJOCO_GL=egl before mujoco loads: keep first)
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

from robot_rl.spec import ActionSpec, Camera, ObsKey, RobotSpec, image_key  # noqa: E402
from robot_rl.store import EpisodeStore, EpisodeWriter  # noqa: E402
from robot_rl.store.sampler import WindowConfig, WindowDataset, window_indices, pad_actions  # noqa: E402

CAMS = tuple(Camera(n, 640, 480) for n in ("front", "wrist", "side"))
SPEC = RobotSpec(name="bench_cell", cameras=CAMS, action=ActionSpec(),
                 observations=(ObsKey("state.joint_pos", (7,), rate_hz=30), ObsKey("state.ee_pose", (7,), rate_hz=30),
                               *(image_key(c, 30) for c in CAMS)))


def rendered_frames(n: int = 24) -> dict[str, list[np.ndarray]]:
    """Real 640x480 frames of a lift rollout from the sim (front, wrist, and a visual-mesh front view)."""
    from robot_rl.sim import make_env, make_expert

    env = make_env("lift")
    ex = make_expert(env)
    obs, _ = env.reset(seed=0)
    ex.reset(np.random.default_rng(0))
    out: dict[str, list[np.ndarray]] = {"image.front": [], "image.wrist": [], "image.side": []}
    for _ in range(n):
        obs, *_ = env.step(ex.act(obs))
        out["image.front"].append(env.render_camera("front", 640, 480, "collision"))
        out["image.wrist"].append(env.render_camera("wrist", 640, 480, "collision"))
        out["image.side"].append(env.render_camera("front", 640, 480, "visual"))
    env.close()
    return out


def record(path: Path, codec: str, frames, seconds: float, paced: bool) -> dict:
    w = EpisodeWriter(path, SPEC, image_codec=codec, streams={"state.joint_pos": (7,)}, image_threads=2)
    n_steps = int(seconds * 30)
    rng = np.random.default_rng(0)
    dropped = 0
    t0 = time.perf_counter()
    w.begin_episode("teleop", task="bench")
    stream_t = 0.0
    for i in range(n_steps):
        due = t0 + i / 30.0
        if paced:
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            elif now > due + 1 / 30.0:  # missed its slot by a whole period: the camera moved on
                dropped += 1
                continue
        stamp = i / 30.0
        obs = {k: frames[k][i % len(frames[k])] for k in frames}
        obs["state.joint_pos"] = rng.normal(size=7).astype(np.float32)
        obs["state.ee_pose"] = rng.normal(size=7).astype(np.float32)
        while stream_t <= stamp:  # 100 Hz state between 30 Hz frames
            w.add_stream_sample("state.joint_pos", obs["state.joint_pos"], stream_t)
            stream_t += 0.01
        w.add_step(obs, np.zeros(7, np.float32), timestamp=stamp)
        if (i + 1) % 300 == 0:  # a 10 s episode
            w.end_episode(success=True)
            w.begin_episode("teleop", task="bench")
    if w.episode_steps:
        w.end_episode(success=True)
    w.close()
    wall = time.perf_counter() - t0
    st = EpisodeStore(path)
    size = st.size_bytes()
    n = min(len(frames["image.side"]), st.n_steps)
    mse = np.mean([(np.asarray(st.array(k)[:n], float) - np.stack(frames[k][:n])) ** 2 for k in frames])
    return {"realtime_factor": seconds / wall, "dropped": dropped, "frames": 3 * (n_steps - dropped),
            "gb_per_hour": size / seconds * 3600 / 1e9, "steps_committed": st.n_steps,
            "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)}


def state_store(path: Path, episodes: int = 200, length: int = 100) -> None:
    spec = RobotSpec(name="state_cell", action=ActionSpec(),
                     observations=tuple(ObsKey(f"state.{k}", (n,)) for k, n in
                                        (("joint_pos", 7), ("joint_vel", 7), ("ee_pose", 7), ("gripper", 1), ("wrench", 6))))
    rng = np.random.default_rng(0)
    with EpisodeWriter(path, spec) as w:
        for _ in range(episodes):
            w.begin_episode("scripted")
            data = {k.name: rng.normal(size=(length, *k.shape)).astype(np.float32) for k in spec.observations}
            act = rng.uniform(-1, 1, (length, 7)).astype(np.float32)
            for t in range(length):
                w.add_step({k: v[t] for k, v in data.items()}, act[t], timestamp=t * 0.1)
            w.end_episode(success=True)


def sample_state(path: Path, seconds: float = 3.0) -> dict:
    ds = WindowDataset([path], WindowConfig(n_obs_steps=2, horizon=16))
    st = EpisodeStore(path)
    arrays = {k: st.load(k) for k in [*ds.state_keys, "action"]}  # the baseline: contiguous in-RAM arrays
    ep_of = np.repeat(np.arange(st.n_episodes), st.lengths)
    rng = np.random.default_rng(0)

    def ours():
        ds[rng.integers(0, len(ds), 256)]

    def baseline():
        t = rng.integers(0, st.n_steps, 256)
        e = ep_of[t]
        obs_i, act_i, valid = window_indices(t, st.starts[e], st.ends[e], 2, 16)
        out = {k: arrays[k][obs_i] for k in ds.state_keys}
        out["action"] = pad_actions(arrays["action"][act_i], valid, ds.deltas)
        return out

    rates = {}
    for name, fn in (("ours", ours), ("numpy", baseline)):
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        rates[name] = n * 256 / (time.perf_counter() - t0)
    return {"state_windows_per_s": rates["ours"], "numpy_windows_per_s": rates["numpy"],
            "state_ratio_vs_numpy": rates["ours"] / rates["numpy"]}


def image_store(path: Path, codec: str, frames, steps: int = 3000) -> None:
    cams = tuple(Camera(n, 84, 84) for n in ("front", "wrist"))
    spec = RobotSpec(name="img_cell", cameras=cams, action=ActionSpec(),
                     observations=(ObsKey("state.ee_pose", (7,)), *(image_key(c) for c in cams)))
    import cv2

    small = {k: [cv2.resize(f, (84, 84), interpolation=cv2.INTER_AREA) for f in frames[k]]
             for k in ("image.front", "image.wrist")}
    with EpisodeWriter(path, spec, image_codec=codec) as w:
        for e in range(steps // 100):
            w.begin_episode("scripted")
            for t in range(100):
                obs = {k: small[k][(e * 7 + t) % len(small[k])] for k in small}
                obs["state.ee_pose"] = np.zeros(7, np.float32)
                w.add_step(obs, np.zeros(7, np.float32), timestamp=t * 0.1)
            w.end_episode(success=True)
    from robot_rl.store.tools import prepare

    prepare(path)


def sample_images(path: Path, seconds: float = 6.0, workers: int = 2, batch: int = 64) -> float:
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    ds = WindowDataset([path], WindowConfig(n_obs_steps=2, horizon=16))
    sampler = BatchSampler(RandomSampler(range(len(ds)), replacement=True, num_samples=10**7), batch, drop_last=True)
    dl = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers, prefetch_factor=4,
                    collate_fn=lambda b: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()})
    it = iter(dl)
    for _ in range(4):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += batch
    rate = n / (time.perf_counter() - t0)
    del it, dl
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record-seconds", type=float, default=12.0)
    ap.add_argument("--paced-seconds", type=float, default=10.0)
    args = ap.parse_args()
    out: dict[str, object] = {}
    frames = rendered_frames()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rec, paced, windows, size, psnr = {}, {}, {}, {}, {}
        for codec in ("blosc_zstd", "jpeg"):
            r = record(tmp / f"rec_{codec}.zarr", codec, frames, args.record_seconds, paced=False)
            p = record(tmp / f"paced_{codec}.zarr", codec, frames, args.paced_seconds, paced=True)
            rec[codec], paced[codec], size[codec] = round(r["realtime_factor"], 2), p["dropped"], round(r["gb_per_hour"], 1)
            psnr[codec] = "lossless" if r["psnr_db"] == float("inf") else round(r["psnr_db"], 1)
            print(codec, "record", r, "paced", p, file=sys.stderr, flush=True)
            image_store(tmp / f"img_{codec}.zarr", codec, frames)
            windows[codec] = round(sample_images(tmp / f"img_{codec}.zarr"))
            print(codec, "image windows/s", windows[codec], file=sys.stderr, flush=True)
        state_store(tmp / "state.zarr")
        s = sample_state(tmp / "state.zarr")
    out["record.realtime_factor"] = min(rec.values())
    out["record.realtime_factor_by_codec"] = rec
    out["record.dropped"] = sum(paced.values())
    out["record.dropped_by_codec"] = paced
    out["size.gb_per_hour_3cam"] = size
    out["record.psnr_db"] = psnr
    out["sample.state_windows_per_s"] = round(s["state_windows_per_s"])
    out["sample.numpy_windows_per_s"] = round(s["numpy_windows_per_s"])
    out["sample.state_ratio_vs_numpy"] = round(s["state_ratio_vs_numpy"], 3)
    out["sample.image_windows_per_s"] = windows
    emit("store", out, "python benchmarks/store.py")


if __name__ == "__main__":
    main()
