"""The episode store: round trip, bad input (one clear error, nothing lost), corruption detection,
samplers (windows, padding, DataLoader workers, mixing, ring buffer), tools and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robot_rl.spec import ActionSpec, ObsKey, RobotSpec
from robot_rl.store import EpisodeStore, EpisodeWriter, StoreError
from robot_rl.store.frames import FrameReader
from robot_rl.store.sampler import MixedBatchSampler, RingBuffer, WindowConfig, WindowDataset
from robot_rl.store.tools import copy_episodes, prepare, split_ids, stats, validate
from tests.helpers.store_child import SPEC, episode


def write(store: Path, episodes=range(4), codec="blosc_zstd", sources=None) -> None:
    with EpisodeWriter(store, SPEC, image_codec=codec) as w:
        for k in episodes:
            ep = episode(k)
            w.begin_episode((sources or {}).get(k, "teleop"), task="t", operator="ada")
            for t in range(len(ep["action"])):
                w.add_step({key: ep[key][t] for key in SPEC.keys()}, ep["action"][t], timestamp=float(ep["timestamp"][t]),
                           reward=float(ep["reward"][t]), intervention=bool(ep["intervention"][t]))
            w.end_episode(success=bool(k % 2))


@pytest.mark.parametrize("codec", ["blosc_zstd", "jpeg", "raw"])
def test_round_trip_and_codecs(tmp_path, codec):
    store = tmp_path / "s.zarr"
    write(store, codec=codec)
    st = EpisodeStore(store)
    assert st.n_episodes == 4 and st.n_steps == sum(len(episode(k)["action"]) for k in range(4))
    for k in range(4):
        got, want = st.episode(k), episode(k)
        assert np.array_equal(got["state.q"], want["state.q"])
        assert np.array_equal(got["timestamp"], want["timestamp"])  # device stamps, not index / fps
        if codec == "jpeg":  # lossy; tiny 16x12 frames with hard colour edges are its worst case
            mse = np.mean((got["image.cam"].astype(float) - want["image.cam"]) ** 2)
            assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 25
        else:
            assert np.array_equal(got["image.cam"], want["image.cam"])
    assert st.meta[1]["operator"] == "ada" and st.meta[1]["success"] is True
    reader = FrameReader(st.array("image.cam"), store / "data" / "image.cam")
    assert reader.kind == {"blosc_zstd": "blosc", "jpeg": "jpeg", "raw": "raw"}[codec]
    idx = np.array([7, 0, 3])
    assert np.array_equal(reader.read(idx), np.asarray(st.array("image.cam").oindex[np.sort(idx)])[np.argsort(np.argsort(idx))])


def test_bad_steps_are_refused_with_one_clear_error_and_nothing_is_lost(tmp_path):
    store = tmp_path / "s.zarr"
    write(store, range(2))
    ep = episode(5)
    obs = {key: ep[key][0] for key in SPEC.keys()}
    with EpisodeWriter(store) as w:
        w.begin_episode("policy")
        cases = [
            ({**obs, "state.q": np.zeros(4, np.float32)}, "'state.q': shape"),
            ({**obs, "state.q": np.zeros(3, np.float64)}, "'state.q': dtype"),
            ({k: v for k, v in obs.items() if k != "image.cam"}, "missing required key 'image.cam'"),
            ({**obs, "state.extra": np.zeros(1)}, "not in spec"),
        ]
        for bad, words in cases:
            with pytest.raises(StoreError) as e:
                w.add_step(bad, ep["action"][0], timestamp=1.0)
            assert words in str(e.value) and f"store {store} episode 2" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(StoreError, match="'action'"):
            w.add_step(obs, np.full(7, np.nan), timestamp=1.0)
        w.add_step(obs, ep["action"][0], timestamp=1.0)
        with pytest.raises(StoreError, match="strictly increasing"):
            w.add_step(obs, ep["action"][0], timestamp=1.0)
        with pytest.raises(StoreError, match="still open"):
            w.begin_episode("teleop")
        w.discard_episode()
        with pytest.raises(StoreError, match="source 'robot'"):
            w.begin_episode("robot")
    st = EpisodeStore(store)
    assert st.n_episodes == 2  # the bad episode was never committed; earlier ones intact
    assert np.array_equal(st.episode(1)["state.q"], episode(1)["state.q"])
    other = RobotSpec(name="other", observations=(ObsKey("state.q", (3,)),), action=ActionSpec())
    with pytest.raises(StoreError, match="differs from the store's spec"):
        EpisodeWriter(store, other)
    w1 = EpisodeWriter(store)
    with pytest.raises(StoreError, match="another writer"):
        EpisodeWriter(store)
    w1.close()


def test_validate_names_the_corrupt_chunk(tmp_path):
    store = tmp_path / "s.zarr"
    write(store, range(3))
    assert validate(store)["episodes"] == 3
    st = EpisodeStore(store)
    t = int(st.starts[2]) + 1
    chunk = store / "data" / "image.cam" / "c" / str(t) / "0" / "0" / "0"
    chunk.write_bytes(b"garbage" * 10)
    with pytest.raises(StoreError, match=r"episode 2 key 'image.cam': chunk at step"):
        validate(store)


def test_windows_pad_deltas_with_zero_motion_and_absolute_dims_with_the_edge(tmp_path):
    store = tmp_path / "s.zarr"
    write(store, range(2))
    st = EpisodeStore(store)
    ds = WindowDataset([st], WindowConfig(n_obs_steps=2, horizon=8, image_source="data"))
    n0 = int(st.lengths[0])
    acts = episode(0)["action"]
    last = ds[[n0 - 1]]  # last step of episode 0: 6 of 8 actions lie past the end
    assert last["action_is_pad"][0].tolist() == [False, False] + [True] * 6
    assert np.allclose(last["action"][0, 2:, :6], 0.0)  # xyz + rotation deltas: no motion
    assert np.allclose(last["action"][0, 2:, 6], acts[-1, 6])  # absolute gripper: repeat the edge
    first = ds[[0]]  # first step: the earlier observation repeats the first one
    assert np.array_equal(first["state.q"][0, 0], first["state.q"][0, 1])
    assert first["action_is_pad"][0, 0] and np.allclose(first["action"][0, 0, :6], 0)
    # never crosses into the next episode
    b = ds[list(range(len(ds)))]
    assert b["image.cam"].shape == (len(ds), 2, 12, 16, 3)
    assert not np.any(np.isin(b["state.q"][:n0], episode(1)["state.q"]))


def test_dataloader_with_two_workers(tmp_path):
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    store = tmp_path / "s.zarr"
    write(store, range(3))
    ds = WindowDataset([store], WindowConfig(image_source="data"))
    dl = DataLoader(ds, sampler=BatchSampler(RandomSampler(range(len(ds))), 16, drop_last=True), batch_size=None,
                    num_workers=2, collate_fn=lambda b: {k: torch.as_tensor(v) for k, v in b.items()})
    batches = list(dl)
    assert len(batches) == len(ds) // 16 and batches[0]["image.cam"].shape == (16, 2, 12, 16, 3)


def test_mixed_sampler_draws_exact_shares_from_subsets(tmp_path):
    a, b = tmp_path / "demo.zarr", tmp_path / "online.zarr"
    write(a, range(3), sources={0: "teleop", 1: "teleop", 2: "teleop"})
    write(b, range(3, 6), sources={3: "policy", 4: "hil", 5: "policy"})
    ds = WindowDataset([a, b], WindowConfig(horizon=4, image_source="data"))
    demo, online = ds.ids_where(source="teleop"), ds.ids_where(source="policy")
    human = ds.ids_where(intervention=True)
    assert len(demo) + len(online) + len(ds.ids_where(source="hil")) == len(ds)
    sampler = MixedBatchSampler({"demo": (demo, 0.5), "online": (online, 0.25), "human": (human, 0.25)}, 10, 20)
    assert sampler.counts == {"demo": 5, "online": 3, "human": 2} or sum(sampler.counts.values()) == 10
    for batch in sampler:
        assert len(batch) == 10
        assert np.isin(batch[:sampler.counts["demo"]], demo).all()
        assert ds[batch]["action"].shape == (10, 4, 7)
    with pytest.raises(ValueError, match="no samples"):
        MixedBatchSampler({"x": (np.zeros(0, int), 1.0)}, 4, 1)


def test_ring_buffer_evicts_oldest_whole_episodes():
    rb = RingBuffer(SPEC, capacity=50, keys=["state.q"])
    lengths = []
    for k in range(8):
        ep = episode(k)
        rb.add_episode({"state.q": ep["state.q"], "action": ep["action"], "reward": ep["reward"]})
        lengths.append(len(ep["action"]))
        assert rb.size <= 50
    assert rb.size == sum(n for _, n in rb.episodes)
    assert [n for _, n in rb.episodes] == lengths[len(lengths) - len(rb.episodes):]
    batch = rb.sample(32, 2, 8, np.random.default_rng(0))
    assert batch["action"].shape == (32, 8, 7) and batch["state.q"].shape == (32, 2, 3)
    assert np.allclose(batch["action"][batch["action_is_pad"]][:, :6], 0)


def test_merge_split_filter_prepare(tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    write(a, range(3))
    write(b, range(3, 5))
    merged = tmp_path / "m.zarr"
    assert copy_episodes([(EpisodeStore(a), range(3)), (EpisodeStore(b), range(2))], merged) == 5
    m = EpisodeStore(merged)
    assert m.n_episodes == 5 and np.array_equal(m.episode(4)["image.cam"], episode(4)["image.cam"])
    assert m.meta[3]["copied_from"].endswith("b.zarr#0")
    first, second = split_ids(5, 0.6, seed=0)
    assert sorted(first + second) == list(range(5)) and len(first) == 3
    ok = m.select(success=True)
    assert ok == [1, 3]
    prepared = prepare(merged, width=8, height=6)
    assert prepared["images"] == {"image.cam": [6, 8]}
    m.refresh()
    s = stats(m)
    assert np.allclose(s["state.q"]["mean"], m.load("state.q").mean(0), atol=1e-6)
    assert EpisodeStore(merged).root["prepared/image.cam"].shape == (m.n_steps, 6, 8, 3)
    ds = WindowDataset([merged], WindowConfig())
    assert ds[[0, 1]]["image.cam"].shape == (2, 2, 6, 8, 3)
    with pytest.raises(StoreError, match="exists"):
        copy_episodes([(EpisodeStore(a), [0])], merged)


def test_data_cli(tmp_path):
    env = {**os.environ, "MUJOCO_GL": "egl"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "robot_rl.cli", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    r = cli("sim", "rollout", "task=reach", "episodes=4", "record=demo.zarr", "video=false", "task.obs_mode=image",
            "task.camera_width=32", "task.camera_height=24")
    assert r.returncode == 0, r.stderr
    st = EpisodeStore(tmp_path / "demo.zarr")
    assert st.n_episodes == 4 and st.meta[0]["source"] == "scripted" and st.meta[0]["task"] == "reach"
    assert np.all(np.diff(st.episode(0)["timestamp"]) > 0)
    r = cli("data", "info", "demo.zarr")
    assert r.returncode == 0 and "episodes" in r.stdout and "scripted 4" in r.stdout
    assert cli("data", "validate", "demo.zarr").returncode == 0
    assert cli("data", "prepare", "demo.zarr", "data.width=16", "data.height=16").returncode == 0
    r = cli("data", "split", "demo.zarr", "data.fraction=0.5", "record=[a.zarr,b.zarr]")
    assert r.returncode == 0, r.stderr
    assert EpisodeStore(tmp_path / "a.zarr").n_episodes == 2
    r = cli("data", "preview", "demo.zarr", "episode=1", "out=prev.gif")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "prev.gif").stat().st_size > 1000
    r = cli("data", "merge", "store=[a.zarr,b.zarr]", "record=m.zarr")
    assert r.returncode == 0 and EpisodeStore(tmp_path / "m.zarr").n_episodes == 4
    bad = cli("data", "info", "missing.zarr")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no episode store" in bad.stderr
    chunk = tmp_path / "demo.zarr" / "data" / "image.front" / "c" / "2" / "0" / "0" / "0"
    chunk.write_bytes(b"\x00" * 5)
    r = cli("data", "validate", "demo.zarr")
    assert r.returncode == 1 and "key 'image.front'" in r.stdout
    summary = json.loads(json.dumps(EpisodeStore(tmp_path / "demo.zarr").summary()))
    assert summary["episodes"] == 4
