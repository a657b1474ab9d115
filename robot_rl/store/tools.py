"""Store tools behind `robot-rl data …`: validate, copy (merge / split / filter), prepare, preview."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import zarr

from robot_rl.store.codecs import image_array_codecs
from robot_rl.store.format import SOURCES, StoreError
from robot_rl.store.reader import EpisodeStore
from robot_rl.store.writer import EpisodeWriter

Progress = Callable[[Iterable], Iterable]


def _identity(it: Iterable) -> Iterable:
    return it


# ---- validate ------------------------------------------------------------------------------------
def validate(path: str | Path, progress: Progress = _identity) -> dict:
    """Schema, dtypes, shapes, episode index, monotonic stamps, every chunk decodable.
    Raises StoreError naming the first problem (store, episode, key)."""
    st = EpisodeStore(path)
    where = f"store {st.path}"
    if st.n_episodes and (np.any(np.diff(st.ends) <= 0) or st.ends[-1] != st.n_steps or st.ends[0] <= 0):
        raise StoreError(f"{where}: episode index is not strictly increasing up to n_steps={st.n_steps}")
    for k in st.spec.observations:
        a = st.array(k.name)
        if tuple(a.shape[1:]) != tuple(k.shape) or np.dtype(str(a.dtype)) != np.dtype(k.dtype):
            raise StoreError(f"{where} key '{k.name}': array is {a.dtype}{tuple(a.shape[1:])}, spec says {k.dtype}{k.shape}")
        if a.shape[0] < st.n_steps:
            raise StoreError(f"{where} key '{k.name}': {a.shape[0]} rows < n_steps {st.n_steps}")
    for i, m in enumerate(st.meta):
        if m.get("source") not in SOURCES:
            raise StoreError(f"{where} episode {i}: source {m.get('source')!r} not one of {SOURCES}")
    stamps = st.load("timestamp")
    for i in range(st.n_episodes):
        s = stamps[st.episode_slice(i)]
        bad = np.flatnonzero(~(np.diff(s) > 0))
        if bad.size or not np.all(np.isfinite(s)):
            at = int(bad[0]) + 1 if bad.size else 0
            raise StoreError(f"{where} episode {i} key 'timestamp': not strictly increasing at step {at}")
    for key in progress(st.keys()):
        a = st.array(key)
        step = max(1, a.chunks[0])
        for lo in range(0, st.n_steps, step):
            try:
                block = a[lo:min(lo + step, st.n_steps)]
            except Exception as e:  # a corrupt chunk surfaces as a codec error of some kind
                ep = int(np.searchsorted(st.ends, lo, side="right"))
                raise StoreError(f"{where} episode {ep} key '{key}': chunk at step {lo} is corrupt "
                                 f"({type(e).__name__}); restore it from a copy or drop the episode with "
                                 f"robot-rl data filter") from None
            if key.startswith("state.") or key == "action":
                if not np.all(np.isfinite(block)):
                    ep = int(np.searchsorted(st.ends, lo + int(np.argwhere(~np.isfinite(block))[0][0]), side="right"))
                    raise StoreError(f"{where} episode {ep} key '{key}': NaN/Inf values")
    return st.summary()


# ---- copy: merge, split, filter ----------------------------------------------------------------------
def copy_episodes(sources: Sequence[tuple[EpisodeStore, Sequence[int]]], dest: str | Path,
                  image_codec: str | None = None, progress: Progress = _identity) -> int:
    """Copy the given episodes of one or more stores (same spec) into `dest` (created)."""
    dest = Path(dest)
    if (dest / "zarr.json").exists():
        raise StoreError(f"store {dest} exists; choose a new output path")
    spec = sources[0][0].spec
    for st, _ in sources:
        if st.spec.to_dict() != spec.to_dict():
            raise StoreError(f"store {st.path}: spec '{st.spec.name}' differs from {sources[0][0].path}'s; "
                             "only stores with the same spec can be combined")
    codec = image_codec or sources[0][0].image_codec
    n = 0
    with EpisodeWriter(dest, spec, image_codec=codec) as w:
        for st, eps in sources:
            for e in progress(list(eps)):
                data = st.episode(e)
                meta = {k: v for k, v in st.meta[e].items() if k not in ("length", "stream_ends")}
                success = meta.pop("success", None)
                meta["copied_from"] = f"{st.path}#{e}"
                w.begin_episode(**meta)
                for t in range(len(data["action"])):
                    obs = {k: data[k][t] for k in spec.keys()}
                    pol = data["action_policy"][t]
                    w.add_step(obs, data["action"][t], timestamp=float(data["timestamp"][t]), reward=float(data["reward"][t]),
                               intervention=bool(data["intervention"][t]), terminated=bool(data["terminated"][t]),
                               truncated=bool(data["truncated"][t]),
                               action_policy=None if np.all(np.isnan(pol)) else pol)
                w.end_episode(success=success)
                n += 1
    return n


def split_ids(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0 < fraction < 1:
        raise StoreError(f"split fraction {fraction} must be in (0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(fraction * n))
    return sorted(perm[:k].tolist()), sorted(perm[k:].tolist())


# ---- prepare --------------------------------------------------------------------------------------------
def prepare(path: str | Path, width: int | None = None, height: int | None = None, image_codec: str | None = None,
            progress: Progress = _identity) -> dict:
    """Derive policy-resolution images (prepared/<image key>) and normalisation statistics
    (min, max, mean, std per state key and for actions) for all committed episodes."""
    import cv2

    st = EpisodeStore(path)
    if st.n_episodes == 0:
        raise StoreError(f"store {st.path}: no committed episodes to prepare")
    lock = open(st.path / ".writer.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(f"store {st.path}: a writer has it open; prepare after recording stops") from None
    try:
        root = zarr.open_group(st.path, mode="r+")
        codec = image_codec or st.image_codec
        images = {}
        for key in st.spec.image_keys:
            cam = st.spec.camera(key.split(".", 1)[1])
            w, h = width or cam.policy_width, height or cam.policy_height
            name = f"prepared/{key}"
            arr = root.create_array(name, shape=(st.n_steps, h, w, 3), chunks=(1, h, w, 3), dtype="u1",
                                    overwrite=True, **image_array_codecs(codec))
            src = st.array(key)
            for lo in progress(range(0, st.n_steps, 256)):
                hi = min(lo + 256, st.n_steps)
                block = np.asarray(src[lo:hi])
                arr[lo:hi] = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in block])
            images[key] = [h, w]
        stats = {}
        for key in [*st.spec.state_keys, "action"]:
            x = st.load(key).astype(np.float64).reshape(st.n_steps, -1)
            stats[key] = {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
                          "std": x.std(0).tolist()}
        prepared = {"n_steps": st.n_steps, "n_episodes": st.n_episodes, "images": images, "stats": stats,
                    "image_codec": codec}
        root.update_attributes({"prepared": prepared})
        return prepared
    finally:
        lock.close()


def stats(st: EpisodeStore) -> dict:
    p = st.attrs.get("prepared")
    if not p:
        raise StoreError(f"store {st.path}: no normalisation statistics; run robot-rl data prepare {st.path}")
    if p["n_steps"] != st.n_steps:
        raise StoreError(f"store {st.path}: prepared for {p['n_steps']} steps, store has {st.n_steps}; "
                         f"run robot-rl data prepare {st.path} again")
    return p["stats"]


# ---- preview ------------------------------------------------------------------------------------------
def preview(path: str | Path, episode: int, out: str | Path, camera: str | None = None, fps: int = 10) -> Path:
    """Episode -> MP4/GIF: frames with the action overlaid, a red border while a human intervened.
    State-only stores get a plot of the actions and flags over time instead."""
    import cv2

    from robot_rl.rollout import write_video

    st = EpisodeStore(path)
    data = st.episode(episode, keys=[*st.spec.image_keys, "action", "intervention", "reward"])
    keys = st.spec.image_keys
    out = Path(out)
    if not keys:
        return _plot_episode(data, st, episode, out.with_suffix(".png"))
    key = f"image.{camera}" if camera else keys[0]
    if key not in keys:
        raise StoreError(f"store {st.path}: no camera '{camera}'; cameras: {[k.split('.', 1)[1] for k in keys]}")
    frames = []
    for t, img in enumerate(data[key]):
        f = np.ascontiguousarray(img.copy())
        scale = max(1, 320 // f.shape[1])
        if scale > 1:
            f = cv2.resize(f, (f.shape[1] * scale, f.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
        a = data["action"][t]
        cv2.putText(f, f"t={t} a=" + " ".join(f"{v:+.2f}" for v in a[:3]) + f" g={a[-1]:+.1f}", (4, 14),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
        if data["intervention"][t]:
            cv2.rectangle(f, (0, 0), (f.shape[1] - 1, f.shape[0] - 1), (255, 0, 0), 4)
            cv2.putText(f, "HUMAN", (4, f.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 0, 0), 1, cv2.LINE_AA)
        frames.append(f)
    return write_video(frames, out, fps=fps)


def _plot_episode(data: dict, st: EpisodeStore, episode: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 1, figsize=(8, 4), sharex=True)
    ax[0].plot(data["action"])
    ax[0].set_ylabel("action")
    ax[1].plot(data["intervention"].astype(float), label="intervention")
    ax[1].plot(data["reward"], label="reward")
    ax[1].legend()
    ax[1].set_xlabel("step")
    fig.suptitle(f"{st.path.name} episode {episode}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

